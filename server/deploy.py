"""The coordinator's side of a real deployment on Flower's deployment engine.

``privatune coordinator`` starts (or connects to) a SuperLink with TLS, SuperNode
authentication and a persistent state database, registers the hospitals' public keys,
submits the ServerApp (``server.app:app``) as a Flower run and follows it to the end. It
drives Flower's own command-line tools (``flower-superlink`` and ``flwr``) as subprocesses,
so what it does can be repeated by hand with the commands it prints.

Flower 1.42 facts this relies on (checked against the installed package):

- the SuperLink serves its Fleet API (nodes), Control API (``flwr``) and Runtime API
  (ServerApp) on ONE HTTPS port, ``--host``/``--port`` (default 127.0.0.1:8000);
- ``--enable-supernode-auth`` makes it refuse every node whose public key was not registered
  with ``flwr supernode register``; it requires TLS (``--ssl-ca-certfile``,
  ``--ssl-certfile``, ``--ssl-keyfile``);
- ``flwr`` reads SuperLink connections (address, root certificate) from
  ``$FLWR_HOME/config.toml``, not from ``pyproject.toml``; here ``FLWR_HOME`` is the
  coordinator's own state directory so a user's ``~/.flwr`` is never touched;
- the SuperLink runs ServerApps through ``flower-superexec``, looked up on ``PATH``, and by
  default would ``uv sync`` the app's dependencies from the network: we turn that off.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from privatune.common.flower_process import flower_env, flower_tool
from privatune.common.certs import CertError, certificate_hosts, check_certificate, check_node_public_key
from privatune.common.config import ConfigError, bounded, build, read_yaml

CONNECTION = "privatune"
"""Name of the SuperLink connection in the coordinator's ``$FLWR_HOME/config.toml``."""

FINISHED_OK = "finished:completed"
Progress = Callable[[str], None]


def say(text: str) -> None:
    """Print at once, so progress keeps pace with the run even when piped to a log."""
    print(text, flush=True)


class DeploymentError(RuntimeError):
    """The SuperLink or a Flower command failed; the message says what to check."""


# --------------------------------------------------------------------------- config


@dataclass(frozen=True)
class SuperLinkSection:
    address: str = "127.0.0.1:9092"  # host:port that flwr and the ServerApp use to reach it
    bind: str = "0.0.0.0"  # interface a SuperLink started here listens on
    start: bool = True  # start one here when none answers at `address`
    database: str = ""  # "" = <state_dir>/superlink.db
    log_file: str = ""  # "" = <state_dir>/superlink.log
    startup_timeout_s: float = field(default=60.0, metadata=bounded(1, 3600))


@dataclass(frozen=True)
class TlsSection:
    ca_cert: str = "../certs/ca.pem"
    server_cert: str = "../certs/superlink.pem"
    server_key: str = "../certs/superlink.key"


@dataclass(frozen=True)
class NodesSection:
    public_keys: tuple[str, ...] = ()  # hospitals' .pub files, registered at every start


@dataclass(frozen=True)
class RunSection:
    model_dir: str = ""  # "" = the job's model.base (the builtin model is built and cached)
    out_dir: str = "../runs/federation"
    central_eval: str = ""  # the coordinator's own held-out JSONL ("" = none)
    app_dir: str = ""  # "" = this source checkout (the directory holding pyproject.toml)
    max_wait_s: float = field(default=0.0, metadata=bounded(0, 30 * 86_400))  # 0 = no limit


@dataclass(frozen=True)
class CoordinatorDeployment:
    """``configs/coordinator.yaml``: where the SuperLink is and how it is secured."""

    state_dir: str = "../state/coordinator"
    superlink: SuperLinkSection = SuperLinkSection()
    tls: TlsSection = TlsSection()
    nodes: NodesSection = NodesSection()
    run: RunSection = RunSection()
    source: str = ""

    def resolve(self, relative: str) -> Path:
        """A path from the file, relative to the file's own directory."""
        path = Path(relative).expanduser()
        return (path if path.is_absolute() else Path(self.source).parent / path).resolve()

    @property
    def home(self) -> Path:
        """``FLWR_HOME`` of every Flower process started by the coordinator."""
        return self.resolve(self.state_dir) / "flwr"

    @property
    def database(self) -> Path:
        return self.resolve(self.superlink.database or str(Path(self.state_dir) / "superlink.db"))

    @property
    def log_file(self) -> Path:
        return self.resolve(self.superlink.log_file or str(Path(self.state_dir) / "superlink.log"))

    @property
    def ca_cert(self) -> Path:
        return self.resolve(self.tls.ca_cert)

    @property
    def server_cert(self) -> Path:
        return self.resolve(self.tls.server_cert)

    @property
    def server_key(self) -> Path:
        return self.resolve(self.tls.server_key)


