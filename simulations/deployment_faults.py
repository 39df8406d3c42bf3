"""Fault-tolerance figures of a real deployment, measured on one machine.

Each scenario builds a fresh federation on loopback exactly as a coordinator and three
hospitals would: a SuperLink with TLS, SuperNode authentication and a state database
(``privatune coordinator --serve``), three hospital SuperNodes (``privatune node``), each a
process group of its own, and the job submitted with ``privatune coordinator``. Scenarios:

- ``baseline``: uninterrupted run.
- ``node-killed``: one hospital's whole process group is SIGKILLed during round 2; the run
  must finish with the other two (``min_replies: 2``).
- ``coordinator-killed``: the ServerApp process running the job and the ``privatune
  coordinator`` process following it are SIGKILLed during round 2, after at least one site
  wrote its round-2 release; ``privatune coordinator`` is then started again on the same
  output directory and must resume from the last checkpoint.
- ``superlink-restarted``: the ``flower-superlink`` process is SIGKILLed during round 2 (a
  crash) and ``privatune coordinator --serve`` is started again on the same port and state
  database, as a service manager would. Measured: whether the nodes reconnect, whether the
  run goes on by itself, and if not, whether ``privatune coordinator`` started again resumes
  it from the last checkpoint.
- ``disk-full``: after round 1, the file size limit (``RLIMIT_FSIZE``) of one hospital's
  processes is set a few bytes past its ledger's length, so its next ledger append fails
  part-way (EFBIG, as on a full disk). That site must decline with the reason, send no
  update, keep a ledger that verifies, and the run must finish with the other two.

Afterwards every site's epsilon in ``report.json`` is compared with what its own ledger says
(``SiteLedger.epsilon``) and each ledger is audited (``common.audit``). The summary goes to
``<out>/faults.md`` and ``<out>/faults.json``; process logs stay under
``<out>/<scenario>/logs``.

Usage: ``privatune fault-drill --out runs/faults`` (all scenarios; ``--scenario NAME`` for one;
``fault_drill`` runs them, ``fault_report`` writes the summary).
Sizes are the smallest that still train (a tiny model, 120 notes per site): the time is
dominated by Flower starting one ClientApp process (torch, Opacus) per message.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from privatune.common.audit import audit_path
from privatune.common.base_model import BaseModelSpec
from privatune.common.ledger import SiteLedger, read_entries
from privatune.common.ledger_records import AdapterRelease, NonPrivateRelease, record_of
from privatune.simulations.loopback import DELTA, LoopbackFederation, Proc
from privatune.simulations.processes import (descendants, kill, limit_file_size, serverapp_pids,
                                            tool_pids)

SITES = ("alpha", "beta", "gamma")
VICTIM = "gamma"  # the hospital killed in node-killed, whose disk fills in disk-full
SCENARIOS = ("baseline", "node-killed", "coordinator-killed", "superlink-restarted", "disk-full")
NOTES_PER_SITE = 120  # with batch 16, 6 DP steps and lr 0.1 the held-out perplexity visibly falls

TINY_MODEL = BaseModelSpec(vocab_size=384, hidden_size=32, layers=1, heads=2, intermediate_size=64,
                           max_positions=128, pretrain_steps=20, pretrain_batch_size=8,
                           pretrain_seq_len=64, corpus_max_bytes=150_000)
"""Just big enough to train: the figures are about fault handling, not model quality."""

DIAGNOSES = ("community-acquired pneumonia", "urosepsis", "decompensated heart failure",
             "acute asthma", "diabetic ketoacidosis", "ischaemic stroke")
ACTIONS = ("IV antibiotics", "insulin infusion", "IV furosemide", "nebulised salbutamol",
           "thrombolysis review", "discharge with GP follow-up")


def log(text: str) -> None:
    """Progress with a wall-clock stamp, flushed so a piped log keeps pace."""
    print(f"{time.strftime('%H:%M:%S')} {text}", flush=True)


# --------------------------------------------------------------------------- set-up


def clinical_notes(path: Path, count: int, seed: int) -> Path:
    """Short templated discharge notes: enough structure that loss falls within a few steps."""
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        for i in range(count):
            diagnosis, action = rng.choice(DIAGNOSES), rng.choice(ACTIONS)
            text = (f"Admitted with {diagnosis}. Pulse {rng.randint(55, 125)}, temperature "
                    f"{rng.randint(36, 39)} C. Impression: {diagnosis}. Plan: {action}.")
            handle.write(json.dumps({"text": text, "patient_id": f"s{seed}-p{i // 2}"}) + "\n")
    return path


def prepare(root: Path, model_dir: Path, round_timeout_s: int, rounds: int) -> LoopbackFederation:
    """Certificates, hospital keys, data, site policies, job and deployment files."""
    if root.exists():
        shutil.rmtree(root)  # fresh ledgers and SuperLink state: scenarios must not mix
    fed = LoopbackFederation(root=root, model_dir=model_dir)
    fed.make_certs()
    for seed, name in enumerate(SITES, start=1):
        fed.add_site(name, clinical_notes(root / "data" / f"{name}.jsonl", NOTES_PER_SITE, seed))
    fed.write_job(rounds=rounds, round_timeout_s=round_timeout_s, local_steps=6, batch_size=16,
                  learning_rate=0.1)
    fed.write_deployment(central_eval=clinical_notes(root / "data" / "central-heldout.jsonl", 48, 99))
    return fed


def start_federation(fed: LoopbackFederation) -> None:
    """SuperLink (long-lived, like under systemd) and the three hospital nodes, all online."""
    fed.start_superlink(120)
    for name in SITES:
        fed.start_node(name)
    fed.wait_online(len(SITES), timeout_s=180)
    log(f"federation up: SuperLink {fed.address}, nodes {', '.join(SITES)}")


def finish(process: Proc, timeout_s: float) -> int:
    """Wait for a coordinator run; a run past ``timeout_s`` is an error, not a hang."""
    code = process.wait(timeout_s)
    if code is None:
        process.stop()
        raise RuntimeError(f"{process.name} still running after {timeout_s:g} s; see "
                           f"{process.log_path}")
    return code


# --------------------------------------------------------------------------- measurements


def read_report(fed: LoopbackFederation) -> dict[str, Any]:
    path = fed.out / "report.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def ledger_rounds(fed: LoopbackFederation, site: str) -> list[list[Any]]:
    """(run id, round, first 12 hex digits of the update's SHA-256) of every adapter update
    the site's ledger holds, in order: a round sent twice shows whether the second release
    was a new one or a bit-identical copy. Read-only
    (``read_entries``): opening a live ledger with ``SiteLedger`` would set aside a line the
    node is still writing."""
    entries, _ = read_entries(fed.ledger(site))
    return [[r.run_id, r.round, (r.update_sha256 or "")[:12]]
            for r in map(record_of, entries) if isinstance(r, AdapterRelease)]


def site_figures(fed: LoopbackFederation, report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per site: epsilon the report shows vs the ledger's own figure, releases, audit."""
    sites = report.get("sites", {})
    figures = {}
    for name in SITES:
        ledger_eps = SiteLedger(fed.ledger(name)).epsilon(DELTA)
        report_eps = sites.get(name, {}).get("epsilon")
        audit = audit_path(fed.ledger(name))[0]
        figures[name] = {
            "epsilon_report": report_eps,
            "epsilon_ledger": ledger_eps,
            "epsilon_match": report_eps is not None and math.isclose(report_eps, ledger_eps,
                                                                     rel_tol=1e-9, abs_tol=1e-12),
            "rounds_in_report": sites.get(name, {}).get("rounds_participated", []),
            "ledger_releases": ledger_rounds(fed, name),
            # releases the site paid for that no aggregated round of the report shows
            # (a round lost in a crash, an update sent by a node killed before it arrived)
            "releases_not_in_report": (len(ledger_rounds(fed, name))
                                       - len(sites.get(name, {}).get("rounds_participated", []))),
            "audit": "PASS" if audit.ok else "FAIL",
            "audit_problems": ([audit.chain_error] if audit.chain_error else []) + audit.problems,
            "audit_recomputed_epsilon": audit.recomputed_epsilon,
        }
    return figures


def run_figures(fed: LoopbackFederation, report: dict[str, Any]) -> dict[str, Any]:
    """Round-by-round perplexity and who took part, from report.json."""
    rounds = report.get("rounds", [])
    return {
        "run_id": report.get("run_id"),
        "rounds_completed": max((r["round"] for r in rounds), default=0),
        "global_perplexity": {str(r["round"]): r.get("global_perplexity") for r in rounds},
        "final_global_perplexity": report.get("central", {}).get("final_perplexity"),
        "participants": {str(r["round"]): r.get("participants", []) for r in rounds},
        "aggregated": {str(r["round"]): r.get("aggregated") for r in rounds if r["round"] > 0},
        "declined": {str(r["round"]): r.get("declined", {}) for r in rounds if r.get("declined")},
        "failures": {str(r["round"]): len(r.get("failures", []))
                     + len(r.get("evaluation_failures", [])) for r in rounds},
    }


def round_times(process: Proc) -> dict[str, float]:
    """Seconds from the coordinator's start to each '[round N] global perplexity' line."""
    times = {}
    with open(process.log_path, encoding="utf-8") as handle:
        for line in handle:
            if "] global perplexity" in line and "[round " in line:
                stamp = float(line.split("s ", 1)[0])
                number = line.split("[round ", 1)[1].split("]", 1)[0]
                times.setdefault(number, stamp)
    return times


# --------------------------------------------------------------------------- scenarios


def scenario_baseline(fed: LoopbackFederation, budget_s: float) -> dict[str, Any]:
    """Uninterrupted run: the reference for wall time, perplexity and epsilon."""
    coordinator = fed.start_coordinator()
    code = finish(coordinator, budget_s)
    report = read_report(fed)
    return {"exit_code": code, "wall_s": coordinator.seconds(),
            "round_end_s": round_times(coordinator),
            **run_figures(fed, report), "sites": site_figures(fed, report)}


def scenario_node_killed(fed: LoopbackFederation, budget_s: float) -> dict[str, Any]:
    """SIGKILL the victim hospital's process group (SuperNode, SuperExec, ClientApps) as
    soon as round 2's training requests go out: the machine is gone, mid-round."""
    coordinator = fed.start_coordinator()
    coordinator.wait_for(f"[round 2/{fed.rounds}] training at", budget_s)
    fed.nodes[VICTIM].kill_group(signal.SIGKILL)
    killed_at = coordinator.seconds()
    log(f"killed {VICTIM} (process group {fed.nodes[VICTIM].popen.pid}) at {killed_at:.1f} s")
    code = finish(coordinator, budget_s)
    report = read_report(fed)
    return {"exit_code": code, "wall_s": coordinator.seconds(), "killed_site": VICTIM,
            "killed_at_s": killed_at, "round_end_s": round_times(coordinator),
            "killed_site_rounds": (report.get("sites", {}).get(VICTIM, {})
                                   .get("rounds_participated")),
            **run_figures(fed, report), "sites": site_figures(fed, report)}


def wait_for_release(fed: LoopbackFederation, round_number: int, timeout_s: float) -> list[str]:
    """Sites whose ledger holds a release for ``round_number``, once at least one does."""
    deadline = time.monotonic() + timeout_s
    while True:
        done = [s for s in SITES if any(r[1] == round_number for r in ledger_rounds(fed, s))]
        if done or time.monotonic() > deadline:
            return done
        time.sleep(0.5)


def scenario_coordinator_killed(fed: LoopbackFederation, budget_s: float) -> dict[str, Any]:
    """SIGKILL the ServerApp running the job and the ``privatune coordinator`` following it
    in round 2, after a site has released its round-2 update (the release is spent but
    never aggregated); then start ``privatune coordinator`` again on the same out dir."""
    first = fed.start_coordinator("coordinator-1")
    first.wait_for(f"[round 2/{fed.rounds}] training at", budget_s)
    released = wait_for_release(fed, 2, fed.round_timeout_s)
    pids = serverapp_pids(fed.port)
    kill(pids)
    first.kill_group(signal.SIGKILL)
    killed_at = first.seconds()
    run_ids = [line.split("submitted run ", 1)[1].split()[0] for line in first.lines
               if "submitted run " in line]
    checkpoints = sorted(p.parent.name
                         for p in (fed.out / "checkpoints").glob("round_*/state.json"))
    log(f"killed ServerApp pids {pids} and coordinator at {killed_at:.1f} s; round-2 releases "
        f"already in ledgers of {released}; checkpoints on disk: {checkpoints}")
    if not pids:
        raise RuntimeError(f"no flwr-serverapp process found for port {fed.port}")
    releases_at_kill = {s: ledger_rounds(fed, s) for s in SITES}

    second = fed.start_coordinator("coordinator-2")
    code = finish(second, budget_s)
    resumed = [line for line in second.lines if "resuming run" in line]
    report = read_report(fed)
    old_status = flower_run_status(fed, run_ids[0]) if run_ids else "unknown"
    return {"exit_code": code, "wall_s": killed_at + second.seconds(),
            "first_attempt_s": killed_at, "resumed_attempt_s": second.seconds(),
            "killed_serverapp_pids": pids, "killed_run_id": run_ids[0] if run_ids else None,
            "killed_run_final_status": old_status,
            "checkpoints_at_kill": checkpoints, "round2_released_before_kill": released,
            "ledger_releases_at_kill": releases_at_kill,
            "resumed_line": resumed[0].strip() if resumed else None,
            "round_end_s_resumed": round_times(second),
            **run_figures(fed, report), "sites": site_figures(fed, report)}


def flower_run_status(fed: LoopbackFederation, run_id: str) -> str:
    """Flower's final status of the killed run (it should not be 'running' forever)."""
    from privatune.server.runs import run_status

    try:
        return run_status(fed.deployment(), int(run_id))
    except Exception as err:  # a measurement, not a check: record why it is unknown
        return f"unknown ({err})"


def scenario_superlink_restarted(fed: LoopbackFederation, budget_s: float) -> dict[str, Any]:
    """SIGKILL the ``flower-superlink`` process in round 2 and start ``privatune coordinator
    --serve`` again on the same port and database; then see what the run does by itself
    (within ``watch_s``), and resume it with ``privatune coordinator`` if it did not finish."""
    watch_s = min(budget_s, 3 * fed.round_timeout_s)
    started = time.monotonic()
    first = fed.start_coordinator("coordinator-1")
    first.wait_for(f"[round 2/{fed.rounds}] training at", budget_s)
    links = tool_pids("flower-superlink", fed.port)
    if not links:
        raise RuntimeError(f"no flower-superlink process found for port {fed.port}")
    kill(links)
    killed_at = first.seconds()
    time.sleep(3)
    result: dict[str, Any] = {
        "killed_superlink_pids": links, "killed_at_s": killed_at,
        "serverapp_alive_after_kill": serverapp_pids(fed.port),
        "coordinator_1_exit_after_kill": first.popen.poll()}
    log(f"killed the SuperLink {links} at {killed_at:.1f} s; ServerApp processes still alive: "
        f"{result['serverapp_alive_after_kill']}")
    fed.start_superlink(120, name="superlink-2")
    result["superlink_back_at_s"] = first.seconds()
    try:
        fed.wait_online(len(SITES), timeout_s=180)
        result["nodes_online_again_at_s"] = first.seconds()
    except Exception as err:  # a measurement: record that they did not come back
        result["nodes_online_again_at_s"] = f"not within 180 s ({err})"
    log(f"SuperLink back at {result['superlink_back_at_s']:.1f} s; nodes online again: "
        f"{result['nodes_online_again_at_s']}")
    code = first.wait(max(1.0, watch_s - (first.seconds() - killed_at)))
    result["coordinator_1_exit"] = code if code is not None else f"still running after {watch_s:g} s"
    result["coordinator_1_last_lines"] = first.lines[-6:]
    result["run_finished_by_itself"] = code == 0
    if code != 0:
        first.stop()
        result["serverapp_alive_before_resume"] = stale = serverapp_pids(fed.port)
        kill(stale)  # a second writer of the same out dir must not race the resumed run
        second = fed.start_coordinator("coordinator-2")
        code = finish(second, budget_s)
        resumed = [line for line in second.lines if "resuming run" in line]
        result.update({"resumed_line": resumed[0].strip() if resumed else None,
                       "resumed_attempt_s": second.seconds(),
                       "round_end_s_resumed": round_times(second)})
    run_ids = [line.split("submitted run ", 1)[1].split()[0] for line in first.lines
               if "submitted run " in line]
    if run_ids:
        result["killed_run_id"] = run_ids[0]
        result["killed_run_final_status"] = flower_run_status(fed, run_ids[0])
    report = read_report(fed)
    return {**result, "exit_code": code, "wall_s": time.monotonic() - started,
            **run_figures(fed, report), "sites": site_figures(fed, report)}


LEDGER_PADDING = 65_536
"""Bytes of an earlier history put in the full site's ledger first, so that the ledger is the
largest file its processes write: a file size limit just past it then fails the ledger's
appends and nothing else (Flower extracts the app, files of up to ~25 KB, for every message;
with a limit below that, the first try of this scenario, every ClientApp failed there)."""


def scenario_disk_full(fed: LoopbackFederation, budget_s: float) -> dict[str, Any]:
    """After round 1, limit the file size of the victim hospital's processes to its ledger's
    length + 10 bytes: its round-2 ledger append fails part-way, as on a full disk."""
    SiteLedger(fed.ledger(VICTIM)).append_record(NonPrivateRelease(
        release="note", run_id="earlier", round=0, values={"padding": "x" * LEDGER_PADDING}))
    coordinator = fed.start_coordinator()
    coordinator.wait_for("[round 1] global perplexity", budget_s)
    ledger = fed.ledger(VICTIM)
    limit = ledger.stat().st_size + 10
    limited = limit_file_size(descendants(fed.nodes[VICTIM].popen.pid), limit)
    entries_before = len(read_entries(ledger)[0])
    log(f"{VICTIM}: file size limit {limit} bytes (ledger {limit - 10} bytes, "
        f"{entries_before} entries) on pids {limited}")
    code = finish(coordinator, budget_s)
    report = read_report(fed)
    entries, torn = read_entries(ledger)
    declines = {r["round"]: r.get("declined", {}).get(VICTIM) for r in report.get("rounds", [])
                if r["round"] >= 2}
    eval_declines = {r["round"]: r.get("evaluation_declined", {}).get(VICTIM)
                     for r in report.get("rounds", []) if r["round"] >= 2}
    return {"exit_code": code, "wall_s": coordinator.seconds(), "full_site": VICTIM,
            "file_size_limit": limit, "limited_pids": limited,
            "ledger_entries_at_limit": entries_before, "ledger_entries_after": len(entries),
            "ledger_torn_line": torn, "side_files": sorted(p.name for p in
                                                           ledger.parent.glob("ledger.jsonl.torn-*")),
            "full_site_train_declines": declines, "full_site_evaluation_declines": eval_declines,
            "full_site_updates_in_ledger": [r.round for r in map(record_of, entries)
                                            if isinstance(r, AdapterRelease)],
            "round_end_s": round_times(coordinator),
            **run_figures(fed, report), "sites": site_figures(fed, report)}


SCENARIO_FUNCTIONS: dict[str, Callable[[LoopbackFederation, float], dict[str, Any]]] = {
    "baseline": scenario_baseline,
    "node-killed": scenario_node_killed,
    "coordinator-killed": scenario_coordinator_killed,
    "superlink-restarted": scenario_superlink_restarted,
    "disk-full": scenario_disk_full,
}


def run_scenario(name: str, out: Path, model_dir: Path, round_timeout_s: int, rounds: int,
                 budget_s: float) -> dict[str, Any]:
    """Fresh federation, one scenario, everything stopped afterwards (also on errors)."""
    fed = prepare(out / name, model_dir, round_timeout_s, rounds)
    log(f"scenario {name}: {fed.root}")
    try:
        start_federation(fed)
        result = SCENARIO_FUNCTIONS[name](fed, budget_s)
    except Exception as err:
        result = {"error": f"{type(err).__name__}: {err}"}
        log(f"scenario {name} FAILED: {err}")
    finally:
        fed.stop()
    result.update({"scenario": name, "rounds_planned": rounds, "round_timeout_s": round_timeout_s,
                   "dir": str(fed.root)})
    if "sites" not in result and any(fed.ledger(s).is_file() for s in SITES):
        result["sites"] = site_figures(fed, read_report(fed))
    return result


# --------------------------------------------------------------------------- summary
