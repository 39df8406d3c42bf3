"""A real deployment rehearsed on one machine, over loopback.

Exactly what a coordinator and its hospitals do, in one directory: the federation CA and the
SuperLink certificate, a key pair and a site policy per hospital, the job and
``coordinator.yaml``; then the SuperLink (``privatune coordinator --serve``), one
``privatune node`` per hospital and the job (``privatune coordinator``), each a separate
process in its own process group, run through the ``privatune`` command itself. Used by
``tests/test_deployment.py`` and ``simulations/deployment_faults.py``.

Layout under ``root``: ``certs/`` (``ca.pem``, ``superlink.pem``, ``nodes/<site>.key|pub``),
``sites/<site>/`` (``policy.yaml`` and the site's ledger), ``federation.yaml``,
``coordinator.yaml``, ``state/`` (SuperLink database, ``FLWR_HOME``), ``out/`` (the run)
and ``logs/`` (one log per process).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import yaml

from privatune.common.certs import CertificateAuthority, make_ca, make_node_keys, make_server_cert
from privatune.server.deployment import CoordinatorDeployment, load_deployment
from privatune.server.node_registry import wait_for_online

ROOT = Path(__file__).resolve().parents[1]
EPSILON_CAP = 8.0
DELTA = 1e-4


def free_port() -> int:
    """A loopback port nobody listens on now (several people may share this machine)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def privatune(*args: str) -> list[str]:
    """The ``privatune`` command as a user of this checkout runs it."""
    return [sys.executable, "-m", "privatune.common.cli", *args]


