"""The ``privatune`` front door: every command is reachable from it, each side's commands
live with that side's code, and ``--help`` stays light (no torch, no Flower)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from privatune.common.certs import make_ca, make_server_cert
from privatune.common.cli import main

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "flwr", "transformers", "opacus", "peft", "matplotlib", "dp_accounting")
COMMANDS = ("simulate", "empirical-audit", "fault-drill", "plan", "audit", "coordinator", "certs",
            "export", "node", "keys")


def test_help_lists_every_command_and_loads_nothing_heavy():
    code = f"""
import json, sys
from privatune.common.cli import main
for argv in (["--help"], ["node", "--help"], ["coordinator", "--help"], ["keys", "--help"]):
    try:
        main(argv)
    except SystemExit as exit:
        assert exit.code == 0, argv
print(json.dumps(sorted({{name.split(".")[0] for name in sys.modules}} & set({HEAVY!r}))))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    pages, loaded = done.stdout.rstrip().rsplit("\n", 1)
    assert json.loads(loaded) == []
    top, node, coordinator, keys = pages.split("usage: privatune")[1:]
    for command in COMMANDS:
        assert command in top.split("who runs what")[0]
    assert "a hospital:          node, keys" in top
    for option in ("--site", "--check", "--superlink", "--root-cert", "--auth-key", "--runtime-port"):
        assert option in node
    for option in ("--config", "--deployment", "--serve", "--register", "--out"):
        assert option in coordinator
    assert "--hospital" in keys


@pytest.mark.parametrize(("argv", "other_sides"), [
    (["node", "--help"], ("server", "simulations")),
    (["keys", "--help"], ("server", "simulations")),
    (["coordinator", "--help"], ("client", "simulations")),
    (["plan", "--help"], ("client", "server", "simulations")),
])
def test_a_command_imports_only_its_own_side(argv, other_sides):
    """A hospital's installation runs ``privatune node`` without the coordinator's or the
    simulator's code ever being imported (nor their packages: Ray, clinosim)."""
    code = f"""
import json, sys
from privatune.common.cli import main
try:
    main({argv!r})
except SystemExit as exit:
    assert exit.code == 0
print(json.dumps(sorted(n for n in sys.modules if n.startswith("privatune.") or n in ("ray", "clinosim"))))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    loaded = json.loads(done.stdout.rstrip().rsplit("\n", 1)[-1])
    assert argv[0] in done.stdout
    assert [name for name in loaded if name.split(".")[1] in other_sides
            or name in ("ray", "clinosim")] == []


def _privatune_imports(file: Path) -> set[str]:
    """The privatune modules ``file`` imports, at its top or inside a function alike."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("privatune."):
            names |= {node.module, *(f"{node.module}.{alias.name}" for alias in node.names)}
        elif isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names if alias.name.startswith("privatune.")}
    return names


def test_no_module_imports_back_a_module_that_imports_it():
    """No import circles, not even ones hidden in a function: each module can be read (and
    split) knowing only what it imports."""
    modules = {f"privatune.{file.parent.name}.{file.stem}": file
               for package in ("common", "client", "server", "simulations")
               for file in sorted((ROOT / package).glob("*.py"))}
    graph = {name: sorted(_privatune_imports(file) & set(modules) - {name})
             for name, file in modules.items()}
    circles = []
    for start in graph:  # a path from each module's imports back to itself
        seen, frontier = set(), [(start, [start])]
        while frontier:
            name, path = frontier.pop()
            for imported in graph[name]:
                if imported == start:
                    circles.append(" -> ".join([*path, start]))
                elif imported not in seen:
                    seen.add(imported)
                    frontier.append((imported, [*path, imported]))
    assert circles == []


