"""The experiment command's pieces: its variants are valid jobs, and its figures are read
from real reports and ledgers and summarised correctly."""

from __future__ import annotations

import statistics
from pathlib import Path

import pytest

from privatune.common.config import load_job_config
from privatune.common.ledger import ADAPTER_UPDATE, SiteLedger
from privatune.common.privacy import MechanismStep, pld_epsilon, prv_epsilon, rdp_epsilon
from privatune.server.report import RoundEvaluation, RoundRecord, RoundTraining, RunReport, SiteSummary, write_report
from privatune.simulations.experiment import (VARIANTS, RunFigures, experiment_overrides,
                                              parse_variants, read_figures, render_markdown,
                                              summarise)

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v.name)
def test_every_variant_is_a_valid_demo_job(variant):
    job = load_job_config(CONFIGS / "demo.yaml", [*experiment_overrides(3), *variant.overrides])
    assert job.simulation.local_only_baseline is False
    for override in variant.overrides:
        key, value = override.split("=")
        section, name = key.split(".")
        assert str(getattr(getattr(job, section), name)) == value


def test_unknown_variant_is_refused_with_the_known_names():
    import argparse

    with pytest.raises(argparse.ArgumentTypeError, match="prv-ffa"):
        parse_variants("prv-fedavg,nonsense")
    assert [v.name for v in parse_variants("prv-ffa, rdp-fedavg")] == ["prv-ffa", "rdp-fedavg"]


def _figures(variant: str, repetition: int, ppl: float, site_ppl: float) -> RunFigures:
    return RunFigures(variant=variant, repetition=repetition, global_perplexity=ppl,
                      federated_perplexity=ppl + 1, site_perplexity={"h1": site_ppl, "h2": None},
                      epsilon={"h1": {"prv": 7.0, "rdp": 8.0, "pld": 7.01},
                               "h2": {"prv": 6.0, "rdp": 7.0, "pld": 6.01}},
                      noise_multiplier={"h1": 0.8, "h2": 1.0}, bytes_per_site_round=2048.0,
                      global_rouge_l=0.1, elapsed_s=60.0)


def test_summary_gives_mean_and_sample_sd_per_variant():
    runs = [_figures("a", 1, 100.0, 50.0), _figures("b", 1, 90.0, 40.0),
            _figures("a", 2, 110.0, 70.0), _figures("a", 3, 120.0, 60.0)]
    a, b = summarise(runs)
    assert (a.variant, a.runs, b.runs) == ("a", 3, 1)
    assert a.global_perplexity.mean == pytest.approx(110.0)
    assert a.global_perplexity.sd == pytest.approx(statistics.stdev([100.0, 110.0, 120.0]))
    assert a.site_perplexity["h1"].mean == pytest.approx(60.0)
    assert a.site_perplexity["h2"] is None  # never released: no figure, not a zero
    assert b.global_perplexity.sd == 0.0
    assert a.noise_multiplier.mean == pytest.approx(0.9)
    table = render_markdown([a, b], "privatune experiment --config x")
    assert "| a | 3 | 110.0 ± 10.0 |" in table
    assert "6.00–7.00" in table and "7.00–8.00" in table  # PRV and RDP ranges over sites
    assert "| b | 60.0 ± 0.0 |" not in table and "| b | 40.0 ± 0.0 | – |" in table


def test_figures_are_read_from_the_report_and_recomputed_from_each_ledger(tmp_path):
    steps = [MechanismStep(0.9, 1 / 12, 30), MechanismStep(0.9, 1 / 12, 30)]
    ledger = SiteLedger(tmp_path / "sites" / "h1" / "ledger.jsonl")
    for number, step in enumerate(steps, start=1):
        ledger.append(ADAPTER_UPDATE, {"run_id": "r", "round": number, "privacy_unit": "record",
                                       "noise_multiplier": step.noise_multiplier,
                                       "sample_rate": step.sample_rate, "steps": step.steps,
                                       "max_grad_norm": 1.0, "accountant": "opacus-prv",
                                       "epsilon": 1.0, "delta": 1e-5})
    rounds = [RoundRecord(0, RoundEvaluation(global_perplexity=500.0))]
    for number in (1, 2):
        rounds.append(RoundRecord(number, RoundEvaluation(global_perplexity=300.0 - number,
                                                          federated_perplexity=250.0,
                                                          site_perplexity={"h1": 240.0}),
                                  RoundTraining(participants=["h1"], aggregated=True,
                                                bytes_sent=4000, bytes_received=1000 * number)))
    report = RunReport(run_id="r", config={"privacy": {"delta": 1e-5}}, base_model="m",
                       rounds=rounds, sites={"h1": SiteSummary(epsilon=1.0, delta=1e-5,
                                                               noise_multiplier=0.9)},
                       elapsed_s=12.0)
    write_report(report, tmp_path)
    figures = read_figures(tmp_path, "prv-fedavg", 1)
    assert figures.global_perplexity == 298.0 and figures.site_perplexity == {"h1": 240.0}
    assert figures.bytes_per_site_round == pytest.approx(1500.0)
    assert figures.epsilon["h1"]["prv"] == pytest.approx(prv_epsilon(steps, 1e-5))
    assert figures.epsilon["h1"]["rdp"] == pytest.approx(rdp_epsilon(steps, 1e-5))
    assert figures.epsilon["h1"]["pld"] == pytest.approx(pld_epsilon(steps, 1e-5))
    assert figures.epsilon["h1"]["prv"] < figures.epsilon["h1"]["rdp"]
