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

Usage: ``privatune fault-drill --out runs/faults`` (all scenarios; ``--scenario NAME`` for one).
Sizes are the smallest that still train (a tiny model, 120 notes per site): the time is
dominated by Flower starting one ClientApp process (torch, Opacus) per message.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
import shutil
import signal
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from privatune.common.audit import audit_path
from privatune.common.base_model import BaseModelSpec, ensure_base_model
from privatune.common.ledger import ADAPTER_UPDATE, NON_PRIVATE, SiteLedger, read_entries
from privatune.simulations.loopback import DELTA, LoopbackFederation, Proc

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


# --------------------------------------------------------------------------- processes


def _processes() -> dict[int, tuple[int, list[str]]]:
    """Every process now: pid -> (parent pid, argv)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        found[int(entry.name)] = (int(stat.rsplit(")", 1)[1].split()[1]), argv)
    return found


def tool_pids(tool: str, superlink_port: int) -> list[int]:
    """PIDs of a Flower tool's processes serving or attached to OUR SuperLink (matched by its
    port: other people's SuperLinks may run on this machine at the same time)."""
    return sorted(pid for pid, (_, argv) in _processes().items()
                  if any(Path(a).name == tool for a in argv[:2])
                  and any(a == str(superlink_port) or a.endswith(f":{superlink_port}")
                          for a in argv))


def serverapp_pids(superlink_port: int) -> list[int]:
    return tool_pids("flwr-serverapp", superlink_port)


def descendants(root: int) -> list[int]:
    """``root`` and every process below it (a SuperNode, its SuperExec and ClientApps)."""
    children: dict[int, list[int]] = {}
    for pid, (parent, _) in _processes().items():
        children.setdefault(parent, []).append(pid)
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += children.get(pid, [])
    return sorted(found)


def limit_file_size(pids: Sequence[int], limit: int) -> list[int]:
    """Set the soft file size limit of running processes (their children inherit it); Python
    ignores SIGXFSZ, so a write past the limit fails with EFBIG. Returns those it was set on."""
    done = []
    for pid in pids:
        try:
            hard = resource.prlimit(pid, resource.RLIMIT_FSIZE)[1]
            resource.prlimit(pid, resource.RLIMIT_FSIZE, (limit, hard))
        except (ProcessLookupError, PermissionError):
            continue
        done.append(pid)
    return done


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
    return [[e.get("run_id"), e.get("round"), str(e.get("update_sha256", ""))[:12]]
            for e in entries if e["kind"] == ADAPTER_UPDATE]


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


