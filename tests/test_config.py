"""Config validation: every error names the file, the key and (where known) the line."""

import re
from pathlib import Path

import pytest

from privatune.common.config import ConfigError, load_job_config

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("name", ["demo.yaml", "dpfedavg.yaml", "smoke.yaml", "smollm2.yaml",
                                  "audit.yaml", "federation.yaml"])
def test_shipped_presets_are_valid(name):
    job = load_job_config(REPO / "configs" / name)
    assert job.privacy.epsilon > 0 and job.federation.rounds >= 2


def test_values_and_overrides(tmp_path):
    path = write(tmp_path, "lora:\n  r: 4\nprivacy:\n  delta: 1e-6\n")
    job = load_job_config(path, ["lora.r=16", "training.learning_rate=0.05",
                                 "lora.target_modules=[q_proj, v_proj]"])
    assert job.lora.r == 16 and job.training.learning_rate == 0.05
    assert job.lora.target_modules == ("q_proj", "v_proj")
    assert job.privacy.delta == 1e-6  # YAML reads 1e-6 as text; it is still a number here


def test_unknown_key_names_file_line_and_key(tmp_path):
    path = write(tmp_path, "seed: 1\nlora:\n  r: 8\n  rank: 4\n")
    with pytest.raises(ConfigError) as err:
        load_job_config(path)
    assert str(path) in str(err.value) and "line 4" in str(err.value)
    assert "lora.rank" in str(err.value) and "unknown key" in str(err.value)


def test_wrong_type_names_key(tmp_path):
    path = write(tmp_path, "training:\n  batch_size: lots\n")
    with pytest.raises(ConfigError, match=r"line 2: training.batch_size: expected a whole number"):
        load_job_config(path)


def test_out_of_range_value(tmp_path):
    path = write(tmp_path, "privacy:\n  epsilon: -1\n")
    with pytest.raises(ConfigError, match=r"privacy.epsilon: -1.0 is out of range"):
        load_job_config(path)


def test_a_rule_the_type_checks_itself_names_file_line_and_section(tmp_path):
    path = write(tmp_path, "seed: 1\nlora:\n  r: 4\n  target_modules: []\n")
    with pytest.raises(ConfigError, match=r"line 2: lora: lora.target_modules must name at least one"):
        load_job_config(path)


@pytest.mark.parametrize("delta", ["1", "1.0", "2.5"])
def test_delta_of_one_or_more_is_refused_naming_file_line_and_key(tmp_path, delta):
    """At delta = 1 a mechanism promises nothing: the job stops at its config, not at every
    node; an override is named too."""
    path = write(tmp_path, f"seed: 1\nprivacy:\n  epsilon: 8\n  delta: {delta}\n")
    with pytest.raises(ConfigError, match=rf"{re.escape(str(path))}, line 4: privacy.delta: "
                                          r"[0-9.]+ is out of range \(must be < 1\)"):
        load_job_config(path)
    with pytest.raises(ConfigError, match=r"--set privacy.delta=1\).*privacy.delta: 1.0 is out "
                                          r"of range \(must be < 1\)"):
        load_job_config(write(tmp_path, "seed: 1\n"), ["privacy.delta=1"])
    assert load_job_config(path, ["privacy.delta=0.999"]).privacy.delta == 0.999


def test_aggregation_mode_is_validated_and_reaches_the_train_request(tmp_path):
    from privatune.common.protocol import TrainRequest, train_request

    path = write(tmp_path, "federation:\n  rounds: 2\n  aggregation: fedprox\n")
    with pytest.raises(ConfigError, match=r"line 3: federation.aggregation: 'fedprox' is not one "
                                          r"of fedavg, ffa"):
        load_job_config(path)
    assert load_job_config(write(tmp_path, "seed: 0\n")).federation.aggregation == "fedavg"
    job = load_job_config(write(tmp_path, "seed: 0\n"), ["federation.aggregation=ffa"])
    sent = TrainRequest.from_record(train_request(job, "run", 1).to_record())
    assert sent.aggregation == "ffa"


def test_bad_choice_and_bad_override(tmp_path):
    path = write(tmp_path, "privacy:\n  unit: hospital\n")
    with pytest.raises(ConfigError, match="privacy.unit: 'hospital' is not one of record, patient"):
        load_job_config(path)
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_job_config(write(tmp_path, "seed: 0\n"), ["lora.r"])
    with pytest.raises(ConfigError, match=r"--set lora.r=0.*lora.r: 0 is out of range"):
        load_job_config(write(tmp_path, "seed: 0\n"), ["lora.r=0"])


