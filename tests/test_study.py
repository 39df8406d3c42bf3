"""The privacy-utility study: its arguments, the nearest-note copy, the figures read from a
report, the summaries and tables, and (e2e) the whole study on the smoke federation."""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import pytest

from privatune.common.clinical_metrics import ClinicalScores
from privatune.common.config import ConfigError
from privatune.common.generation import GenerationScores
from privatune.server.report import CentralSummary, RunReport, SiteSummary
from privatune.server.rounds import RoundRecord, RoundTraining
from privatune.common.cli import main
from privatune.simulations.nearest_note import jaccard, nearest_references, word_set
from privatune.simulations.study import check_reuse
from privatune.simulations.study_measurements import (Measurement, RunRecord, Scores,
                                                      federated_measurements)
from privatune.simulations.study_plan import (BASE, CENTRAL_DP, FEDERATED, LOCAL_ONLY,
                                              NEAREST_NOTE, NON_PRIVATE, POOLED, SECURE, Budget,
                                              SecureBatch,
                                              parse_epsilons, plan_study, secure_batch)
from privatune.simulations.study_report import draw_plot, render_markdown, summarise

CONFIGS = Path(__file__).resolve().parent.parent / "configs"

# hand-written notes: (prompt, reference)
TRAIN = [
    ("Subjective: follow-up of hypertension. Objective: BP 150/95 mmHg. Assessment:",
     "1. Hypertension: BP 150/95 mmHg, poorly controlled. Increase amlodipine."),
    ("Subjective: follow-up of type 2 diabetes. Objective: HbA1c 6.8 %. Assessment:",
     "1. Type 2 diabetes: HbA1c 6.8 %, at goal. Continue metformin."),
    ("Subjective: follow-up of atrial fibrillation on warfarin. Objective: PT-INR 1.4. Assessment:",
     "1. Atrial fibrillation: PT-INR 1.4, subtherapeutic. Increase warfarin."),
]


# --------------------------------------------------------------------------- nearest-note copy


def test_word_sets_and_jaccard():
    assert word_set("BP 150/95, bp!") == {"bp", "150", "95"}
    assert jaccard(frozenset({"a", "b"}), frozenset({"b", "c"})) == pytest.approx(1 / 3)
    assert jaccard(frozenset(), frozenset()) == 0.0


def test_each_prompt_gets_the_reference_of_the_note_with_the_most_words_in_common():
    prompts = ["Subjective: follow-up of diabetes. Objective: HbA1c 9.1 %. Assessment:",
               "Subjective: atrial fibrillation, warfarin. Objective: PT-INR 3.5. Assessment:",
               "Subjective: hypertension follow-up. Objective: BP 128/80 mmHg. Assessment:"]
    assert nearest_references(TRAIN, prompts) == [TRAIN[1][1], TRAIN[2][1], TRAIN[0][1]]


def test_a_tie_goes_to_the_earliest_note_and_no_notes_is_an_error():
    twins = [("alpha beta", "first"), ("beta alpha", "second"), ("gamma", "third")]
    assert nearest_references(twins, ["alpha beta", "nothing shared"]) == ["first", "first"]
    with pytest.raises(ValueError, match="at least one training note"):
        nearest_references([], ["a prompt"])


# --------------------------------------------------------------------------- arguments


@pytest.mark.parametrize("text, message", [
    ("1,x", "'x' is not a number"), ("0,8", "must be above 0"), ("8,10000", "below 10000"),
    ("nan", "must be above 0"), ("3,8,3", "listed twice")])
def test_bad_epsilons_are_refused_with_the_value(text, message):
    with pytest.raises(argparse.ArgumentTypeError, match=message):
        parse_epsilons(text)


def test_epsilons_are_sorted():
    assert parse_epsilons("8, 1,3") == (1.0, 3.0, 8.0)


