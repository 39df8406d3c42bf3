"""The coordinator's use of Flower's ``flwr`` command line.

``flwr`` reads SuperLink connections (address, root certificate) from
``$FLWR_HOME/config.toml``, not from ``pyproject.toml``. The coordinator writes one
connection, ``privatune``, into its own ``FLWR_HOME`` (under its state directory, so a
user's ``~/.flwr`` is never touched) and runs every ``flwr`` command against it with
``--format json``, so what it does can be repeated by hand:
``FLWR_HOME=<state_dir>/flwr flwr ls privatune``.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from privatune.common.flower_process import flower_env, flower_tool
from privatune.server.deployment import CoordinatorDeployment, DeploymentError

CONNECTION = "privatune"
"""Name of the SuperLink connection in the coordinator's ``$FLWR_HOME/config.toml``."""


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


def flwr_command(*args: str) -> list[str]:
    """``flwr <args> privatune``: the connection name goes after the command's positionals."""
    return [flower_tool("flwr"), *args, CONNECTION]


def flwr(deployment: CoordinatorDeployment, *args: str, options: Sequence[str] = (),
         timeout_s: float = 120.0) -> dict[str, Any]:
    """Run ``flwr <args> privatune <options> --format json`` and return its JSON answer."""
    command = [*flwr_command(*args), *options, "--format", "json"]
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