def split_address(address: str, where: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port`` too) into its parts, or a ConfigError naming ``where``."""
    host, sep, port = address.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{where}: {address!r} is not host:port (e.g. 127.0.0.1:9092)")
    return host, int(port)


def load_deployment(path: str | Path) -> CoordinatorDeployment:
    """Read and check ``coordinator.yaml``; errors name the file and key."""
    data, lines = read_yaml(path)
    if "source" in data:
        raise ConfigError(f"{path}: source: unknown key")
    deployment = build(CoordinatorDeployment, {**data, "source": str(path)}, str(path), lines)
    split_address(deployment.superlink.address, f"{path}: superlink.address")
    split_address(f"{deployment.superlink.bind}:1", f"{path}: superlink.bind")
    for key in ("ca_cert", "server_cert", "server_key"):
        file = deployment.resolve(getattr(deployment.tls, key))
        if not file.is_file():
            raise ConfigError(f"{path}: tls.{key}: {file} does not exist (make it with "
                              "'privatune certs')")
    try:
        check_certificate(deployment.ca_cert)
        check_certificate(deployment.server_cert)
    except CertError as err:
        raise ConfigError(f"{path}: tls: {err}") from err
    host, _ = split_address(deployment.superlink.address, "superlink.address")
    names = certificate_hosts(deployment.server_cert)
    if host not in names:
        raise ConfigError(f"{path}: superlink.address: {host} is not a name in "
                          f"{deployment.server_cert} (it is valid for {', '.join(names)}); "
                          "make the certificate with 'privatune certs --host NAME'")
    for index, key_file in enumerate(deployment.nodes.public_keys):
        try:
            check_node_public_key(deployment.resolve(key_file))
        except CertError as err:
            raise ConfigError(f"{path}: nodes.public_keys[{index}]: {err}") from err
    return deployment


# --------------------------------------------------------------------------- processes


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


def write_connection(deployment: CoordinatorDeployment) -> Path:
    """``$FLWR_HOME/config.toml`` with the connection ``privatune`` (address + CA), so plain
    ``FLWR_HOME=<state_dir>/flwr flwr ... privatune`` commands work too."""
    deployment.home.mkdir(parents=True, exist_ok=True)
    path = deployment.home / "config.toml"
    text = (f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f"address = {json.dumps(deployment.superlink.address)}\n"
            f"root-certificates = {json.dumps(str(deployment.ca_cert))}\n")
    path.write_text(text, encoding="utf-8")
    return path


def superlink_command(deployment: CoordinatorDeployment) -> list[str]:
    """The ``flower-superlink`` command line (absolute paths: the SuperLink hands them on to
    the SuperExec it starts)."""
    _, port = split_address(deployment.superlink.address, "superlink.address")
    return [flower_tool("flower-superlink"),
            "--ssl-ca-certfile", str(deployment.ca_cert),
            "--ssl-certfile", str(deployment.server_cert),
            "--ssl-keyfile", str(deployment.server_key),
            "--enable-supernode-auth",
            "--database", str(deployment.database),
            "--disable-runtime-dependency-installation",
            "--host", deployment.superlink.bind, "--port", str(port)]


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


def flwr(deployment: CoordinatorDeployment, *args: str, timeout_s: float = 120.0) -> dict[str, Any]:
    """Run ``flwr <args> privatune --format json`` and return its JSON answer."""
    command = [flower_tool("flwr"), *args, CONNECTION, "--format", "json"]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s,
                              env=flower_env(deployment.home), cwd=deployment.home)
    except subprocess.TimeoutExpired as err:
        raise DeploymentError(f"'{' '.join(command)}' did not answer within {timeout_s:g} s "
                              f"(is the SuperLink at {deployment.superlink.address} up?)") from err
    answer = _json_object(done.stdout)
    if done.returncode != 0 or not answer.get("success", False):
        detail = answer.get("error-message") or (done.stdout + done.stderr).strip()
        raise DeploymentError(f"'flwr {' '.join(args)}' failed (exit {done.returncode}): {detail}")
    return answer


def _json_object(text: str) -> dict[str, Any]:
    """The JSON object in a ``flwr --format json`` answer (other lines may precede it)."""
    start = text.find("{")
    if start < 0:
        return {}
    try:
        value = json.loads(text[start:])
    except json.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


# --------------------------------------------------------------------------- nodes and runs


def register_node(deployment: CoordinatorDeployment, public_key: Path) -> str:
    """Register one hospital's public key; a key already registered is not an error."""
    check_node_public_key(public_key)
    try:
        answer = flwr(deployment, "supernode", "register", str(public_key))
    except DeploymentError as err:
        if "already in use" in str(err):
            return f"{public_key.name}: already registered"
        raise
    return f"{public_key.name}: registered as node {answer.get('node-id')}"