def test_each_side_imports_only_what_it_may():
    """common imports neither client nor server; client and server never import each other,
    nor simulations: a hospital's or a coordinator's installation runs without the other."""
    forbidden = {"common": ("client", "server", "simulations"), "client": ("server", "simulations"),
                 "server": ("client", "simulations")}
    problems = []
    for package, others in forbidden.items():
        for file in sorted((ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
                names = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                         else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
                problems += [f"{file.relative_to(ROOT)}:{node.lineno} imports {name}"
                             for name in names for other in others
                             if name == f"privatune.{other}" or name.startswith(f"privatune.{other}.")]
    assert problems == []


def test_node_without_connection_flags_names_them(make_site, capsys):
    assert main(["node", "--site", str(make_site())]) == 2
    err = capsys.readouterr().err
    assert "--superlink, --root-cert, --auth-key required" in err and "--check" in err


def test_node_check_states_what_leaves_and_starts_nothing(make_site, capsys):
    assert main(["node", "--site", str(make_site("st-mary")), "--check"]) == 0
    out = capsys.readouterr().out
    assert "Site 'st-mary'" in out and "What leaves this site" in out
    assert "check only" in out and "starting the SuperNode" not in out


def test_keys_makes_a_private_key_only_its_owner_reads(tmp_path, capsys):
    assert main(["keys", "--hospital", "st-mary", "--out", str(tmp_path / "keys")]) == 0
    private = tmp_path / "keys" / "st-mary.key"
    assert private.stat().st_mode & 0o077 == 0 and (tmp_path / "keys" / "st-mary.pub").is_file()
    assert str(private) in capsys.readouterr().out
    assert main(["keys", "--hospital", "st-mary", "--out", str(tmp_path / "keys")]) == 1
    assert "already exists" in capsys.readouterr().err


def test_certs_makes_ca_server_certificate_and_keys(tmp_path, capsys):
    out = tmp_path / "certs"
    assert main(["certs", "--out", str(out), "--host", "fl.example.org", "--hospital", "alpha"]) == 0
    assert {p.name for p in out.iterdir()} >= {"ca.pem", "ca.key", "superlink.pem", "superlink.key"}
    assert (out / "nodes" / "alpha.pub").is_file()
    assert "CA fingerprint" in capsys.readouterr().out
    # a host the certificate lacks needs --overwrite; the CA is reused, never replaced
    ca = (out / "ca.pem").read_bytes()
    assert main(["certs", "--out", str(out), "--host", "fl2.example.org"]) == 1
    assert main(["certs", "--out", str(out), "--host", "fl2.example.org", "--overwrite"]) == 0
    assert (out / "ca.pem").read_bytes() == ca
    # the hospital's form, as the README had it before `privatune keys`
    assert main(["certs", "--keys-only", "--out", str(tmp_path / "keys"), "--hospital", "beta"]) == 0
    assert (tmp_path / "keys" / "beta.key").is_file()


def test_coordinator_stops_on_a_bad_job_before_starting_anything(tmp_path, capsys):
    make_server_cert(make_ca(tmp_path / "certs"), tmp_path / "certs")
    (tmp_path / "coordinator.yaml").write_text(yaml.safe_dump({
        "state_dir": "state", "tls": {"ca_cert": "certs/ca.pem", "server_cert": "certs/superlink.pem",
                                      "server_key": "certs/superlink.key"}}))
    job = tmp_path / "federation.yaml"
    job.write_text("lora:\n  rank: 4\n")
    assert main(["coordinator", "--config", str(job)]) == 2
    assert "line 2: lora.rank: unknown key" in capsys.readouterr().err
    assert not (tmp_path / "state").exists()


def test_coordinator_names_a_bad_deployment_key(tmp_path, capsys):
    (tmp_path / "coordinator.yaml").write_text("superlink:\n  adress: 127.0.0.1:9092\n")
    (tmp_path / "federation.yaml").write_text("seed: 0\n")
    assert main(["coordinator", "--config", str(tmp_path / "federation.yaml")]) == 2
    assert "superlink.adress: unknown key" in capsys.readouterr().err


def test_forced_export_needs_a_reason(tmp_path, capsys):
    assert main(["export", str(tmp_path), "--out", str(tmp_path / "release"), "--force"]) == 2
    assert "--force needs --reason" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["plan", "audit", "empirical-audit", "simulate"])
def test_other_commands_still_parse(command, capsys):
    with pytest.raises(SystemExit) as exit:
        main([command, "--help"])
    assert exit.value.code == 0
    assert f"usage: privatune {command}" in capsys.readouterr().out


def test_fault_drill_refuses_an_unknown_scenario_before_starting_anything(tmp_path, capsys):
    assert main(["fault-drill", "--out", str(tmp_path / "drill"), "--scenario", "flood"]) == 2
    assert "--scenario flood: not one of all, baseline, node-killed" in capsys.readouterr().err
    assert not (tmp_path / "drill").exists()


def test_simulate_exits_1_with_each_reason_when_every_train_request_failed(tmp_path, monkeypatch,
                                                                           capsys):
    """A federation in which no site ever took part because every node failed is a failure,
    not a finished run: exit 1 and each distinct one-line reason."""
    from privatune.server.report import RunReport
    from privatune.server.rounds import RoundRecord, RoundTraining
    from privatune.simulations import runner

    failure = ("node 7: <class 'ray.exceptions.RayTaskError(ClientAppException)'>:<'ray::run()\n"
               '  File "node.py", line 9, in train\n'
               "ValueError: delta = 0.5 is not below 1/48\n'>")
    failed = RunReport(run_id="sim", config={}, base_model="m", rounds=[
        RoundRecord(0), *[RoundRecord(n, training=RoundTraining(failures=[failure]))
                          for n in (1, 2)]])
    monkeypatch.setattr(runner, "simulate", lambda *args, **kwargs: failed)
    argv = ["simulate", "--config", "job.yaml", "--out", str(tmp_path)]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "no site took part in any round" in err
    assert err.count("node 7: ValueError: delta = 0.5 is not below 1/48") == 1
    failed.rounds[2].training.participants = ["north"]
    assert main(argv) == 0


@pytest.mark.parametrize("command", ["simulate", "study"])
def test_a_simulator_command_without_its_extra_names_it_and_does_nothing(command, tmp_path,
                                                                         monkeypatch, capsys):
    from privatune.common import extras

    monkeypatch.setitem(extras.EXTRA_MODULES, "simulation", ("ray", "privatune_no_such_module"))
    out = tmp_path / "run"
    assert main([command, "--config", str(ROOT / "configs" / "smoke.yaml"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"privatune {command} needs the optional extra 'simulation'" in err
    assert "missing: privatune_no_such_module" in err and "pip install 'privatune[simulation]'" in err
    assert not out.exists()


def test_fault_summary_has_a_row_per_scenario_with_its_checks():
    from privatune.simulations.fault_report import summary_markdown

    site = {"epsilon_report": 1.25, "epsilon_ledger": 1.25, "audit": "ok", "audit_problems": [],
            "ledger_releases": [], "rounds_in_report": [1, 2, 3]}
    results = {"baseline": {"rounds_completed": 3, "rounds_planned": 3, "wall_s": 12.0,
                            "final_global_perplexity": 100.0, "sites": {"alpha": site},
                            "global_perplexity": {"0": 200.0, "3": 100.0}},
               "node-killed": {"error": "the SuperLink did not start", "rounds_planned": 3}}
    text = summary_markdown(results, "privatune fault-drill --out runs/faults")
    assert "| baseline | 3/3 | 12.0 | 100.000 | 1.250 / 1.250 |" in text
    assert "| node-killed | ERROR: the SuperLink did not start |" in text
    assert "| baseline | 200.000 | n/a | n/a | 100.000 |" in text