@pytest.mark.parametrize("kwargs, message", [
    ({"seeds": 0}, "--seeds must be at least 1, got 0"),
    ({"other_seeds": -1}, "--seeds-other must be at least 1, got -1"),
    ({"epsilons": ()}, "--epsilons must name at least one"),
    ({"extra": ("seed=4",)}, "the study sets seed itself"),
    ({"extra": ("privacy.epsilon=2",)}, "the study sets privacy.epsilon itself"),
    ({"extra": ("lora.rank=4",)}, "lora.rank: unknown key"),
    ({"extra": ("training.batch_size=0",)}, "training.batch_size: 0 is out of range")])
def test_bad_study_arguments_stop_before_anything_runs(tmp_path, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        plan_study(CONFIGS / "dpfedavg.yaml", tmp_path / "study", **kwargs)
    assert not (tmp_path / "study").exists()


def test_a_secure_job_is_refused_as_the_studys_base(tmp_path):
    # the demo runs secure DP-SGD: its training.batch_size is the union's, not a site's
    with pytest.raises(ConfigError, match="federation.mode is secure_dpsgd; the study starts "
                                          "from a DP FedAvg job"):
        plan_study(CONFIGS / "demo.yaml", tmp_path / "study")
    assert not (tmp_path / "study").exists()


def test_cli_names_a_bad_argument(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit:
        main(["study", "--config", str(CONFIGS / "dpfedavg.yaml"), "--out", str(tmp_path),
              "--epsilons", "1,abc"])
    assert exit.value.code == 2
    assert "argument --epsilons: 'abc' is not a number" in capsys.readouterr().err
    assert main(["study", "--config", str(CONFIGS / "dpfedavg.yaml"), "--out", str(tmp_path),
                 "--seeds", "0"]) == 2
    assert "--seeds must be at least 1, got 0" in capsys.readouterr().err


def test_columns_seeds_and_the_jobs_they_run(tmp_path):
    plan = plan_study(CONFIGS / "dpfedavg.yaml", tmp_path, (8.0, 1.0, 3.0), seeds=3, other_seeds=1,
                      extra=("lora.r=4",))
    assert [b.label for b in plan.budgets] == ["ε = 1", "ε = 3", "ε = 8", "non-private"]
    assert plan.seeds_of(Budget(8.0)) == plan.seeds_of(NON_PRIVATE) == (0, 1, 2)
    assert plan.seeds_of(Budget(1.0)) == plan.seeds_of(Budget(3.0)) == (0,)
    private = plan.job(Budget(3.0), 0)
    assert (private.privacy.epsilon, private.privacy.accountant, private.lora.r) == (3.0, "prv", 4)
    assert private.simulation.local_only_baseline and private.evaluation.every_k_rounds == 3
    open_job = plan.job(NON_PRIVATE, 2)
    assert open_job.seed == 2
    assert (open_job.privacy.epsilon, open_job.privacy.accountant,
            open_job.privacy.min_noise_multiplier) == (10_000, "rdp", 0.0)


# --------------------------------------------------------------------------- figures


def _generation(rouge: float, status: float | None, majority: float = 0.6) -> GenerationScores:
    clinical = ClinicalScores(measurement_fidelity=None, measurements_checked=0,
                              status_accuracy=status, statuses_checked=10,
                              status_majority_share=majority, derivable_status_accuracy=status,
                              derivable_statuses_checked=5, derivable_status_majority_share=0.5,
                              repeat_4gram=0.2, completions=20)
    return GenerationScores(rouge_l=rouge, bleu=1.0, chrf=10.0, examples=20, clinical=clinical)


def test_federated_and_local_only_figures_average_the_sites_that_released_scores():
    sites = {"h1": SiteSummary(final_perplexity=100.0, noise_multiplier=0.8,
                               final_generation=_generation(0.2, 0.5),
                               local_only_perplexity=120.0,
                               local_only_generation=_generation(0.1, None)),
             "h2": SiteSummary(final_perplexity=200.0, noise_multiplier=1.0,
                               final_generation=_generation(0.4, 0.7),
                               local_only_perplexity=220.0,
                               local_only_generation=_generation(0.3, 0.3)),
             "h3": SiteSummary(final_perplexity=50.0, noise_multiplier=0.9)}  # released nothing
    report = RunReport(run_id="r", config={}, base_model="m", sites=sites,
                       central=CentralSummary(final_perplexity=90.0,
                                              final_generation=_generation(0.05, 0.25)),
                       rounds=[RoundRecord(0), RoundRecord(1, training=RoundTraining(["h1"]))])
    federated, alone = federated_measurements(report, Budget(8.0), 4)
    assert (federated.setting, federated.budget, federated.seed) == (FEDERATED, "eps-8", 4)
    assert federated.sites_scored == ("h1", "h2") and alone.sites_scored == ("h1", "h2")
    assert federated.sites.rouge_l == pytest.approx(0.3)
    assert federated.sites.perplexity == pytest.approx(150.0)  # h3's is left out with it
    assert federated.central == Scores(0.05, 0.25, 0.6, 0.25, None, 0.2, 90.0)
    assert federated.noise_multiplier == pytest.approx(0.9)
    assert alone.central is None
    assert alone.sites.status_accuracy == pytest.approx(0.3)  # h1 checked none: not a zero
    assert alone.sites.rouge_l == pytest.approx(0.2)


def test_the_base_model_is_read_from_round_zero_of_the_non_private_run_only():
    sites = {"h1": SiteSummary(base_perplexity=600.0, final_perplexity=100.0,
                               base_generation=_generation(0.01, 0.0),
                               final_generation=_generation(0.2, 0.5)),
             "h2": SiteSummary(base_perplexity=800.0, final_perplexity=200.0,
                               base_generation=_generation(0.03, 0.2),
                               final_generation=_generation(0.4, 0.7)),
             "h3": SiteSummary(base_perplexity=50.0)}  # released no generation scores
    report = RunReport(run_id="r", config={}, base_model="m", sites=sites,
                       central=CentralSummary(base_perplexity=700.0, final_perplexity=90.0,
                                              base_generation=_generation(0.02, 0.1),
                                              final_generation=_generation(0.05, 0.25)),
                       rounds=[RoundRecord(0), RoundRecord(1, training=RoundTraining(["h1"]))])
    assert [m.setting for m in federated_measurements(report, Budget(8.0), 0)] == [
        FEDERATED, LOCAL_ONLY]  # the same untrained model in every column: measured once
    base = federated_measurements(report, NON_PRIVATE, 2)[-1]
    assert (base.setting, base.budget, base.seed) == (BASE, "non-private", 2)
    assert base.sites_scored == ("h1", "h2")
    assert base.sites.rouge_l == pytest.approx(0.02)
    assert base.sites.perplexity == pytest.approx(700.0)
    assert base.central.rouge_l == pytest.approx(0.02)
    assert base.central.perplexity == pytest.approx(700.0)
    assert base.noise_multiplier is None


def _measurement(setting: str, budget: str, seed: int, rouge: float,
                 status: float | None = 0.1) -> Measurement:
    scores = Scores(rouge_l=rouge, status_accuracy=status, status_majority_share=0.68,
                    perplexity=100.0 + seed)
    return Measurement(setting, budget, seed, scores if setting != LOCAL_ONLY else None, scores,
                       ("h1",), 0.0 if setting == POOLED else None)


@pytest.fixture
def summary(tmp_path):
    plan = plan_study(CONFIGS / "dpfedavg.yaml", tmp_path, (1.0, 8.0), seeds=3, other_seeds=1)
    measurements = [_measurement(FEDERATED, "eps-1", 0, 0.1),
                    *[_measurement(FEDERATED, "eps-8", s, r) for s, r in ((0, 0.39), (1, 0.42),
                                                                         (2, 0.45))],
                    *[_measurement(FEDERATED, "non-private", s, 0.5) for s in (0, 1, 2)],
                    _measurement(LOCAL_ONLY, "eps-8", 0, 0.2),
                    *[_measurement(POOLED, "non-private", s, 0.6) for s in (0, 1)],
                    _measurement(NEAREST_NOTE, "non-private", 0, 0.7, status=None)]
    runs = [RunRecord("simulate", "eps-1", 0, "d", wall_s=60.0),
            RunRecord("simulate", "eps-8", 0, "d", wall_s=61.0, reused=True),
            RunRecord("pooled", "non-private", 2, "d", wall_s=1.0, failure="ValueError: boom")]
    return plan, measurements, runs


def test_cells_give_mean_and_sample_sd_over_seeds(summary):
    plan, measurements, runs = summary
    cells = {(c.setting, c.budget): c for c in summarise(plan, measurements, runs)}
    assert set(cells) == {(s, b) for s in (FEDERATED, LOCAL_ONLY) for b in
                          ("eps-1", "eps-8", "non-private")} | {(POOLED, "non-private"),
                                                                (NEAREST_NOTE, "non-private"),
                                                                (BASE, "non-private")} | {
        (s, b) for s in (SECURE, CENTRAL_DP) for b in ("eps-1", "eps-8")}  # no non-private one
    eight = cells[(FEDERATED, "eps-8")]
    assert eight.seeds == (0, 1, 2)
    assert eight.sites.rouge_l.mean == pytest.approx(0.42)
    assert eight.sites.rouge_l.sd == pytest.approx(statistics.stdev([0.39, 0.42, 0.45]))
    assert eight.central.perplexity.mean == pytest.approx(101.0)
    assert cells[(FEDERATED, "eps-1")].sites.rouge_l.sd == 0.0
    assert cells[(POOLED, "non-private")].failures == ("seed 2: ValueError: boom",)
    assert cells[(LOCAL_ONLY, "eps-1")].seeds == () and cells[(LOCAL_ONLY, "eps-1")].sites is None
    assert cells[(NEAREST_NOTE, "non-private")].sites.status_accuracy is None


def test_tables_show_each_setting_by_column_and_every_failure(summary, tmp_path):
    plan, measurements, runs = summary
    cells = summarise(plan, measurements, runs)
    table = render_markdown(plan, cells, runs, "privatune study --config x", 123.4)
    assert "123 s wall clock (3 runs, 122 s between them; 1 of them reused" in table
    assert "| setting | ε = 1 | ε = 8 | non-private |" in table
    assert "| federated (DP FedAvg) | 0.100 | 0.420 ± 0.030 | 0.500 ± 0.000 |" in table
    assert "| each site alone | n/a | 0.200 | n/a |" in table  # no measurement, no failure
    assert "| all sites pooled, no DP | – | – | 0.600 ± 0.000 (1 failed) |" in table  # one column
    assert "| nearest-note copy | – | – | 0.700 |" in table
    assert "| base model, no training | – | – | n/a |" in table  # no ε column, none measured
    status = table.split("## Status accuracy")[1]
    assert "| nearest-note copy | – | – | n/a |" in status
    assert "Always answering the most common status scores 0.68" in status
    assert "| each site alone | ε = 8 | 1 | n/a | n/a |" in table  # never scored centrally
    assert "- all sites pooled, no DP, non-private, seed 2: ValueError: boom" in table
    draw_plot(plan, cells, tmp_path / "study.png")
    assert (tmp_path / "study.png").read_bytes()[:4] == b"\x89PNG"


def test_a_failed_cell_says_so():
    from privatune.simulations.study_report import Cell, _cell, _spread

    failed = Cell(FEDERATED, "eps-8", (), None, None, None, ("seed 0: exit 1",))
    assert _cell(failed, _spread("sites", "rouge_l"), 3) == "failed"


def test_runs_of_another_job_under_out_are_refused(tmp_path):
    from privatune.common.config import to_dict

    plan = plan_study(CONFIGS / "smoke.yaml", tmp_path, (8.0,), seeds=1)
    report = tmp_path / "federated" / "eps-8" / "seed-0" / "run" / "report.json"
    report.parent.mkdir(parents=True)
    report.write_text(json.dumps({"config": to_dict(plan.job(Budget(8.0), 0))}))
    check_reuse(plan)  # the same job: reused
    other = plan_study(CONFIGS / "smoke.yaml", tmp_path, (8.0,), seeds=1, extra=("lora.r=2",))
    with pytest.raises(ConfigError, match=r"report.json was made by another job \(it differs "
                                          r"at lora.r\)"):
        check_reuse(other)


def _seed_data(directory: Path, train_records: dict[str, int]):
    from privatune.simulations.study_baselines import SeedData

    return SeedData(directory / "train.jsonl", directory / "central_eval.jsonl", {},
                    train_records)


def test_failed_runs_are_listed_with_their_reason_and_the_study_goes_on(tmp_path, monkeypatch):
    from privatune.simulations import study

    plan = plan_study(CONFIGS / "smoke.yaml", tmp_path / "out", (8.0,), seeds=1)
    monkeypatch.setattr(study, "_simulate", lambda *args: "exit 1 in each of 2 attempts: boom")
    monkeypatch.setattr(study, "seed_data",
                        lambda job, directory: _seed_data(directory, {"h1": 40, "h2": 60}))

    def pooled(job, data):
        raise ValueError("no training notes")

    monkeypatch.setattr(study, "pooled_measurement", pooled)
    monkeypatch.setattr(study, "central_dp_measurement", pooled)
    monkeypatch.setattr(study, "nearest_note_measurement",
                        lambda job, data: _measurement(NEAREST_NOTE, "non-private", job.seed, 0.3))
    result = study.run_study(plan, "privatune study", progress=lambda line: None)
    assert [(r.kind, r.budget, r.failure) for r in result.runs] == [
        ("simulate", "eps-8", "exit 1 in each of 2 attempts: boom"),
        ("simulate", "non-private", "exit 1 in each of 2 attempts: boom"),
        (SECURE, "eps-8", "exit 1 in each of 2 attempts: boom"),
        (CENTRAL_DP, "eps-8", "ValueError: no training notes"),
        ("pooled", "non-private", "ValueError: no training notes"),
        ("nearest-note", "non-private", None)]
    table = (tmp_path / "out" / "study.md").read_text()
    assert "| federated (DP FedAvg) | failed | failed |" in table
    assert "| secure DP-SGD (SecAgg+, aggregate guarantee) | failed | – |" in table
    assert "| all sites pooled, central DP-SGD (trusted curator) | failed | – |" in table
    assert "| nearest-note copy | – | 0.300 |" in table
    assert "- federated (DP FedAvg), ε = 8, seed 0: exit 1 in each of 2 attempts: boom" in table
    assert "- all sites pooled, no DP, non-private, seed 0: ValueError: no training notes" in table
    saved = json.loads((tmp_path / "out" / "study.json").read_text())
    assert saved["runs"][4]["failure"] == "ValueError: no training notes"
    # the copy is reused next time; the failed runs are tried again
    assert (tmp_path / "out" / "nearest-note" / "seed-0" / "result.json").is_file()
    assert not (tmp_path / "out" / "pooled" / "seed-0").exists()
    assert not (tmp_path / "out" / CENTRAL_DP / "eps-8" / "seed-0").exists()


# --------------------------------------------------------------------------- secure rows


def test_the_secure_rows_rate_is_a_typical_sites_and_its_union_batch_scales_with_every_record():
    # median of 40, 50, 60, 70 is 55: q = 16/55, union batch round(16/55 * 220) = 64
    assert secure_batch(16, [70, 40, 60, 50]) == SecureBatch(16 / 55, 64)
    # an odd count: median 20, q = 0.4, round(0.4 * 130) = 52
    assert secure_batch(8, [10, 100, 20]) == SecureBatch(0.4, 52)
    # a typical site smaller than the batch samples everything it has
    assert secure_batch(16, [8, 10]) == SecureBatch(1.0, 18)
    for counts in ([], [30, 0]):
        with pytest.raises(ValueError, match="every site needs training records"):
            secure_batch(16, counts)


def test_the_plan_runs_the_secure_row_as_the_columns_job_in_secure_mode(tmp_path):
    plan = plan_study(CONFIGS / "dpfedavg.yaml", tmp_path, (1.0, 8.0), seeds=1)
    batch = SecureBatch(0.25, 60)
    overrides = plan.secure_overrides(Budget(8.0), 0, batch)
    assert overrides == (*plan.job_overrides(Budget(8.0), 0), "federation.mode=secure_dpsgd",
                         "secure.calibrate=aggregate", "simulation.local_only_baseline=false",
                         "secure.sample_rate=0.25", "training.batch_size=60")
    federated, secure = plan.job(Budget(8.0), 0), plan.secure_job(Budget(8.0), 0, batch)
    assert (secure.federation.mode, secure.secure.calibrate, secure.secure.sample_rate,
            secure.training.batch_size) == ("secure_dpsgd", "aggregate", 0.25, 60)
    assert not secure.simulation.local_only_baseline
    assert secure.secure.min_contributions == 0  # the job's default t
    assert (secure.federation.rounds, secure.training.local_steps, secure.privacy.epsilon,
            secure.privacy.delta, secure.privacy.accountant) == (
        federated.federation.rounds, federated.training.local_steps, 8.0,
        federated.privacy.delta, federated.privacy.accountant)
    with pytest.raises(ConfigError, match="the study sets secure.sample_rate itself"):
        plan_study(CONFIGS / "dpfedavg.yaml", tmp_path, extra=("secure.sample_rate=0.5",))


def _secure_report(config: dict) -> dict:
    sites = {"h1": SiteSummary(final_perplexity=80.0, noise_multiplier=0.7,
                               final_generation=_generation(0.3, 0.5))}
    report = RunReport(run_id="s", config=config, base_model="m", sites=sites,
                       central=CentralSummary(final_perplexity=70.0,
                                              final_generation=_generation(0.2, 0.4)),
                       rounds=[RoundRecord(0), RoundRecord(1, training=RoundTraining(["h1"]))],
                       elapsed_s=12.0)
    return report.to_json()


def test_finished_secure_runs_are_reused_and_checked_against_the_seeds_batch(tmp_path,
                                                                              monkeypatch):
    from privatune.common.config import to_dict
    from privatune.simulations import study

    out = tmp_path / "out"
    plan = plan_study(CONFIGS / "smoke.yaml", out, (8.0,), seeds=1)
    counts = {"h1": 40, "h2": 60}
    batch = secure_batch(8, list(counts.values()))
    data = out / "data" / "seed-0"
    data.mkdir(parents=True)
    (data / "complete.json").write_text(json.dumps(
        {"sites": list(counts), "train_records": counts,
         "config": to_dict(plan.job(NON_PRIVATE, 0))}))
    report = out / SECURE / "eps-8" / "seed-0" / "run" / "report.json"
    report.parent.mkdir(parents=True)
    report.write_text(json.dumps(_secure_report(to_dict(plan.secure_job(Budget(8.0), 0, batch)))))
    central = out / CENTRAL_DP / "eps-8" / "seed-0" / "result.json"
    central.parent.mkdir(parents=True)
    central.write_text(json.dumps({
        "wall_s": 3.0, "measurement": {"setting": CENTRAL_DP, "budget": "eps-8", "seed": 0,
                                       "central": None, "sites": {"rouge_l": 0.25},
                                       "noise_multiplier": 0.9},
        "config": to_dict(plan.secure_job(Budget(8.0), 0, batch))}))
    simulated = []
    monkeypatch.setattr(study, "_simulate", lambda config, run, overrides, directory:
                        simulated.append(run) or "exit 1")
    def not_here(job, data):
        raise ValueError("not in this test")

    monkeypatch.setattr(study, "pooled_measurement", not_here)
    monkeypatch.setattr(study, "nearest_note_measurement", not_here)
    result = study.run_study(plan, "privatune study", progress=lambda line: None)
    assert report.parent not in simulated  # the finished secure run is not run again
    runs = {(r.kind, r.budget): r for r in result.runs}
    assert runs[(SECURE, "eps-8")].reused and runs[(SECURE, "eps-8")].failure is None
    assert runs[(SECURE, "eps-8")].overrides == plan.secure_overrides(Budget(8.0), 0, batch)
    assert runs[(CENTRAL_DP, "eps-8")].reused
    found = {(m.setting, m.budget): m for m in result.measurements}
    assert found[(SECURE, "eps-8")].sites.rouge_l == pytest.approx(0.3)
    assert found[(SECURE, "eps-8")].central.perplexity == pytest.approx(70.0)
    assert found[(CENTRAL_DP, "eps-8")].sites.rouge_l == pytest.approx(0.25)
    # the same report under another rate (the sites' counts changed; with two sites the union
    # batch stays 2 x 8) is another job's
    (data / "complete.json").write_text(json.dumps(
        {"sites": list(counts), "train_records": {"h1": 80, "h2": 60},
         "config": to_dict(plan.job(NON_PRIVATE, 0))}))
    with pytest.raises(ConfigError, match=r"secure/eps-8/seed-0/run/report.json was made by "
                                          r"another job \(it differs at secure.sample_rate\)"):
        study.check_reuse(plan)


def test_central_dpsgd_trains_the_pooled_way_with_the_accountants_noise(tmp_path, monkeypatch):
    from privatune.common import privacy
    from privatune.simulations import study_baselines

    plan = plan_study(CONFIGS / "smoke.yaml", tmp_path, (8.0,), seeds=1)
    job = plan.secure_job(Budget(8.0), 0, SecureBatch(0.25, 30))
    calls, trained = [], {}
    real = privacy.calibrate_noise_multiplier

    def calibrate(*args, **kwargs):
        calls.append((args, kwargs))
        return real(*args, **kwargs)

    def pooled_training(setting, budget, job, data, noise):
        trained.update(setting=setting, budget=budget, job=job, sigma=noise(120))
        return "measured"

    monkeypatch.setattr(privacy, "calibrate_noise_multiplier", calibrate)
    monkeypatch.setattr(study_baselines, "_pooled_training", pooled_training)
    data = _seed_data(tmp_path, {"h1": 50, "h2": 70})
    assert study_baselines.central_dp_measurement(job, data) == "measured"
    assert (trained["setting"], trained["budget"], trained["job"]) == (CENTRAL_DP, Budget(8.0),
                                                                       job)
    steps = job.federation.rounds * job.training.local_steps
    # 120 pooled units at the union batch of 30: Opacus samples at 1/ceil(120/30) = 0.25
    assert calls == [((8.0, job.privacy.delta, 0.25, steps),
                      {"accountant": job.privacy.accountant_name})]
    expected = real(8.0, job.privacy.delta, 0.25, steps, accountant=job.privacy.accountant_name)
    assert trained["sigma"] == max(expected, job.privacy.min_noise_multiplier) > 0
    # the pooled row is the same training with no noise
    assert study_baselines.pooled_measurement(plan.job(NON_PRIVATE, 0), data) == "measured"
    assert (trained["setting"], trained["budget"], trained["sigma"]) == (POOLED, NON_PRIVATE, 0.0)


def test_an_earlier_studys_outputs_still_read(summary, tmp_path):
    from privatune.simulations.study_baselines import saved_train_records

    plan, _, _ = summary
    # study.json as a study before the secure rows wrote it: no such rows, no train_records
    old = {"runs": [{"kind": "simulate", "budget": "eps-8", "seed": 0, "directory": "d",
                     "overrides": [], "wall_s": 60.0, "reused": False, "failure": None},
                    {"kind": "pooled", "budget": "non-private", "seed": 0, "directory": "d",
                     "overrides": [], "wall_s": 9.0, "reused": False, "failure": None}],
           "measurements": [{"setting": FEDERATED, "budget": "eps-8", "seed": 0,
                             "central": {"rouge_l": 0.2}, "sites": {"rouge_l": 0.3},
                             "sites_scored": ["h1"], "noise_multiplier": 0.8},
                            {"setting": POOLED, "budget": "non-private", "seed": 0,
                             "central": None, "sites": {"rouge_l": 0.5},
                             "noise_multiplier": 0.0}]}
    runs = [RunRecord(**{**r, "overrides": tuple(r["overrides"])}) for r in old["runs"]]
    measurements = [Measurement.from_json(m) for m in old["measurements"]]
    cells = summarise(plan, measurements, runs)
    table = render_markdown(plan, cells, runs, "privatune study", 70.0)
    assert "| federated (DP FedAvg) | n/a | 0.300 | n/a |" in table
    assert "| secure DP-SGD (SecAgg+, aggregate guarantee) | n/a | n/a | – |" in table
    assert "| all sites pooled, central DP-SGD (trusted curator) | n/a | n/a | – |" in table
    assert "| all sites pooled, no DP | – | – | 0.500 |" in table
    draw_plot(plan, cells, tmp_path / "study.png")
    # a seed's data written before the sites' counts were kept is written again on first use
    (tmp_path / "complete.json").write_text(json.dumps({"sites": ["h1"], "config": {}}))
    assert saved_train_records(tmp_path) is None


# --------------------------------------------------------------------------- end to end


@pytest.mark.e2e
def test_the_study_runs_end_to_end_on_the_smoke_federation_and_resumes(tmp_path, tiny_model_dir):
    out = tmp_path / "study"
    argv = ["study", "--config", str(CONFIGS / "smoke.yaml"), "--out", str(out), "--seeds", "1",
            "--epsilons", "8", "--set", f"model.base={tiny_model_dir}",
            "--set", f"model.cache_dir={tmp_path / 'cache'}",
            # 20 notes: as many as a site's policy needs before it releases a score
            "--set", "evaluation.max_examples=20"]
    assert main(argv) == 0
    study = json.loads((out / "study.json").read_text())
    assert [(r["kind"], r["budget"], r["failure"]) for r in study["runs"]] == [
        ("simulate", "eps-8", None), ("simulate", "non-private", None), (SECURE, "eps-8", None),
        (CENTRAL_DP, "eps-8", None), ("pooled", "non-private", None),
        ("nearest-note", "non-private", None)]
    assert all(r["wall_s"] > 0 for r in study["runs"][:5])
    cells = {(c["setting"], c["budget"]): c for c in study["cells"]}
    assert cells[(CENTRAL_DP, "eps-8")]["noise_multiplier"]["mean"] > 0
    for key in [(FEDERATED, "eps-8"), (FEDERATED, "non-private"), (LOCAL_ONLY, "eps-8"),
                (SECURE, "eps-8"), (CENTRAL_DP, "eps-8"), (POOLED, "non-private"),
                (NEAREST_NOTE, "non-private"), (BASE, "non-private")]:
        assert cells[key]["seeds"] == [0], key
        assert cells[key]["sites"]["rouge_l"] is not None, key
    assert cells[(POOLED, "non-private")]["central"]["perplexity"]["mean"] > 1
    assert cells[(FEDERATED, "non-private")]["noise_multiplier"]["mean"] < 0.1  # practically off
    table = (out / "study.md").read_text()
    assert "| setting | ε = 8 | non-private |" in table and "## Failed runs" not in table
    assert (out / "study.png").is_file()
    # the study's copy of the coordinator's notes is the one the federation was scored on
    assert ((out / "data" / "seed-0" / "central_eval.jsonl").read_text()
            == (out / "federated" / "eps-8" / "seed-0" / "run" / "central_eval.jsonl").read_text())

    assert main(argv) == 0  # again: every run is reused, the same figures come out
    again = json.loads((out / "study.json").read_text())
    assert all(r["reused"] for r in again["runs"])
    assert again["cells"] == study["cells"]