def list_nodes(deployment: CoordinatorDeployment) -> list[dict[str, Any]]:
    """Registered nodes as ``flwr supernode list`` reports them (node-id, status, ...)."""
    return list(flwr(deployment, "supernode", "list").get("nodes", []))


def wait_for_online(deployment: CoordinatorDeployment, count: int, timeout_s: float,
                    poll_s: float = 2.0) -> list[str]:
    """Node ids once at least ``count`` are online; an error after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        online = [str(n["node-id"]) for n in list_nodes(deployment) if n.get("status") == "online"]
        if len(online) >= count:
            return online
        if time.monotonic() > deadline:
            raise DeploymentError(f"only {len(online)} of {count} nodes came online within "
                                  f"{timeout_s:g} s")
        time.sleep(poll_s)


APP_PACKAGES = ("common", "client", "server")
"""What the ServerApp and ClientApp import; nothing else goes into the app bundle."""


def project_dir(configured: str = "", deployment: CoordinatorDeployment | None = None) -> Path:
    """The privatune source checkout (``pyproject.toml`` with ``[tool.flwr.app]``)."""
    path = (deployment.resolve(configured) if deployment and configured
            else Path(__file__).resolve().parents[1])
    if not (path / "pyproject.toml").is_file():
        raise DeploymentError(f"{path}: no pyproject.toml; set run.app_dir to a privatune "
                              "source checkout (flwr run packs the app from there)")
    return path


def stage_app(source: Path, dest: Path) -> Path:
    """Copy only ``pyproject.toml`` and the apps' Python sources into ``dest``.

    ``flwr run`` packs every ``.json``, ``.jsonl``, ``.yaml``, ``.md`` and ``.toml`` under the
    app directory into the bundle that the SuperLink stores and every node downloads; packing
    a staged copy guarantees no data file, ledger, key or run output in the checkout can ever
    travel with it.
    """
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    shutil.copy2(source / "pyproject.toml", dest / "pyproject.toml")
    for package in APP_PACKAGES:
        for file in sorted((source / package).rglob("*.py")):
            if "__pycache__" in file.parts:
                continue
            # staged as the installed namespace, so the components `privatune.server.app:app`
            # and `privatune.client.app:app` import from the bundle as they do from a wheel
            target = dest / "privatune" / file.relative_to(source)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(file, target)
    return dest


@dataclass(frozen=True)
class RunInputs:
    """The four run-config keys of ``[tool.flwr.app.config]``, as absolute paths."""

    job_config: Path
    model_dir: Path
    out_dir: Path
    central_eval: Path | None = None

    def to_toml(self) -> str:
        values = {"job-config": self.job_config, "model-dir": self.model_dir,
                  "out-dir": self.out_dir,
                  "central-eval": self.central_eval if self.central_eval else ""}
        return "".join(f"{key} = {json.dumps(str(value) if value else '')}\n"
                       for key, value in values.items())


def submit_run(deployment: CoordinatorDeployment, inputs: RunInputs) -> int:
    """``flwr run <app> privatune --run-config <file>``; returns the Flower run id."""
    for name, path in (("job config", inputs.job_config), ("model", inputs.model_dir)):
        if not path.exists():
            raise DeploymentError(f"{name} {path} does not exist")
    if inputs.central_eval and not inputs.central_eval.is_file():
        raise DeploymentError(f"run.central_eval: {inputs.central_eval} does not exist")
    inputs.out_dir.mkdir(parents=True, exist_ok=True)
    config_file = deployment.home / "run-config.toml"
    config_file.write_text(inputs.to_toml(), encoding="utf-8")
    app = stage_app(project_dir(deployment.run.app_dir, deployment), deployment.home.parent / "app-stage")
    return int(_flwr_run(deployment, app, config_file)["run-id"])


def _flwr_run(deployment: CoordinatorDeployment, app: Path, config_file: Path) -> dict[str, Any]:
    # `flwr run [APP] [SUPERLINK]`: the connection name goes after the app path.
    command = [flower_tool("flwr"), "run", str(app), CONNECTION, "--run-config",
               str(config_file), "--format", "json"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300,
                          env=flower_env(deployment.home), cwd=deployment.home)
    answer = _json_object(done.stdout)
    if done.returncode != 0 or not answer.get("run-id"):
        detail = answer.get("error-message") or (done.stdout + done.stderr).strip()
        raise DeploymentError(f"'flwr run' failed (exit {done.returncode}): {detail}")
    return answer


def run_status(deployment: CoordinatorDeployment, run_id: int) -> str:
    """Flower's status of a run, e.g. ``running`` or ``finished:completed``."""
    runs = flwr(deployment, "ls", "--run-id", str(run_id)).get("runs", [])
    return str(runs[0].get("status", "unknown")) if runs else "unknown"


