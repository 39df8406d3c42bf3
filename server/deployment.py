"""``configs/coordinator.yaml``: where the coordinator's SuperLink runs and how it is secured.

Read into a typed, validated :class:`CoordinatorDeployment`. Relative paths in the file are
relative to the file; every error names the file and the key. The other ``server``
deployment modules (the SuperLink process, the ``flwr`` wrapper, node registration, the app
bundle, runs) take this object and raise :class:`DeploymentError` when Flower fails.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from privatune.common.certs import CertError, certificate_hosts, check_certificate, check_node_public_key
from privatune.common.config import ConfigError, bounded, build, read_yaml

Progress = Callable[[str], None]


def say(text: str) -> None:
    """Print at once, so progress keeps pace with the run even when piped to a log."""
    print(text, flush=True)


class DeploymentError(RuntimeError):
    """The SuperLink or a Flower command failed; the message says what to check."""


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

    @property
    def port(self) -> int:
        return split_address(self.superlink.address, "superlink.address")[1]


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
