"""Config validation: every error names the file, the key and (where known) the line."""

from pathlib import Path

import pytest

from privatune.common.config import ConfigError, load_job_config

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("name", ["demo.yaml", "smoke.yaml"])
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


def test_bad_choice_and_bad_override(tmp_path):
    path = write(tmp_path, "privacy:\n  unit: hospital\n")
    with pytest.raises(ConfigError, match="privacy.unit: 'hospital' is not one of record, patient"):
        load_job_config(path)
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_job_config(write(tmp_path, "seed: 0\n"), ["lora.r"])
    with pytest.raises(ConfigError, match=r"--set lora.r=0.*lora.r: 0 is out of range"):
        load_job_config(write(tmp_path, "seed: 0\n"), ["lora.r=0"])


def test_invalid_yaml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match=r"line \d+: invalid YAML"):
        load_job_config(write(tmp_path, "lora: [unclosed\n"))
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_job_config(tmp_path / "missing.yaml")


def test_cross_field_check(tmp_path):
    path = write(tmp_path, "federation:\n  min_nodes: 2\n  min_replies: 3\n")
    with pytest.raises(ConfigError, match="min_replies .3. cannot exceed federation.min_nodes"):
        load_job_config(path)