def test_patient_sampling_reaches_the_simulated_sites_policies(tmp_path):
    from privatune.client.policy import load_site_policy
    from privatune.simulations.runner import write_site_policy

    job = load_job_config(write(tmp_path, "privacy:\n  unit: patient\n"))
    assert job.privacy.patient_sampling == "truncate"  # the default
    job = load_job_config(write(tmp_path, "seed: 0\n"), ["privacy.patient_sampling=window"])
    policy = load_site_policy(write_site_policy(tmp_path / "site", "h1", tmp_path / "notes.ndjson",
                                                tmp_path / "model", job))
    assert policy.privacy.patient_sampling == "window"
    with pytest.raises(ConfigError, match="privacy.patient_sampling: 'all' is not one of window, "
                                          "truncate"):
        load_job_config(write(tmp_path, "privacy:\n  patient_sampling: all\n"))


def test_a_secure_job_s_simulated_sites_trust_secure_aggregation_only_when_calibrated_for_it(
        tmp_path):
    from privatune.client.policy import load_site_policy
    from privatune.simulations.runner import write_site_policy

    def site_policy(*overrides: str):
        job = load_job_config(write(tmp_path, "seed: 0\n"),
                              ["federation.mode=secure_dpsgd", "federation.min_nodes=4",
                               "federation.min_replies=3", *overrides])
        return load_site_policy(write_site_policy(tmp_path / "site", "h1",
                                                  tmp_path / "notes.ndjson", tmp_path / "model",
                                                  job)).secure_aggregation

    assert (site_policy().trust, site_policy().min_contributions) == (False, 3)
    trusted = site_policy("secure.calibrate=aggregate", "secure.min_contributions=4")
    assert (trusted.trust, trusted.min_contributions) == (True, 4)


def test_invalid_yaml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match=r"line \d+: invalid YAML"):
        load_job_config(write(tmp_path, "lora: [unclosed\n"))
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_job_config(tmp_path / "missing.yaml")


def test_cross_field_check(tmp_path):
    path = write(tmp_path, "federation:\n  min_nodes: 2\n  min_replies: 3\n")
    with pytest.raises(ConfigError, match="min_replies .3. cannot exceed federation.min_nodes"):
        load_job_config(path)


# --- YAML that must not be expanded, paths that loop ------------------------------------------

