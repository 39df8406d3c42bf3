"""``privatune simulate``: a whole federation of simulated hospitals on one machine.

Builds (or reuses) the base model and the simulated hospital exports, writes each site's own
policy file under ``<out>/sites/<site>/``, runs the ServerApp and ClientApps on Flower's
simulation engine, trains the local-only baseline of every site, and writes the report.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import multiprocessing
import os
import shutil
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import yaml

from privatune.client.app import make_client_app
from privatune.client.data import load_records
from privatune.client.node import SiteNode
from privatune.client.policy import load_site_policy
from privatune.common.model_source import resolve_base_model
from privatune.common.config import (ConfigError, JobConfig, MechanismSettings, SimulationConfig,
                                     load_job_config, with_overrides)
from privatune.common.generation import GenerationScores
from privatune.common.process_heap import keep_for_process_lifetime
from privatune.server.app import make_server_app
from privatune.server.checkpoints import checkpoint_to_resume
from privatune.server.coordinator import Coordinator
from privatune.server.coordinator_settings import CoordinatorSettings
from privatune.server.report import RunReport, SiteSummary
from privatune.server.report_files import write_report
from privatune.server.tracking import check_tracking
from privatune.simulations.hospitals import HospitalSpec, default_hospitals, generate_federation
from privatune.simulations.in_process import InProcessTransport


def write_site_policy(site_dir: Path, name: str, data: Path, model_dir: Path, job: JobConfig,
                      data_format: str = "fhir") -> Path:
    """The simulated hospital's own policy file (in a real federation the site writes it)."""
    site_dir.mkdir(parents=True, exist_ok=True)
    policy = {
        "site": {"name": name, "data": str(data.resolve()), "format": data_format,
                 "model": str(model_dir.resolve()), "state_dir": ".",
                 "heldout_fraction": job.data.heldout_fraction, "split_seed": job.seed},
        # the mechanism's settings as the job states them (one type, MechanismSettings), the
        # job's budget as the site's cap
        "privacy": {**{field.name: getattr(job.privacy, field.name)
                       for field in dataclasses.fields(MechanismSettings)},
                    "epsilon_cap": job.privacy.epsilon, "max_rounds": job.federation.rounds},
        "release": {"example_count": True, "train_loss": True, "eval_loss": True,
                    "generation_scores": True},
    }
    if job.federation.mode == "secure_dpsgd":
        # the simulated hospitals trust secure aggregation where the job's noise is sized for
        # the aggregate guarantee, and accept the job's t (a real site decides both itself)
        policy["secure_aggregation"] = {
            "trust": job.secure.calibrate == "aggregate",
            "min_contributions": job.secure.threshold(job.federation.min_nodes)}
    path = site_dir / "policy.yaml"
    path.write_text(yaml.safe_dump(policy, sort_keys=False), encoding="utf-8")
    return path


def write_central_eval(export: Path, out: Path) -> Path:
    """The coordinator's own held-out set: notes of a hospital outside the federation."""
    records = load_records(export, "fhir")
    with open(out, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps({"text": record.prompt + record.completion}) + "\n")
    return out


@dataclass(frozen=True)
class LocalOnlyResult:
    """A site's local-only model on its own held-out split: perplexity and generation scores."""

    perplexity: float | None
    generation: GenerationScores | None = None


def site_batch_size(job: JobConfig, train_units: int) -> int:
    """The expected batch a site of ``train_units`` draws a step in the job's federation.

    In DP FedAvg that is ``training.batch_size``; in secure DP-SGD ``training.batch_size`` is
    the union's, and each site samples at ``secure.sample_rate``, about q × its units.
    """
    if job.federation.mode == "secure_dpsgd":
        return max(1, round(job.secure.sample_rate * train_units))
    return job.training.batch_size


