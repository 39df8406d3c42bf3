"""Starting Flower's own executables (SuperLink, SuperNode, flwr) from this environment."""

from __future__ import annotations

import os
import sys
from pathlib import Path


def flower_env(home: Path) -> dict[str, str]:
    """Environment for Flower's tools: our FLWR_HOME, this venv's bin first on PATH (Flower
    starts ``flower-superexec``, ``flwr-serverapp`` and ``flwr-clientapp`` by name) and
    unbuffered output so progress lines arrive as they happen."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["FLWR_HOME"] = str(home)
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("NO_COLOR", "1")
    return env


def flower_tool(name: str) -> str:
    """A Flower executable from this interpreter's environment, else from PATH."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else name