def alias_bomb(levels=9):
    """The "billion laughs": each line repeats the previous one nine times by alias."""
    lines = ['l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


def test_yaml_alias_bomb_is_refused_naming_file_and_line(tmp_path):
    path = write(tmp_path, "seed: 1\n" + alias_bomb())
    with pytest.raises(ConfigError) as err:
        load_job_config(path)
    assert str(err.value).startswith(f"{path}, line 3: YAML alias *l0 is not allowed")


def test_yaml_aliases_are_refused_in_site_policies_and_overrides(tmp_path):
    from privatune.client.policy import load_site_policy

    policy = tmp_path / "policy.yaml"
    policy.write_text("site:\n  name: &n a\n  data: *n\n  model: m\n")
    with pytest.raises(ConfigError, match=r"policy.yaml, line 3: YAML alias \*n is not allowed"):
        load_site_policy(policy)
    with pytest.raises(ConfigError, match=r"--set 'lora.r=\*x'.*alias \*x is not allowed"):
        load_job_config(write(tmp_path, "seed: 0\n"), ["lora.r=*x"])


def test_yaml_that_is_not_utf8_or_nested_too_deeply(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_bytes(b"seed: 1\nlora:\n  r: \xff\n")
    with pytest.raises(ConfigError, match=r"job.yaml, line 3: not valid UTF-8"):
        load_job_config(path)
    path.write_text("lora: " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(ConfigError, match="nested too deeply"):
        load_job_config(path)


@pytest.mark.parametrize("text, message", [
    ('seed: 0\nlora:\n  r: "\\U0011ffff"\n', r"line 3: invalid YAML: chr\(\) arg not in range"),
    ("seed: 0\nlora:\n  r: " + "1" * 5000 + "\n", "line 3: invalid YAML: cannot read the value '1111"),
    ("seed: 0\nlora:\n  target_modules: [q, 2001-13-45]\n", "line 3: invalid YAML: cannot read the "
                                                            "value '2001-13-45' .month must be"),
])
def test_yaml_values_python_cannot_convert_name_the_line(tmp_path, text, message):
    """Found by tests/test_fuzz_inputs.py: PyYAML lets these through as a bare ValueError."""
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=f"^{re.escape(str(path))}, {message}"):
        load_job_config(path)


def test_symlink_loop_config_path_is_named(tmp_path):
    (tmp_path / "a.yaml").symlink_to(tmp_path / "b.yaml")
    (tmp_path / "b.yaml").symlink_to(tmp_path / "a.yaml")
    for path in (tmp_path / "a.yaml", tmp_path / "a.yaml" / "job.yaml"):
        with pytest.raises(ConfigError, match=r"cannot read config file \(a symbolic link loop.*ELOOP"):
            load_job_config(path)


# --- the site's state directory is checked before any training -------------------------------

def checkable_site(tmp_path, state_dir):
    """A site that passes ``privatune node --check`` except, perhaps, for its state_dir."""
    import json

    data = tmp_path / "notes.jsonl"
    data.write_text("".join(json.dumps({"text": f"note {i}", "patient_id": f"p{i}"}) + "\n"
                            for i in range(40)))
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    policy = tmp_path / "policy.yaml"
    policy.write_text(f"site:\n  name: a\n  data: {data}\n  format: jsonl\n  model: {model}\n"
                      f"  state_dir: {state_dir}\nprivacy:\n  delta: 1.0e-4\n")
    return policy


def test_check_site_accepts_a_state_dir_it_can_create(tmp_path):
    from privatune.client.deploy import check_site

    site = check_site(checkable_site(tmp_path, "state/new"))
    assert site.train_units + site.heldout_units == 40
    assert not (tmp_path / "state").exists()  # the check creates nothing


@pytest.mark.parametrize("state_dir, reason", [
    ("notes.jsonl", "is not a directory"),
    ("notes.jsonl/state", "cannot be used (Not a directory"),
    ("loop/state", "cannot be used (a symbolic link loop (ELOOP)"),
    ("dangling", "is a symbolic link to nothing"),
])
def test_check_site_refuses_a_state_dir_it_cannot_write(tmp_path, state_dir, reason):
    from privatune.client.deploy import check_site

    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    (tmp_path / "dangling").symlink_to(tmp_path / "absent")
    policy = checkable_site(tmp_path, state_dir)
    with pytest.raises(ConfigError) as err:
        check_site(policy)
    assert str(err.value).startswith(f"{policy}, line 6: site.state_dir: {tmp_path / state_dir} "
                                     f"{reason}")


def test_check_site_refuses_a_read_only_state_dir(tmp_path, monkeypatch):
    import os
    import tempfile

    from privatune.client.deploy import check_site

    (tmp_path / "state").mkdir()
    policy = checkable_site(tmp_path, "state")
    if os.geteuid() == 0:  # root writes anywhere: stand in for the refusal a site user gets
        def refuse(*args, **kwargs):
            raise PermissionError(13, "Permission denied")
        monkeypatch.setattr(tempfile, "TemporaryFile", refuse)
    else:
        (tmp_path / "state").chmod(0o555)
    with pytest.raises(ConfigError, match=r"line 6: site.state_dir: .*state is not writable "
                                          r"\(Permission denied\)"):
        check_site(policy)


def test_check_site_names_a_policy_path_that_loops(tmp_path):
    from privatune.client.deploy import check_site

    (tmp_path / "policy.yaml").symlink_to(tmp_path / "policy.yaml")
    with pytest.raises(ConfigError, match=r"policy.yaml: cannot read the site policy \(a symbolic "
                                          r"link loop \(ELOOP\)\)"):
        check_site(tmp_path / "policy.yaml")


def test_judged_loss_needs_the_record_unit_and_keeps_the_marker(tmp_path):
    path = write(tmp_path, "training:\n  loss_on: judged\n")
    job = load_job_config(path)
    assert job.judged_only and job.loss_marker == job.evaluation.marker
    plain = load_job_config(path, ["training.loss_on=completion"])
    assert not plain.judged_only and plain.loss_marker == job.evaluation.marker
    assert load_job_config(path, ["training.loss_on=note"]).loss_marker == ""
    with pytest.raises(ConfigError, match="loss_on: judged needs privacy.unit: record"):
        load_job_config(path, ["privacy.unit=patient"])