def kill(pids: Sequence[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


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
    SiteLedger(fed.ledger(VICTIM)).append(NON_PRIVATE, {
        "run_id": "earlier", "round": 0, "release": "note",
        "values": {"padding": "x" * LEDGER_PADDING}})
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
            "full_site_updates_in_ledger": [e["round"] for e in entries
                                            if e["kind"] == ADAPTER_UPDATE],
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


def _num(value: Any, digits: int = 3) -> str:
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) else "n/a"


def _after_round(line: str | None) -> str:
    """'after round N' of a coordinator's 'resuming run ... after round N from ...' line."""
    return ("resumed after " + line.split(" from ", 1)[0].split(" after ", 1)[1]) if line else "no resume"


def outcome(name: str, r: dict[str, Any]) -> str:
    """What happened in a scenario, in one table cell."""
    if "error" in r:
        return "-"
    if name == "node-killed":
        return (f"{r['killed_site']} killed at {r['killed_at_s']:.0f} s; in rounds "
                f"{r.get('killed_site_rounds')}")
    if name == "coordinator-killed":
        return f"killed at {r['first_attempt_s']:.0f} s; restarted: {_after_round(r.get('resumed_line'))}"
    if name == "superlink-restarted":
        online = r.get("nodes_online_again_at_s")
        online = f"{online:.0f} s" if isinstance(online, (int, float)) else str(online)
        return (f"killed at {r['killed_at_s']:.0f} s, back at {r['superlink_back_at_s']:.0f} s; "
                f"nodes online again at {online}; run went on by itself: "
                f"{'yes' if r.get('run_finished_by_itself') else 'no'} (first coordinator: "
                f"exit {r.get('coordinator_1_exit')}); restarted coordinator: "
                f"{_after_round(r.get('resumed_line')) if 'resumed_attempt_s' in r else 'not needed'}")
    if name == "disk-full":
        reasons = {v for v in r.get("full_site_train_declines", {}).values() if v}
        return (f"{r['full_site']}: appends fail from round 2; train declined in rounds "
                f"{[int(k) for k, v in r.get('full_site_train_declines', {}).items() if v]}"
                f" ({'; '.join(sorted(reasons)) or 'no reason'}); its ledger holds updates of "
                f"rounds {r.get('full_site_updates_in_ledger')}, torn line: "
                f"{'none' if not r.get('ledger_torn_line') else 'YES'}, side files: "
                f"{len(r.get('side_files', []))}")
    return "uninterrupted"


def summary_markdown(results: dict[str, dict[str, Any]], command: str) -> str:
    """The table the issue asks for, plus the checks behind it."""
    lines = ["# Deployment fault tolerance", "",
             f"Measured with `{command}` (3 hospital SuperNodes, SuperLink with TLS, node "
             f"authentication and state database, loopback; tiny model, {NOTES_PER_SITE} notes "
             "per site).", "",
             "| scenario | rounds completed | wall time (s) | final global ppl | "
             + " | ".join(f"{s} eps report / ledger" for s in SITES) + " | audit | what happened |",
             "|---|---|---|---|" + "---|" * len(SITES) + "---|---|"]
    for name in SCENARIOS:
        r = results.get(name)
        if r is None:
            continue
        sites = r.get("sites", {})
        eps = [f"{_num(sites.get(s, {}).get('epsilon_report'))} / "
               f"{_num(sites.get(s, {}).get('epsilon_ledger'))}" for s in SITES]
        audits = ", ".join(f"{s} {sites[s]['audit']}" for s in SITES if s in sites) or "n/a"
        rounds = (f"{r.get('rounds_completed', 'n/a')}/{r.get('rounds_planned')}"
                  if "error" not in r else f"ERROR: {r['error']}")
        lines.append(f"| {name} | {rounds} | {_num(r.get('wall_s'), 1)} | "
                     f"{_num(r.get('final_global_perplexity'))} | " + " | ".join(eps)
                     + f" | {audits} | {outcome(name, r)} |")
    problems = sorted({f"{s}: {p}" for r in results.values()
                       for s, info in r.get("sites", {}).items() for p in info["audit_problems"]})
    if problems:
        lines += ["", "Audit problems (`common.audit`, independent dp-accounting RDP):", ""]
        lines += [f"- {p}" for p in problems]
    count = 1 + max((int(r.get("rounds_planned", 0)) for r in results.values()), default=0)
    lines += ["", "## Per-round global perplexity (coordinator's held-out set)", "",
              "| scenario | " + " | ".join(f"round {i}" for i in range(count)) + " |",
              "|---|" + "---|" * count]
    for name in SCENARIOS:
        r = results.get(name)
        if r and "global_perplexity" in r:
            ppl = r["global_perplexity"]
            lines.append(f"| {name} | " + " | ".join(_num(ppl.get(str(i))) for i in range(count))
                         + " |")
    lines += ["", "## Details", ""]
    for name in SCENARIOS:
        r = results.get(name)
        if not r:
            continue
        lines.append(f"### {name}")
        lines.append("")
        for key in ("participants", "aggregated", "declined", "killed_site", "killed_at_s",
                    "killed_site_rounds", "killed_run_id", "killed_run_final_status",
                    "first_attempt_s", "resumed_attempt_s", "checkpoints_at_kill",
                    "round2_released_before_kill", "killed_superlink_pids",
                    "serverapp_alive_after_kill", "coordinator_1_exit_after_kill",
                    "superlink_back_at_s", "nodes_online_again_at_s", "coordinator_1_exit",
                    "coordinator_1_last_lines", "run_finished_by_itself",
                    "serverapp_alive_before_resume", "file_size_limit", "limited_pids",
                    "ledger_entries_at_limit", "ledger_entries_after", "ledger_torn_line",
                    "side_files", "full_site_train_declines", "full_site_evaluation_declines",
                    "full_site_updates_in_ledger", "resumed_line", "round_end_s",
                    "round_end_s_resumed", "error"):
            if key in r:
                lines.append(f"- {key}: `{json.dumps(r[key])}`")
        for site, info in r.get("sites", {}).items():
            problems = "; ".join(info["audit_problems"])
            lines.append(f"- {site}: ledger releases (run, round, update hash) "
                         f"`{json.dumps(info['ledger_releases'])}`, rounds in report "
                         f"`{info['rounds_in_report']}`, releases not in the report "
                         f"{info.get('releases_not_in_report')}, audit {info['audit']}"
                         + (f" ({problems})" if problems else ""))
        lines.append("")
    b = results.get("baseline", {}).get("final_global_perplexity")
    for name in SCENARIOS[1:]:
        c = results.get(name, {}).get("final_global_perplexity")
        if b and c:
            lines.append(f"Final global perplexity, {name}: {c:.3f} vs baseline {b:.3f} "
                         f"({100 * (c - b) / b:+.1f}%).")
    return "\n".join(lines)


def rescan(results: dict[str, Any], out: Path, model_dir: Path) -> None:
    """Recompute the per-site figures from the scenario directories already on disk (ledgers,
    report.json), e.g. after the checks here changed, without running anything again."""
    for name, result in results.items():
        root = out / name
        if not (root / "sites").is_dir():
            continue
        fed = LoopbackFederation(root=root, model_dir=model_dir, port=0)
        fed.policies = {s: root / "sites" / s / "policy.yaml" for s in SITES}
        report = read_report(fed)
        result["sites"] = site_figures(fed, report)
        if report:
            result.update(run_figures(fed, report))


def run_drill(args: argparse.Namespace) -> int:
    """``privatune fault-drill``: the scenarios asked for, the table in ``<out>/faults.md``."""
    if args.rounds < 3:
        raise ValueError("--rounds must be at least 3 (the faults are injected in round 2)")
    if args.scenario not in ("all", *SCENARIOS):
        raise ValueError(f"--scenario {args.scenario}: not one of all, {', '.join(SCENARIOS)}")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    command = (f"privatune fault-drill --out {args.out} --rounds {args.rounds} "
               f"--round-timeout {args.round_timeout}"
               + (f" --scenario {args.scenario}" if args.scenario != "all" else ""))
    model_dir = ensure_base_model(out / "model", TINY_MODEL, log)
    results_path = out / "faults.json"
    results: dict[str, Any] = (json.loads(results_path.read_text(encoding="utf-8"))
                               if results_path.is_file() else {})
    names = SCENARIOS if args.scenario == "all" else (args.scenario,)
    if args.rescan:
        rescan(results, out, model_dir)
        results_path.write_text(json.dumps(results, indent=2, default=str), encoding="utf-8")
        names = ()
    for name in names:
        results[name] = run_scenario(name, out, model_dir, args.round_timeout, args.rounds,
                                     args.budget)
        results[name]["command"] = command
        results_path.write_text(json.dumps(results, indent=2, default=str), encoding="utf-8")
    text = summary_markdown(results, results.get("baseline", {}).get("command", command))
    (out / "faults.md").write_text(text, encoding="utf-8")
    print(text, flush=True)
    failed = [n for n in names if "error" in results[n] or results[n].get("exit_code") != 0]
    return 1 if failed else 0