def local_only_result(policy_path: Path, scratch: Path, job: JobConfig, model_dir: Path,
                      run_id: str) -> LocalOnlyResult:
    """The same site training alone: the federation's round with this one node (same rounds,
    steps and budget), its final model evaluated like the final global model (perplexity, and
    generation scores when the job scores them).

    Uses a scratch ledger so the counterfactual does not touch the site's real ledger.
    """
    policy = load_site_policy(policy_path)
    node = SiteNode(replace(policy, site=replace(policy.site, state_dir=str(scratch.resolve()))))
    # a site alone has no one to share noise with: its baseline is local DP-SGD, whatever
    # the federation's mode, sampling its records as it does in the federation
    batch = site_batch_size(job, node.trained_units(job.loss_marker, job.judged_only))
    alone = with_overrides(job, ("federation.min_nodes=1", "federation.min_replies=1",
                                 "federation.mode=local_dp", "tracking=none",
                                 f"training.batch_size={batch}"),
                           f"{node.name}'s local-only job")
    settings = CoordinatorSettings(job=alone, model_dir=model_dir, out_dir=scratch / "coordinator",
                                   run_id=run_id, resume=False, sites=(node.name,),
                                   evaluate_each_round=False)
    report = Coordinator(settings, InProcessTransport([node]), progress=lambda line: None).run()
    site = report.sites.get(node.name, SiteSummary())
    return LocalOnlyResult(site.final_perplexity, site.final_generation)


def _start_baseline_worker(threads: int) -> None:
    """A local-only baseline's worker: its threads, and the lowest CPU priority, so that while
    the federation runs it takes only the cores the federation leaves idle.

    On Linux a process's nice value only ranks it within its scheduling group (autogroup, one
    per session), and Flower's node processes run in a session of their own: the worker opens
    its own session, and lowers that group's priority too. Where the system has none of this
    (no setsid, no autogroup) it runs at whatever priority it can get.
    """
    if hasattr(os, "setsid"):
        os.setsid()
        with contextlib.suppress(OSError):
            with open("/proc/self/autogroup", "w") as group:
                group.write("19")
    if hasattr(os, "nice"):
        os.nice(19)
    torch.set_num_threads(threads)


def baseline_start_method(threads: int) -> multiprocessing.context.BaseContext:
    """How baseline workers start: forked from this process when each runs one thread, so
    they inherit its imports (torch, transformers, PEFT, Opacus: about 4 CPU-seconds a process
    otherwise, measured in the demo); spawned otherwise.

    Why one thread only: GNU OpenMP, torch's thread pool on Linux, does not survive a fork.
    A forked child that enters a parallel region after this process used the pool hangs
    (seen here with 2 threads); at one thread torch never enters one. Nor does CUDA: once this
    process has initialised it, a forked child cannot use the GPU. Fork is Linux only.
    """
    if threads == 1 and sys.platform.startswith("linux") and not torch.cuda.is_initialized():
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context("spawn")


