"""Which site each node is: the hospital public keys of ``nodes.public_keys``, by site name.

A site's identity at the coordinator is the key its SuperNode authenticates with, not the
name its replies report. ``privatune coordinator`` writes the binding next to the run config
(``site-keys``); the ServerApp reads it and matches it against the key the SuperLink holds for
each connected node (``Grid.get_nodes()``): a node id is bound to the site whose key it
authenticated with, however and whenever that key was registered (``flwr supernode register``
answers with no node id for a key already registered).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

from privatune.common.certs import CertError, check_node_name, check_node_public_key
from privatune.common.durable import write_atomically

if TYPE_CHECKING:
    from flwr.proto.node_pb2 import NodeInfo


class SiteKeysError(ValueError):
    """A site-keys file that cannot be read, or a binding that is ambiguous."""


@dataclass(frozen=True)
class SiteKeyFile:
    """One hospital's public key file (OpenSSH ``.pub``) and the site it authenticates: the
    ``site.name`` of that hospital's policy."""

    site: str
    path: Path


@dataclass(frozen=True)
class SiteKey:
    """One site and its public key, as the DER SubjectPublicKeyInfo bytes in hex (the form
    compared with what the SuperLink holds for a node)."""

    site: str
    public_key: str


@dataclass(frozen=True)
class SiteKeys:
    """The sites a run knows and the key each authenticates with."""

    keys: tuple[SiteKey, ...]

    @classmethod
    def from_files(cls, files: Iterable[SiteKeyFile]) -> SiteKeys:
        """Read every key file; a site named twice or one key for two sites is an error."""
        keys: list[SiteKey] = []
        for file in files:
            try:
                check_node_name(file.site)
                check_node_public_key(file.path)
            except CertError as err:
                raise SiteKeysError(f"site {file.site!r}: {err}") from err
            key = serialization.load_ssh_public_key(file.path.read_bytes())
            keys.append(SiteKey(file.site, _der_hex(key)))
        return cls(_unambiguous(keys))

    def sites_of(self, nodes: Iterable[NodeInfo]) -> dict[int, str]:
        """The site each node authenticated as; a node whose key is no site's is left out."""
        by_key = {key.public_key: key.site for key in self.keys}
        bound = {}
        for node in nodes:
            site = by_key.get(_node_key(node.public_key))
            if site is not None:
                bound[int(node.node_id)] = site
        return bound

    def to_json(self) -> dict[str, list[dict[str, str]]]:
        return {"sites": [{"site": k.site, "public_key": k.public_key} for k in self.keys]}

    def write(self, path: Path) -> Path:
        write_atomically(path, (json.dumps(self.to_json(), indent=2) + "\n").encode("utf-8"))
        return path

    @classmethod
    def read(cls, path: Path) -> SiteKeys:
        """Read a file ``write`` wrote; anything else is an error naming the file."""
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
            entries = data["sites"]
            keys = [SiteKey(str(e["site"]), str(e["public_key"])) for e in entries]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise SiteKeysError(f"{path}: not a site-keys file ({err})") from err
        for key in keys:
            try:
                check_node_name(key.site)
            except CertError as err:
                raise SiteKeysError(f"{path}: {err}") from err
        return cls(_unambiguous(keys, str(path)))


def _der_hex(key: PublicKeyTypes) -> str:
    """A public key as hex of its DER SubjectPublicKeyInfo: one form whatever it was read from."""
    return key.public_bytes(serialization.Encoding.DER,
                            serialization.PublicFormat.SubjectPublicKeyInfo).hex()


def _node_key(pem: bytes) -> str:
    """The key the SuperLink holds for a node (PEM, as ``flwr supernode register`` sent it) in
    the form of ``SiteKey.public_key``; "" for none (in simulation nodes have random bytes)."""
    try:
        return _der_hex(serialization.load_pem_public_key(pem))
    except (ValueError, TypeError, UnsupportedAlgorithm):
        return ""


def _unambiguous(keys: list[SiteKey], where: str = "nodes.public_keys") -> tuple[SiteKey, ...]:
    """The keys, unless a site has two or a key two sites: then no node could be told apart."""
    sites: set[str] = set()
    owners: dict[str, str] = {}
    for key in keys:
        if key.site in sites:
            raise SiteKeysError(f"{where}: site {key.site!r} is named twice")
        if key.public_key in owners:
            raise SiteKeysError(f"{where}: sites {owners[key.public_key]!r} and {key.site!r} "
                                "have the same public key; each hospital needs its own key pair")
        sites.add(key.site)
        owners[key.public_key] = key.site
    return tuple(keys)