class Proc:
    """A command in its own process group (a kill takes its Flower children too), its output
    kept in memory, line by line with the time it arrived, and copied to a log file."""

    def __init__(self, command: Sequence[str], name: str, log_dir: Path):
        self.name = name
        self.lines: list[str] = []
        self.times: list[float] = []
        self.started = time.monotonic()
        self.ended: float | None = None
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / f"{name}.log"
        self._log = open(self.log_path, "a", encoding="utf-8")
        self._log.write(f"$ {' '.join(command)}\n")
        self.popen = subprocess.Popen(list(command), cwd=ROOT, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                      text=True, start_new_session=True,
                                      env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            stamp = time.monotonic() - self.started
            self.times.append(stamp)
            self.lines.append(line.rstrip())
            if not self._log.closed:
                self._log.write(f"{stamp:7.1f}s {line}")
                self._log.flush()

    def output(self, timed: bool = False) -> str:
        lines = list(self.lines)
        if timed:
            return "\n".join(f"{t:6.1f}s {line}" for t, line in zip(self.times, lines))
        return "\n".join(lines)

    def seconds(self) -> float:
        return (self.ended or time.monotonic()) - self.started

    def has(self, text: str) -> bool:
        return any(text in line for line in list(self.lines))

    def wait_for(self, text: str, timeout_s: float) -> None:
        """Block until ``text`` appears; fail early if the process ends without it."""
        deadline = time.monotonic() + timeout_s
        while not self.has(text):
            if self.popen.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{self.name}: no {text!r} (exit {self.popen.poll()}); "
                                   f"see {self.log_path}; output ends with:\n"
                                   + self.output()[-4000:])
            time.sleep(0.2)

    def wait(self, timeout_s: float) -> int | None:
        """Exit code (all output read), or None if still running after ``timeout_s``."""
        try:
            code = self.popen.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return None
        self.ended = self.ended or time.monotonic()
        self._reader.join(timeout=5)
        return code

    def kill_group(self, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to the whole process group; after SIGKILL, reap it."""
        try:
            os.killpg(self.popen.pid, sig)
        except ProcessLookupError:
            pass
        if sig == signal.SIGKILL:
            self.wait(10)

    def stop(self) -> None:
        """SIGTERM first (our commands stop what they started), SIGKILL what is left."""
        if self.popen.poll() is None:
            self.kill_group(signal.SIGTERM)
            self.wait(30)
        self.kill_group(signal.SIGKILL)
        self._log.close()


@dataclass
class LoopbackFederation:
    """A coordinator and its hospitals in ``root``, on ``127.0.0.1:<port>``.

    Set up with ``make_certs``, ``add_site`` (per hospital), ``write_job`` and
    ``write_deployment``; run with ``start_superlink``, ``start_node``, ``wait_online`` and
    ``start_coordinator``. Used as a context manager, every process it started is stopped
    on exit, errors included.
    """

    root: Path
    model_dir: Path
    port: int = field(default_factory=free_port)
    rounds: int = 0
    round_timeout_s: float = 0.0
    policies: dict[str, Path] = field(default_factory=dict)
    node_keys: dict[str, Path] = field(default_factory=dict)  # private keys, by site
    registered: list[str] = field(default_factory=list)
    nodes: dict[str, Proc] = field(default_factory=dict)
    processes: list[Proc] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def certs(self) -> Path:
        return self.root / "certs"

    @property
    def ca(self) -> Path:
        return self.certs / "ca.pem"

    @property
    def job(self) -> Path:
        return self.root / "federation.yaml"

    @property
    def deployment_file(self) -> Path:
        return self.root / "coordinator.yaml"

    @property
    def out(self) -> Path:
        return self.root / "out"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    def ledger(self, site: str) -> Path:
        return self.policies[site].parent / "ledger.jsonl"

    def deployment(self) -> CoordinatorDeployment:
        return load_deployment(self.deployment_file)

    # ----------------------------------------------------------------------- set-up

    def make_certs(self) -> CertificateAuthority:
        """The federation CA and the SuperLink certificate (``privatune certs``)."""
        ca = make_ca(self.certs)
        make_server_cert(ca, self.certs)
        return ca

    def add_site(self, name: str, data: Path, registered: bool = True) -> Path:
        """A hospital: its key pair (``privatune keys``; its public key goes into
        ``coordinator.yaml`` only if ``registered``) and its site policy over ``data``."""
        self.node_keys[name] = make_node_keys(self.certs / "nodes", name).private_key
        if registered:
            self.registered.append(name)
        site_dir = self.root / "sites" / name
        site_dir.mkdir(parents=True, exist_ok=True)
        self.policies[name] = site_dir / "policy.yaml"
        self.policies[name].write_text(yaml.safe_dump({
            "site": {"name": name, "data": str(data), "format": "jsonl",
                     "model": str(self.model_dir), "state_dir": ".", "heldout_fraction": 0.2},
            "privacy": {"epsilon_cap": EPSILON_CAP, "delta": DELTA,
                        "min_noise_multiplier": 0.3},
            # a rehearsal's sites hold a few dozen notes: metrics over 8 held-out ones
            "release": {"min_records": 8}}))
        return self.policies[name]

    def write_job(self, rounds: int, round_timeout_s: float, local_steps: int, batch_size: int,
                  learning_rate: float, node_wait_s: float = 120,
                  secure: Mapping[str, Any] | None = None) -> Path:
        """``federation.yaml``: a tiny LoRA job that needs 2 of the nodes per round; with
        ``secure`` (the job's ``secure`` section), secure DP-SGD among 3 of them."""
        self.rounds, self.round_timeout_s = rounds, round_timeout_s
        job = {
            "seed": 0, "model": {"base": str(self.model_dir), "max_length": 32},
            "lora": {"r": 2, "alpha": 4, "target_modules": ["q_proj", "v_proj"]},
            "training": {"local_steps": local_steps, "batch_size": batch_size,
                         "learning_rate": learning_rate, "eval_batch_size": 16},
            "privacy": {"epsilon": EPSILON_CAP, "delta": DELTA},
            "federation": {"rounds": rounds, "min_nodes": 2, "min_replies": 2,
                           "node_wait_s": node_wait_s, "round_timeout_s": round_timeout_s},
            "evaluation": {"max_new_tokens": 8, "max_examples": 8}}
        if secure is not None:
            job["federation"] |= {"mode": "secure_dpsgd", "min_nodes": 3}
            job["secure"] = dict(secure)
        self.job.write_text(yaml.safe_dump(job))
        return self.job

    def write_deployment(self, central_eval: Path | None = None) -> Path:
        """``coordinator.yaml``: the SuperLink on loopback, the registered hospitals' keys."""
        run = {"model_dir": str(self.model_dir), "out_dir": "out"}
        if central_eval is not None:
            run["central_eval"] = str(central_eval)
        self.deployment_file.write_text(yaml.safe_dump({
            "state_dir": "state",
            "superlink": {"address": self.address, "bind": "127.0.0.1"},
            "tls": {"ca_cert": "certs/ca.pem", "server_cert": "certs/superlink.pem",
                    "server_key": "certs/superlink.key"},
            "nodes": {"public_keys": {name: f"certs/nodes/{name}.pub" for name in self.registered}},
            "run": run}))
        return self.deployment_file

    # ----------------------------------------------------------------------- processes

    def start(self, command: Sequence[str], name: str) -> Proc:
        """Any command as a process of this federation (stopped with it)."""
        process = Proc(command, name, self.logs)
        self.processes.append(process)
        return process

    def start_superlink(self, timeout_s: float = 120, name: str = "superlink") -> Proc:
        """``privatune coordinator --serve`` (long-lived, as under systemd), once it is ready."""
        link = self.start(privatune("coordinator", "--config", str(self.job), "--serve"), name)
        link.wait_for("SuperLink ready", timeout_s)
        return link

    def start_node(self, name: str, root_cert: Path | None = None,
                   max_wait_s: float | None = None) -> Proc:
        """``privatune node`` for one hospital (``root_cert``: another CA than the
        federation's); returns at once, see ``wait_online``."""
        command = privatune("node", "--site", str(self.policies[name]), "--superlink",
                            self.address, "--root-cert", str(root_cert or self.ca),
                            "--auth-key", str(self.node_keys[name]),
                            "--runtime-port", str(free_port()))
        if max_wait_s is not None:
            command += ["--max-wait", f"{max_wait_s:g}"]
        self.nodes[name] = self.start(command, name)
        return self.nodes[name]

    def wait_online(self, count: int, timeout_s: float) -> list[str]:
        """Node ids once ``count`` nodes are online at the SuperLink."""
        return wait_for_online(self.deployment(), count, timeout_s=timeout_s)

    def start_coordinator(self, name: str = "coordinator") -> Proc:
        """``privatune coordinator --config ...``: submits the job and follows it; the run
        goes to ``out`` (``run.out_dir``), where a second one resumes it."""
        return self.start(privatune("coordinator", "--config", str(self.job)), name)

    def stop(self) -> None:
        """Stop every process, the last started first."""
        for process in reversed(self.processes):
            process.stop()

    def __enter__(self) -> LoopbackFederation:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.stop()
