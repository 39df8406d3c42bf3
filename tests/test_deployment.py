"""A real deployment on one machine: a SuperLink and SuperNodes as separate processes on
loopback, with TLS, SuperNode authentication and a persistent state database, driven through
the same commands a coordinator and hospitals run (``coordinator``, ``node``, ``certs``).

Checked: an unregistered node and a node with the wrong CA are refused; the run finishes its
two rounds although one node is killed during round 1 (the round closes after
``round_timeout_s`` with the others' updates); the surviving sites' ledgers hold every
release. Sizes are the smallest that still train; the file takes about 4.5 minutes on two
busy cores, most of it Flower starting a ClientApp process (torch, Opacus) per message.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

from privatune.common.certs import (CertError, certificate_hosts, make_ca, make_node_keys,
                          make_server_cert)
from privatune.common.ledger import SiteLedger
from tests.conftest import write_notes, write_policy

ROOT = Path(__file__).resolve().parents[1]
SITES = ("alpha", "beta", "gamma")  # gamma is killed during round 1
ROUND_TIMEOUT_S = 50


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "privatune.simulations.deploy_cli", *args]


class Process:
    """A command in its own process group, its output collected line by line."""

    def __init__(self, command: list[str], name: str):
        self.name, self.lines, self.times = name, [], []
        self.started = time.monotonic()
        self.popen = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True,
                                      start_new_session=True,
                                      env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.popen.stdout:
            self.times.append(time.monotonic() - self.started)
            self.lines.append(line.rstrip())

    def output(self, timed: bool = False) -> str:
        if timed:
            return "\n".join(f"{t:6.1f}s {line}" for t, line in zip(self.times, self.lines))
        return "\n".join(self.lines)

    def wait_for(self, text: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not any(text in line for line in self.lines):
            if self.popen.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"{self.name}: no {text!r} (exit {self.popen.poll()}):\n"
                                     + self.output()[-4000:])
            time.sleep(0.2)

    def signal_group(self, sig: int) -> None:
        try:
            os.killpg(self.popen.pid, sig)
        except ProcessLookupError:
            pass

    def stop(self) -> None:
        """SIGINT first (our commands then stop what they started), then SIGKILL."""
        if self.popen.poll() is None:
            self.signal_group(signal.SIGINT)
            try:
                self.popen.wait(timeout=20)
            except subprocess.TimeoutExpired:
                pass
        self.signal_group(signal.SIGKILL)
        self.popen.wait()


# --------------------------------------------------------------------------- certificates


def test_certificates_are_what_flower_expects(tmp_path):
    ca = make_ca(tmp_path)
    server = make_server_cert(ca, tmp_path, ["fl.example.org", "10.1.2.3"])
    assert set(certificate_hosts(server.cert)) == {"localhost", "127.0.0.1", "fl.example.org",
                                                   "10.1.2.3"}
    cert = x509.load_pem_x509_certificate(server.cert.read_bytes())
    assert cert.issuer == x509.load_pem_x509_certificate(ca.cert.read_bytes()).subject
    pair = make_node_keys(tmp_path / "nodes", "st-mary")
    # flower-supernode and `flwr supernode register` load exactly these formats
    assert isinstance(load_ssh_private_key(pair.private_key.read_bytes(), None),
                      ec.EllipticCurvePrivateKey)
    assert isinstance(load_ssh_public_key(pair.public_key.read_bytes()), ec.EllipticCurvePublicKey)
    assert pair.private_key.stat().st_mode & 0o077 == 0
    with pytest.raises(CertError, match="already exists"):
        make_node_keys(tmp_path / "nodes", "st-mary")
    with pytest.raises(CertError, match="already exists"):
        make_ca(tmp_path)


# --------------------------------------------------------------------------- the federation


@pytest.fixture(scope="module")
def federation(tmp_path_factory, tiny_model_dir):
    """SuperLink (``coordinator --serve``) and three hospital nodes, all online."""
    tmp = tmp_path_factory.mktemp("deploy")
    certs = tmp / "certs"
    ca = make_ca(certs)
    make_server_cert(ca, certs)
    keys = {name: make_node_keys(certs / "nodes", name) for name in (*SITES, "rogue")}
    policies = {}
    for seed, name in enumerate((*SITES, "unregistered", "wrong-ca"), start=1):
        data = write_notes(tmp / "data" / f"{name}.jsonl", 40, seed)
        policies[name] = write_policy(tmp / "sites" / name, name, data, tiny_model_dir)
    job = tmp / "federation.yaml"
    job.write_text(yaml.safe_dump({
        "seed": 0, "model": {"base": str(tiny_model_dir), "max_length": 32},
        "lora": {"r": 2, "alpha": 4, "target_modules": ["q_proj", "v_proj"]},
        "training": {"local_steps": 2, "batch_size": 4, "learning_rate": 0.05,
                     "eval_batch_size": 16},
        "privacy": {"epsilon": 8.0, "delta": 1e-4},
        "federation": {"rounds": 2, "min_nodes": 2, "min_replies": 2, "node_wait_s": 60,
                       "round_timeout_s": ROUND_TIMEOUT_S}}))
    address = f"127.0.0.1:{free_port()}"
    (tmp / "coordinator.yaml").write_text(yaml.safe_dump({
        "state_dir": "state",
        "superlink": {"address": address, "bind": "127.0.0.1"},
        "tls": {"ca_cert": "certs/ca.pem", "server_cert": "certs/superlink.pem",
                "server_key": "certs/superlink.key"},
        "nodes": {"public_keys": [f"certs/nodes/{name}.pub" for name in SITES]},
        "run": {"model_dir": str(tiny_model_dir), "out_dir": "out"}}))
    started = time.monotonic()
    processes: list[Process] = []
    fed = SimpleNamespace(tmp=tmp, job=job, address=address, ca=ca.cert, keys=keys,
                          policies=policies, nodes={}, processes=processes)
    try:
        link = Process(cli("coordinator", "--config", str(job), "--serve"), "superlink")
        processes.append(link)
        link.wait_for("SuperLink ready", 90)
        for name in SITES:
            node = Process(cli("node", "--site", str(policies[name]), "--superlink", address,
                               "--root-cert", str(ca.cert), "--auth-key", str(keys[name].private_key),
                               "--runtime-port", str(free_port())), name)
            processes.append(node)
            fed.nodes[name] = node
        # Nodes that must be refused start now too, so their start-up overlaps the others'.
        other_ca = make_ca(tmp / "other-ca")
        for name, root in (("unregistered", ca.cert), ("wrong-ca", other_ca.cert)):
            node = Process(cli("node", "--site", str(policies[name]), "--superlink", address,
                               "--root-cert", str(root), "--auth-key",
                               str(keys["rogue"].private_key), "--runtime-port", str(free_port()),
                               "--max-wait", "15"), name)
            processes.append(node)
            fed.nodes[name] = node
        from privatune.server.deploy import load_deployment, wait_for_online

        fed.deployment = load_deployment(tmp / "coordinator.yaml")
        wait_for_online(fed.deployment, len(SITES), timeout_s=120)
        print(f"\nfederation up in {time.monotonic() - started:.0f} s")
        yield fed
    finally:
        for process in reversed(processes):
            process.stop()


def refused(node: Process, timeout_s: float = 180) -> str:
    """The output of a node process that must stop on its own with an error."""
    try:
        node.popen.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"{node.name} was not refused:\n{node.output()[-3000:]}") from None
    node.reader.join(timeout=5)
    assert node.popen.returncode != 0, node.output()[-3000:]
    return node.output()


def test_node_states_what_leaves_the_site(federation):
    for name in SITES:
        federation.nodes[name].wait_for("What leaves this site", 5)
    text = federation.nodes["alpha"].output()
    assert "LoRA adapter updates only" in text
    assert "epsilon = 8 at delta = 0.0001" in text
    assert "training loss of each round: sent" in text
    assert "site-policy=" in text and "--auth-supernode-private-key" in text


def test_unregistered_node_is_refused(federation):
    assert "Failed to activate SuperNode" in refused(federation.nodes["unregistered"])


def test_node_with_another_ca_is_refused(federation):
    assert "CERTIFICATE_VERIFY_FAILED" in refused(federation.nodes["wrong-ca"])


def test_two_rounds_finish_although_a_node_dies_mid_round(federation):
    started = time.monotonic()
    coordinator = Process(cli("coordinator", "--config", str(federation.job)), "coordinator")
    federation.processes.append(coordinator)
    coordinator.wait_for("[round 1/2] training at 3 nodes", 240)
    federation.nodes["gamma"].signal_group(signal.SIGKILL)  # the machine is gone, mid-round
    killed_at = time.monotonic() - started
    try:
        coordinator.popen.wait(timeout=360)
    except subprocess.TimeoutExpired:
        coordinator.stop()
    output = coordinator.output()
    print("\n" + coordinator.output(timed=True))
    print(f"\nrun took {time.monotonic() - started:.0f} s (gamma killed at {killed_at:.0f} s)")
    assert coordinator.popen.returncode == 0, output[-6000:]
    assert "finished:completed" in output

    report = json.loads((federation.tmp / "out" / "report.json").read_text())
    rounds = {r["round"]: r for r in report["rounds"]}
    assert sorted(rounds) == [0, 1, 2]
    assert all(rounds[r]["aggregated"] for r in (1, 2))
    assert set(rounds[1]["participants"]) >= {"alpha", "beta"}
    assert rounds[2]["participants"] == ["alpha", "beta"]
    assert any(rounds[r]["failures"] or rounds[r]["evaluation_failures"] for r in (1, 2))
    assert (federation.tmp / "out" / "adapter" / "adapter_config.json").is_file()
    for name in ("alpha", "beta"):
        ledger = SiteLedger(federation.policies[name].parent / "ledger.jsonl")
        assert [e["round"] for e in ledger.adapter_updates()] == [1, 2]
    # the SuperLink's state is on disk (runs, registered nodes survive a restart)
    assert federation.deployment.database.is_file()
