"""The coordinator's SuperLink process (``flower-superlink``).

Flower 1.42 facts this relies on (checked against the installed package):

- the SuperLink serves its Fleet API (nodes), Control API (``flwr``) and Runtime API
  (ServerApp) on ONE HTTPS port, ``--host``/``--port`` (default 127.0.0.1:8000);
- ``--enable-supernode-auth`` makes it refuse every node whose public key was not registered
  with ``flwr supernode register``; it requires TLS (``--ssl-ca-certfile``,
  ``--ssl-certfile``, ``--ssl-keyfile``);
- the SuperLink runs ServerApps through ``flower-superexec``, looked up on ``PATH``, and by
  default would ``uv sync`` the app's dependencies from the network: we turn that off.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from privatune.common.flower_process import flower_env, flower_tool
from privatune.server.deployment import (CoordinatorDeployment, DeploymentError, Progress, say,
                                         split_address)
from privatune.server.flwr_cli import write_connection


def is_listening(address: str, timeout_s: float = 1.0) -> bool:
    """Whether something accepts TCP connections at ``host:port``."""
    host, port = split_address(address, "address")
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def log_tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def superlink_command(deployment: CoordinatorDeployment) -> list[str]:
    """The ``flower-superlink`` command line (absolute paths: the SuperLink hands them on to
    the SuperExec it starts)."""
    return [flower_tool("flower-superlink"),
            "--ssl-ca-certfile", str(deployment.ca_cert),
            "--ssl-certfile", str(deployment.server_cert),
            "--ssl-keyfile", str(deployment.server_key),
            "--enable-supernode-auth",
            "--database", str(deployment.database),
            "--disable-runtime-dependency-installation",
            "--host", deployment.superlink.bind, "--port", str(deployment.port)]


def start_superlink(deployment: CoordinatorDeployment, progress: Progress = say) -> subprocess.Popen:
    """Start a SuperLink in its own process group and wait (bounded) until it listens."""
    link = deployment.superlink
    deployment.database.parent.mkdir(parents=True, exist_ok=True)
    deployment.log_file.parent.mkdir(parents=True, exist_ok=True)
    command = superlink_command(deployment)
    progress("starting the SuperLink: " + " ".join(command))
    with open(deployment.log_file, "ab") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, env=flower_env(deployment.home),
                                   cwd=deployment.home, start_new_session=True)
    deadline = time.monotonic() + link.startup_timeout_s
    while not is_listening(link.address):
        if process.poll() is not None:
            raise DeploymentError(f"the SuperLink exited with code {process.returncode} at "
                                  f"start-up; its log {deployment.log_file} ends with:\n"
                                  + log_tail(deployment.log_file))
        if time.monotonic() > deadline:
            stop_process(process)
            raise DeploymentError(f"the SuperLink did not listen on {link.address} within "
                                  f"{link.startup_timeout_s:g} s; see {deployment.log_file}")
        time.sleep(0.5)
    progress(f"SuperLink listening on {link.address} (state {deployment.database}, "
             f"log {deployment.log_file})")
    return process


def stop_process(process: subprocess.Popen, timeout_s: float = 15.0) -> None:
    """Stop a process we started and its children (its own process group): TERM, then KILL."""
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@contextlib.contextmanager
def superlink(deployment: CoordinatorDeployment, progress: Progress = say) -> Iterator[bool]:
    """Connect to the SuperLink at ``superlink.address``, starting one if none answers and
    ``superlink.start`` allows it; one started here is stopped on exit. Yields whether it was
    started here."""
    write_connection(deployment)
    address = deployment.superlink.address
    if is_listening(address):
        progress(f"using the SuperLink already running at {address}")
        yield False
        return
    if not deployment.superlink.start:
        raise DeploymentError(f"no SuperLink answers at {address} and {deployment.source} "
                              "sets superlink.start: false")
    process = start_superlink(deployment, progress)
    try:
        yield True
    finally:
        stop_process(process)
        progress("SuperLink stopped")
