"""``configs/coordinator.yaml``: where the coordinator's SuperLink runs and how it is secured.

Read into a typed, validated :class:`CoordinatorDeployment`. Relative paths in the file are
relative to the file; every error names the file and the key. The other ``server``
deployment modules (the SuperLink process, the ``flwr`` wrapper, node registration, the app
bundle, runs) take this object and raise :class:`DeploymentError` when Flower fails.
"""

from __future__ import annotations

from collections.abc import Callable
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from privatune.common.certs import (CertError, certificate_hosts, check_certificate, check_node_name,
                                    check_node_public_key)
from privatune.common.config import ConfigError, bounded, build, read_yaml
from privatune.server.site_keys import SiteKeyFile, SiteKeys, SiteKeysError

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
    # site name -> that hospital's .pub file: registered at every start, and the site's identity
    # (a node's replies count for the site whose key it authenticated with)
    public_keys: tuple[SiteKeyFile, ...] = ()


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
    nodes = data.get("nodes")
    keys = nodes.pop("public_keys", None) if isinstance(nodes, dict) else None
    deployment = build(CoordinatorDeployment, {**data, "source": str(path)}, str(path), lines)
    deployment = dataclasses.replace(deployment, nodes=NodesSection(
        _site_key_files(deployment, keys, path, lines)))
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
    for key_file in deployment.nodes.public_keys:
        try:
            check_node_public_key(key_file.path)
        except CertError as err:
            raise ConfigError(f"{path}: nodes.public_keys.{key_file.site}: {err}") from err
    try:
        SiteKeys.from_files(deployment.nodes.public_keys)
    except SiteKeysError as err:
        raise ConfigError(f"{path}: {err}") from err
    return deployment


def _site_key_files(deployment: CoordinatorDeployment, value: Any, path: str | Path,
                    lines: dict[str, int]) -> tuple[SiteKeyFile, ...]:
    """``nodes.public_keys``, a mapping of site name (the hospital policy's ``site.name``) to its
    key file. A plain list of files, the old form, says no site and is refused with the fix."""

    def where(key: str) -> str:
        return f"{path}, line {lines[key]}: {key}" if key in lines else f"{path}: {key}"

    if value is None or value == [] or value == {}:
        return ()
    if isinstance(value, list):
        raise ConfigError(f"{where('nodes.public_keys')}: a list of key files does not say which "
                          "site each key is; write one 'SITE: KEY.pub' line per hospital, SITE "
                          "being the site.name of its policy (e.g. st-mary: "
                          "../certs/nodes/st-mary.pub)")
    if not isinstance(value, dict):
        raise ConfigError(f"{where('nodes.public_keys')}: expected a mapping of site name to key "
                          f"file, got {value!r}")
    files = []
    for site, key_file in value.items():
        key = f"nodes.public_keys.{site}"
        try:
            check_node_name(str(site))
        except CertError as err:
            raise ConfigError(f"{where(key)}: {err}") from err
        if not isinstance(key_file, str) or not key_file:
            raise ConfigError(f"{where(key)}: expected the path of the site's .pub file, got "
                              f"{key_file!r}")
        files.append(SiteKeyFile(str(site), deployment.resolve(key_file)))
    return tuple(files)