@contextlib.contextmanager
def local_only_baselines(policies: Sequence[Path], out: Path, job: JobConfig, model_dir: Path,
                         run_id: str, progress: Callable[[str], None] = print
                         ) -> Iterator[Callable[[], dict[str, LocalOnlyResult]]]:
    """Every site's local-only baseline, started on entry; the block gets a function that
    waits for their results.

    They need nothing from the federation, so they run while it does, at the lowest CPU
    priority (``_start_baseline_worker``): the cores the federation leaves idle (starting up,
    evaluating, waiting for the slowest node) go to the baselines, and they finish at full
    speed once it is done. The federation's rounds still slow down a little (cache and memory
    are shared); measured over the demo, interleaved runs, 2 cores: 88.6 to 90.5 s against
    91.9 to 95.7 s with the baselines after the federation. Like the virtual nodes, each
    worker process gets ``simulation.cpus_per_node`` threads, so small models run as several
    single-threaded trainings side by side rather than one multi-threaded training that leaves
    cores idle. If the block fails, the workers are stopped (in their own session, a Ctrl-C at
    the terminal does not reach them).
    """
    threads = max(int(job.simulation.cpus_per_node), 1)
    workers = max(1, min(len(policies), (os.cpu_count() or 1) // threads))
    names = [load_site_policy(path).site.name for path in policies]
    progress(f"local-only baselines: {', '.join(names)} each train alone with the same budget "
             f"({workers} at a time, in the background while the federation runs)")
    earlier = set(multiprocessing.active_children())
    context = baseline_start_method(threads)
    if context.get_start_method() == "fork":
        # frozen before the fork, the heap the workers inherit is not walked by their garbage
        # collections, which would write to (and so copy) the inherited pages: a forked demo
        # worker's first full collection took 0.33 CPU-s over 499k inherited objects, and
        # 0.01 s over its own 19k once the parent had frozen them
        keep_for_process_lifetime()
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=context,
                               initializer=_start_baseline_worker, initargs=(threads,))
    futures = {name: pool.submit(local_only_result, path, out / "baselines" / name, job,
                                 model_dir, run_id) for name, path in zip(names, policies)}
    started = [p for p in multiprocessing.active_children() if p not in earlier]
    try:
        yield lambda: {name: future.result() for name, future in futures.items()}
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        for process in started:
            process.terminate()
        raise
    pool.shutdown()


# what an earlier simulation leaves in its --out, any of which a new one must not mix with:
# site ledgers, the coordinator's checkpoints (a run whose every node failed has only these),
# the report
EARLIER_RUN = ("sites/*/ledger.jsonl", "checkpoints/round_*/state.json", "report.json")


def _prepare_out_dir(out: Path, overwrite: bool) -> None:
    """A simulation starts afresh: an earlier one in ``out`` is refused, or with
    ``overwrite`` deleted whole, never continued or mixed into."""
    found = sorted({str(path.relative_to(out)) for pattern in EARLIER_RUN
                    for path in out.glob(pattern)}) if out.is_dir() else []
    if found:
        if not overwrite:
            shown = ", ".join(found[:3]) + (f" and {len(found) - 3} more" if len(found) > 3 else "")
            raise ConfigError(f"{out} already holds a simulated federation ({shown}); choose "
                              "another --out or pass --overwrite to delete it")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def job_hospitals(job: JobConfig) -> tuple[list[HospitalSpec], HospitalSpec, Path]:
    """The job's simulated sites, the coordinator's own hospital (outside the federation) and
    the cache their exports are generated into."""
    specs = default_hospitals(job.data.hospitals + 1, job.seed, job.data.patients)
    coordinator = replace(specs[-1], name="coordinator-validation",
                          patients=job.data.central_eval_patients)
    return specs[:-1], coordinator, Path(job.model.cache_dir) / "hospitals"


def simulate(config_path: Path, out: Path, overrides: Sequence[str] = (), overwrite: bool = False,
             progress: Callable[[str], None] = print) -> RunReport:
    """Run the whole simulated federation and write ``report.json``, ``report.md``, ``report.png``."""
    started = time.monotonic()
    job = load_job_config(config_path, overrides)
    check_tracking(job.tracking)  # a missing tracking package stops here, not after the rounds
    if job.federation.min_nodes > job.data.hospitals:
        raise ConfigError(f"{config_path}: federation.min_nodes ({job.federation.min_nodes}) exceeds "
                          f"data.hospitals ({job.data.hospitals})")
    _prepare_out_dir(out, overwrite)
    model_dir = resolve_base_model(job.model, job.seed, progress)
    progress(f"base model: {model_dir}")

    sites, coordinator_spec, cache = job_hospitals(job)
    progress(f"simulated hospitals: {', '.join(s.name for s in sites)} (cache {cache})")
    exports = generate_federation([*sites, coordinator_spec], cache)
    central_eval = write_central_eval(exports[coordinator_spec.name], out / "central_eval.jsonl")
    policies = [write_site_policy(out / "sites" / s.name, s.name, exports[s.name], model_dir, job)
                for s in sites]

    report = simulate_sites(job, model_dir, policies, central_eval, out, progress, started)
    progress(f"done in {report.elapsed_s:.0f} s: {out / 'report.md'}")
    return report


def simulate_sites(job: JobConfig, model_dir: Path, policies: Sequence[Path],
                   central_eval: Path | None, out: Path,
                   progress: Callable[[str], None] = print,
                   started: float | None = None) -> RunReport:
    """Run the federation over existing site policy files on Flower's simulation engine.

    Writes and returns the report: the run summary plus each site's local-only baseline.
    """
    started = time.monotonic() if started is None else started
    run_id = f"sim-{job.seed}-{int(time.time())}"
    # a simulation is always a new run: checkpoints already in ``out`` are refused, not resumed
    settings = CoordinatorSettings(job=job, model_dir=model_dir, out_dir=out, run_id=run_id,
                                   central_eval=central_eval, resume=False,
                                   sites=tuple(load_site_policy(p).site.name for p in policies))
    checkpoint_to_resume(settings)  # refused here, not inside Flower's engine
    summaries: list[RunReport] = []
    server_app = make_server_app(lambda _context: settings, on_summary=summaries.append,
                                 progress=progress)
    client_app = make_client_app(lambda context: policies[int(context.node_config["partition-id"])])
    _quiet_environment(job.simulation.cpus_per_node)  # for the node and baseline processes
    with contextlib.ExitStack() as stack:
        baselines = (stack.enter_context(local_only_baselines(policies, out, job, model_dir,
                                                              run_id, progress))
                     if job.simulation.local_only_baseline else None)
        progress(f"starting Flower's simulation engine with {len(policies)} virtual nodes")
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if gpus and not job.simulation.gpus_per_node:
            progress(f"this machine has {gpus} CUDA GPU(s), but the virtual nodes see none: "
                     f"set simulation.gpus_per_node (0.5: two nodes per GPU) to train on them")
        _run_flower_simulation(server_app, client_app, len(policies), job.simulation)
        if not summaries:
            raise RuntimeError("the simulated federation did not finish (see the Flower log above)")
        report = summaries[0]
        if baselines is not None:
            progress("waiting for the local-only baselines")
            for name, result in baselines().items():
                site = report.sites.setdefault(name, SiteSummary())
                site.local_only_perplexity = result.perplexity
                site.local_only_generation = result.generation
    report.elapsed_s = round(time.monotonic() - started, 1)
    write_report(report, out)
    return report


def _hide_run_simulation_notice(record: logging.LogRecord) -> bool:
    """Drops Flower's notice that ``run_simulation`` is deprecated (see below why we use it)."""
    return "`run_simulation` function is deprecated" not in record.getMessage()


def _quiet_environment(cpus_per_node: float) -> None:
    """What the processes this one starts (Flower's node actors, the baseline workers) inherit:
    their threads, and the libraries' known warnings and progress bars off."""
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    # Ray would pin each node process to one thread; give it the cores it was allotted.
    os.environ.setdefault("OMP_NUM_THREADS", str(max(int(cpus_per_node), 1)))
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("PYTHONWARNINGS", "ignore::FutureWarning,ignore::DeprecationWarning")


def ray_backend_config(simulation: SimulationConfig) -> dict[str, Any]:
    """Flower's Ray backend settings: each virtual node's CPUs and GPUs (Ray shows a node only
    the GPUs it reserved for it, none at 0), and no dashboard."""
    return {"client_resources": {"num_cpus": simulation.cpus_per_node,
                                 "num_gpus": simulation.gpus_per_node},
            "init_args": {"num_cpus": max(os.cpu_count() or 1, int(simulation.cpus_per_node)),
                          "include_dashboard": False, "logging_level": logging.ERROR}}


def _run_flower_simulation(server_app: Any, client_app: Any, nodes: int,
                           simulation: SimulationConfig) -> None:
    """Flower's simulation engine (Ray backend), quietly: known warnings and DEBUG logs hidden.

    ``run_simulation`` is marked deprecated in Flower 1.42 in favour of ``flwr run`` against
    a local SuperLink; it is still Flower's in-process simulation engine and lets the apps be
    built from this job's objects rather than from an installed FAB.
    """
    from flwr.simulation import run_simulation

    # Opacus installs a root log handler at import; Flower's records (its DEBUG ones included)
    # would reach it too and print twice. Flower's own console handler shows what matters.
    flower_logger = logging.getLogger("flwr")
    flower_logger.propagate = False
    if _hide_run_simulation_notice not in flower_logger.filters:
        flower_logger.addFilter(_hide_run_simulation_notice)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        run_simulation(server_app=server_app, client_app=client_app, num_supernodes=nodes,
                       backend_config=ray_backend_config(simulation))
