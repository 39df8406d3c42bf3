"""Which hospitals may connect: their public keys, registered with the SuperLink.

The SuperLink runs with ``--enable-supernode-auth``, so a SuperNode is refused unless its
public key was registered (``flwr supernode register``). Registrations are kept in the
SuperLink's state database across restarts.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from privatune.common.certs import check_node_public_key
from privatune.common.flower_process import flower_tool
from privatune.server.deployment import CoordinatorDeployment, DeploymentError, Progress, say
from privatune.server.flwr_cli import CONNECTION, flwr
from privatune.server.site_keys import SiteKeyFile, SiteKeys


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


def register_all(deployment: CoordinatorDeployment, extra: Sequence[SiteKeyFile] = (),
                 progress: Progress = say) -> SiteKeys:
    """Register every configured key (in parallel: each ``flwr`` call is a Python start-up);
    returns which site each key is."""
    keys = [*deployment.nodes.public_keys, *extra]
    sites = SiteKeys.from_files(keys)  # ambiguous extras fail before anything is registered
    with ThreadPoolExecutor(max_workers=4) as pool:
        for key, line in zip(keys, pool.map(lambda key: register_node(deployment, key.path), keys)):
            progress(f"node key of site {key.site}: {line}")
    if not keys:
        progress("no hospital public keys configured (nodes.public_keys, SITE: KEY.pub): no node "
                 "can take part in a run")
    return sites


def write_site_keys(deployment: CoordinatorDeployment, sites: SiteKeys) -> Path:
    """The binding the ServerApp reads (run config ``site-keys``), next to the run config."""
    return sites.write(deployment.home / "site-keys.json")


def registration_command(deployment: CoordinatorDeployment, public_key: Path) -> str:
    """The one command that registers a hospital's key with a running SuperLink."""
    return (f"FLWR_HOME={deployment.home} {flower_tool('flwr')} supernode register "
            f"{public_key} {CONNECTION}")


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