def follow_run(deployment: CoordinatorDeployment, run_id: int, progress: Progress = say,
               max_wait_s: float = 0.0, check_every_s: float = 60.0) -> str:
    """Print the run's log as it grows (``flwr log --stream``, which ends with the run) and
    return the final status. The status is also checked every ``check_every_s`` (a stream
    that broke is reopened); ``max_wait_s`` > 0 bounds the whole wait."""
    deadline = time.monotonic() + max_wait_s if max_wait_s > 0 else None
    streamer: subprocess.Popen | None = None
    reader: threading.Thread | None = None
    next_check = 0.0
    try:
        while True:
            if streamer is None or streamer.poll() is not None:
                if streamer is not None and reader is not None:
                    reader.join(timeout=5)  # show the last lines before the verdict
                    status = run_status(deployment, run_id)
                    if status.startswith("finished"):
                        return status
                    time.sleep(2)  # the stream broke while the run goes on: reopen it
                streamer, reader = _stream_log(deployment, run_id, progress)
                next_check = time.monotonic() + check_every_s
            if deadline is not None and time.monotonic() > deadline:
                raise DeploymentError(f"run {run_id} still running after {max_wait_s:g} s "
                                      "(run.max_wait_s); it keeps running on the SuperLink")
            if time.monotonic() > next_check:
                status = run_status(deployment, run_id)
                if status.startswith("finished"):
                    return status
                next_check = time.monotonic() + check_every_s
            time.sleep(0.5)
    finally:
        if streamer is not None and reader is not None:
            stop_process(streamer, timeout_s=5)
            reader.join(timeout=5)


def _stream_log(deployment: CoordinatorDeployment, run_id: int,
                progress: Progress) -> tuple[subprocess.Popen, threading.Thread]:
    command = [flower_tool("flwr"), "log", str(run_id), CONNECTION, "--stream"]
    streamer = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, env=flower_env(deployment.home), cwd=deployment.home,
                                start_new_session=True)

    def pump() -> None:
        assert streamer.stdout is not None
        for line in streamer.stdout:
            progress("  | " + line.rstrip())

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    return streamer, reader


# --------------------------------------------------------------------------- the command


def register_all(deployment: CoordinatorDeployment, extra: Sequence[Path] = (),
                 progress: Progress = say) -> None:
    """Register every configured key (in parallel: each ``flwr`` call is a Python start-up)."""
    keys = [deployment.resolve(k) for k in deployment.nodes.public_keys] + list(extra)
    with ThreadPoolExecutor(max_workers=4) as pool:
        for line in pool.map(lambda key: register_node(deployment, key), keys):
            progress("node key " + line)
    if not keys:
        progress("no hospital public keys configured (nodes.public_keys); register one with: "
                 + registration_command(deployment, Path("HOSPITAL.pub")))


def registration_command(deployment: CoordinatorDeployment, public_key: Path) -> str:
    """The one command that registers a hospital's key with a running SuperLink."""
    return (f"FLWR_HOME={deployment.home} {flower_tool('flwr')} supernode register "
            f"{public_key} {CONNECTION}")


def serve(deployment: CoordinatorDeployment, extra_keys: Sequence[Path] = (),
          progress: Progress = say) -> int:
    """Run only the SuperLink (long-lived), registering keys, until interrupted."""
    if is_listening(deployment.superlink.address):
        raise DeploymentError(f"something already listens on {deployment.superlink.address}")
    write_connection(deployment)
    process = start_superlink(deployment, progress)
    try:
        register_all(deployment, extra_keys, progress)
        progress("SuperLink ready; stop it with Ctrl-C. Register more hospitals with: "
                 + registration_command(deployment, Path("HOSPITAL.pub")))
        return process.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        stop_process(process)


def coordinate(deployment: CoordinatorDeployment, inputs: RunInputs,
               extra_keys: Sequence[Path] = (), progress: Progress = say) -> int:
    """Start or connect to the SuperLink, register keys, submit the run, follow it; 0 when
    the run finished as completed."""
    with superlink(deployment, progress):
        register_all(deployment, extra_keys, progress)
        run_id = submit_run(deployment, inputs)
        progress(f"submitted run {run_id} (ServerApp server.app:app, job {inputs.job_config}, "
                 f"out {inputs.out_dir}); following its log")
        status = follow_run(deployment, run_id, progress, max_wait_s=deployment.run.max_wait_s)
        progress(f"run {run_id}: {status}")
        if status != FINISHED_OK:
            checkpoints = inputs.out_dir / "checkpoints"
            progress("the run did not complete (its log above says why)"
                     + (f"; submitting it again resumes from the last checkpoint in {checkpoints}"
                        if any(checkpoints.glob("round_*/state.json")) else ""))
            return 1
        progress(f"report: {inputs.out_dir / 'report.md'}")
        return 0
