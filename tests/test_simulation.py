"""End to end on Flower's simulation engine: 2 hospitals, 2 rounds, a tiny model, real Opacus."""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import sys
from concurrent.futures import ProcessPoolExecutor

import pytest
import yaml
import torch

from privatune.client.node import SiteNode
from privatune.client.policy import load_site_policy
from privatune.common.config import ConfigError, load_job_config
from privatune.common.ledger import SiteLedger
from privatune.common.config import LoraConfig
from privatune.common.lora import initial_adapter, load_adapter, lora_state
from privatune.common.plan import plan_site
from privatune.server.report import RunReport
from privatune.simulations.runner import (_start_baseline_worker, baseline_start_method,
                                          ray_backend_config, simulate_sites)
from tests.conftest import write_notes

JOB = """
seed: 3
model: {max_length: 48}
lora: {r: 2, alpha: 4, target_modules: [q_proj, v_proj]}
# the loss on whole notes: their template is what a 1-layer model surely learns in 16 DP steps
# (the completion alone, a few tokens a note, fell by too little to assert on every run)
training: {local_steps: 8, batch_size: 32, learning_rate: 0.05, max_grad_norm: 1.0, loss_on: note}
privacy: {epsilon: 8.0, delta: 1.0e-4}
federation: {rounds: 2, min_nodes: 2, min_replies: 2, node_wait_s: 60, round_timeout_s: 300}
evaluation: {max_new_tokens: 8, every_k_rounds: 2, max_examples: 8}
simulation: {cpus_per_node: 1, local_only_baseline: true}
"""


@pytest.fixture(scope="module")
def simulated_run(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("sim")
    (root / "job.yaml").write_text(JOB)
    job = load_job_config(root / "job.yaml")
    from tests.conftest import write_policy

    policies = [write_policy(root / "sites" / name, name,
                             write_notes(root / "data" / f"{name}.jsonl", records, seed),
                             tiny_model_dir)
                for name, records, seed in (("north", 100, 11), ("south", 140, 12))]
    for path in policies:  # these small sites release scores over their 8 generation tasks
        policy = yaml.safe_load(path.read_text())
        path.write_text(yaml.safe_dump({**policy, "release": {"min_records": 8}}))
    central = write_notes(root / "central.jsonl", 40, 99)
    report = simulate_sites(job, tiny_model_dir, policies, central, root / "run")
    return job, root, report, policies


@pytest.mark.e2e
def test_global_adapter_changed_and_is_loadable(simulated_run, tiny_model_dir):
    job, root, _, _ = simulated_run
    lora = LoraConfig(r=2, alpha=4, target_modules=("q_proj", "v_proj"))
    start = lora_state(initial_adapter(tiny_model_dir, lora, job.seed))
    final = lora_state(load_adapter(tiny_model_dir, root / "run" / "adapter"))
    assert set(final) == set(start)
    assert any(not torch.allclose(final[n], start[n]) for n in start)
    for round_number in (1, 2):
        checkpoint = root / "run" / "checkpoints" / f"round_{round_number:03d}"
        assert (checkpoint / "adapter" / "adapter_model.safetensors").is_file()
        assert json.loads((checkpoint / "state.json").read_text())["round"] == round_number


@pytest.mark.e2e
def test_epsilon_grows_each_round_and_stays_within_budget(simulated_run):
    _, _, report, policies = simulated_run
    for name in ("north", "south"):
        per_round = [r.epsilon[name] for r in report.rounds[1:]]
        assert 0 < per_round[0] < per_round[1] <= 8.0
        site = report.sites[name]
        assert site.epsilon == per_round[-1] and site.epsilon_budget == 8.0
        assert site.delta == 1e-4
    assert [r.participants for r in report.rounds[1:]] == [["north", "south"]] * 2


@pytest.mark.e2e
def test_heldout_loss_fell_at_every_site_and_centrally(simulated_run):
    _, _, report, _ = simulated_run
    for name, site in report.sites.items():
        assert site.final_perplexity < site.base_perplexity, name
        assert site.local_only_perplexity is not None
    assert report.central.final_perplexity < report.central.base_perplexity


@pytest.mark.e2e
def test_plan_matches_what_the_run_spent(simulated_run):
    job, _, _, policies = simulated_run
    for policy_path in policies:
        policy = load_site_policy(policy_path)
        units = len(SiteNode(policy).train_units)
        plan = plan_site(policy.site.name, units, job.training.batch_size, job.training.local_steps,
                         job.federation.rounds, policy.privacy.delta, epsilon=policy.privacy.epsilon_cap,
                         min_noise_multiplier=policy.privacy.min_noise_multiplier)
        spent = [e["epsilon"] for e in SiteLedger(policy.ledger_path).adapter_updates()]
        assert spent == pytest.approx(plan.epsilon_per_round, rel=1e-9)


@pytest.mark.e2e
def test_report_files_written(simulated_run):
    _, root, report, _ = simulated_run
    run = root / "run"
    for name in ("report.json", "report.md", "report.png"):
        assert (run / name).stat().st_size > 0
    saved = json.loads((run / "report.json").read_text())
    for field in ("base_perplexity", "final_perplexity", "local_only_perplexity", "epsilon",
                  "delta", "epsilon_budget"):
        assert field in saved["sites"]["north"]
    # the clinical scores next to rouge_l: centrally (with the cut-off count) and per site
    central = saved["central"]["final_generation"]
    assert {"rouge_l", "measurement_fidelity", "derivable_status_accuracy",
            "cut_off"} <= set(central)
    for name in ("base_generation", "final_generation", "local_only_generation"):
        assert "status_majority_share" in saved["sites"]["north"][name]
    assert RunReport.from_json(saved) == report  # report.json reads back as the same records


@pytest.mark.e2e
def test_generation_scores_centrally_at_sites_and_local_only(simulated_run):
    _, root, report, policies = simulated_run
    # rounds 0 (the base model) and 2 (every 2nd, also the last); not round 1
    assert [r.round for r in report.rounds if r.evaluation.global_generation] == [0, 2]
    central = report.central
    assert central.base_generation.examples == central.final_generation.examples == 8
    assert 0 <= central.final_generation.cut_off <= 8
    assert central.generation_tasks == 40 and not central.generation_skipped
    assert len(central.samples) == 3 and all(s.prompt.endswith("Assessment:") for s in central.samples)
    for name, site in report.sites.items():
        for scores in (site.base_generation, site.final_generation, site.local_only_generation):
            assert scores is not None and scores.examples == 8, name
            assert 0.0 <= scores.rouge_l <= 1.0 and 0.0 <= scores.chrf <= 100.0
            # the clinical scores of the same completions, with their counts (released here)
            clinical = scores.clinical
            assert clinical.completions == 8 and clinical.measurements_checked >= 0, name
            assert 0.0 <= clinical.repeat_4gram <= 1.0
            assert clinical.measurement_fidelity is None or 0.0 <= clinical.measurement_fidelity <= 1.0
    # each site listed what it released as a non-private release, in the round it was asked
    for policy_path in policies:
        entries = [e for e in SiteLedger(load_site_policy(policy_path).ledger_path).entries
                   if e.get("release") == "evaluate_metrics"]
        scored = [e["round"] for e in entries if {"rouge_l", "repeat_4gram"} <= set(e["values"])]
        assert scored == [0, 2] and all(e["private"] is False for e in entries)
    markdown = (root / "run" / "report.md").read_text()
    assert "## Generation" in markdown and "| north | local only |" in markdown
    assert "| set | model | ROUGE-L | fidelity | status vs majority |" in markdown
    assert "**Sample 3.** Prompt:" in markdown
    assert (root / "run" / "report_generation.png").stat().st_size > 0


@pytest.mark.skipif(not hasattr(os, "setsid"), reason="POSIX sessions")
def test_baseline_workers_take_only_idle_cores():
    """A local-only baseline's worker runs at the lowest priority, in a session (and, on Linux,
    a scheduling group) of its own, so the federation it runs beside keeps its cores."""
    with ProcessPoolExecutor(max_workers=1, mp_context=baseline_start_method(1),
                             initializer=_start_baseline_worker, initargs=(1,)) as pool:
        pid = pool.submit(os.getpid).result()
        assert pool.submit(os.getsid, 0).result() == pid != os.getsid(0)
        assert pool.submit(os.nice, 0).result() == 19
        assert pool.submit(torch.get_num_threads).result() == 1


def _matmul_sum(size: int) -> float:
    weights = torch.randn(size, size)
    return float((weights.bfloat16() @ weights.bfloat16()).float().sum() + (weights @ weights).sum())


def test_forked_baseline_workers_survive_this_process_thread_pool():
    """Single-threaded workers are forked, and still compute after this process used its
    OpenMP pool with several threads (a forked child that used the pool would hang); workers
    with several threads are spawned."""
    assert baseline_start_method(2).get_start_method() == "spawn"
    if not sys.platform.startswith("linux"):
        assert baseline_start_method(1).get_start_method() == "spawn"
        return
    assert baseline_start_method(1).get_start_method() == "fork"
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        _matmul_sum(512)  # the parent's pool now exists
        earlier = set(multiprocessing.active_children())
        pool = ProcessPoolExecutor(max_workers=1, mp_context=baseline_start_method(1),
                                   initializer=_start_baseline_worker, initargs=(1,))
        try:
            assert math.isfinite(pool.submit(_matmul_sum, 512).result(timeout=60))
        finally:
            for child in set(multiprocessing.active_children()) - earlier:
                child.kill()  # a hung worker would otherwise hold the suite
            pool.shutdown(wait=False, cancel_futures=True)
    finally:
        torch.set_num_threads(threads)


def test_virtual_nodes_get_the_gpus_the_job_reserves(tmp_path):
    """simulation.gpus_per_node reaches Ray's per-node resources (at 0 Ray hides the GPUs);
    a negative share is refused with its key."""
    config = tmp_path / "job.yaml"
    config.write_text("simulation: {cpus_per_node: 1, gpus_per_node: 0.5}\n")
    resources = ray_backend_config(load_job_config(config).simulation)["client_resources"]
    assert resources == {"num_cpus": 1, "num_gpus": 0.5}
    assert ray_backend_config(load_job_config(config, ["simulation.gpus_per_node=0"]).simulation
                              )["client_resources"]["num_gpus"] == 0
    with pytest.raises(ConfigError, match="simulation.gpus_per_node"):
        load_job_config(config, ["simulation.gpus_per_node=-1"])


def test_overwrite_starts_afresh_after_a_run_that_left_only_checkpoints(tmp_path):
    """A run whose every node failed leaves checkpoints and no ledgers: the same --out is
    refused without --overwrite (nothing deleted), and deleted whole with it, never resumed."""
    from privatune.simulations.runner import _prepare_out_dir

    out = tmp_path / "run"
    state = out / "checkpoints" / "round_001" / "state.json"
    state.parent.mkdir(parents=True)
    state.write_text("{}")
    with pytest.raises(ConfigError, match=r"already holds a simulated federation "
                                          r"\(checkpoints/round_001/state.json\); choose another "
                                          r"--out or pass --overwrite"):
        _prepare_out_dir(out, overwrite=False)
    assert state.read_text() == "{}"
    _prepare_out_dir(out, overwrite=True)
    assert out.is_dir() and not any(out.iterdir())


def test_a_simulation_never_resumes_checkpoints_left_in_its_out(tmp_path, tiny_model_dir):
    """Every simulation is a new run: another run's checkpoint in its directory is refused
    before Flower starts, and kept."""
    from privatune.server.checkpoints import ResumeRefused
    from tests.conftest import write_policy

    (tmp_path / "job.yaml").write_text(JOB)
    job = load_job_config(tmp_path / "job.yaml")
    policy = write_policy(tmp_path / "sites" / "north", "north",
                          write_notes(tmp_path / "north.jsonl", 20, 1), tiny_model_dir)
    state = tmp_path / "run" / "checkpoints" / "round_001" / "state.json"
    state.parent.mkdir(parents=True)
    state.write_text(json.dumps({"run_id": "sim-3-1", "round": 1, "rounds": [], "sites": {}}))
    kept = state.read_bytes()
    with pytest.raises(ResumeRefused, match=r"holds the checkpoints of run sim-3-1 \(after round "
                                            r"1\); run sim-3-\d+ is a new run"):
        simulate_sites(job, tiny_model_dir, [policy], None, tmp_path / "run")
    assert state.read_bytes() == kept
