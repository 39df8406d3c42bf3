"""The OS processes of a loopback deployment, found by what they run and stopped or limited
as a fault would: /proc, signals and resource limits (Linux)."""

from __future__ import annotations

import os
import resource
import signal
from collections.abc import Sequence
from pathlib import Path


def _processes() -> dict[int, tuple[int, list[str]]]:
    """Every process now: pid -> (parent pid, argv)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        found[int(entry.name)] = (int(stat.rsplit(")", 1)[1].split()[1]), argv)
    return found


def tool_pids(tool: str, superlink_port: int) -> list[int]:
    """PIDs of a Flower tool's processes serving or attached to OUR SuperLink (matched by its
    port: other people's SuperLinks may run on this machine at the same time)."""
    return sorted(pid for pid, (_, argv) in _processes().items()
                  if any(Path(a).name == tool for a in argv[:2])
                  and any(a == str(superlink_port) or a.endswith(f":{superlink_port}")
                          for a in argv))


def serverapp_pids(superlink_port: int) -> list[int]:
    return tool_pids("flwr-serverapp", superlink_port)


def descendants(root: int) -> list[int]:
    """``root`` and every process below it (a SuperNode, its SuperExec and ClientApps)."""
    children: dict[int, list[int]] = {}
    for pid, (parent, _) in _processes().items():
        children.setdefault(parent, []).append(pid)
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += children.get(pid, [])
    return sorted(found)


def limit_file_size(pids: Sequence[int], limit: int) -> list[int]:
    """Set the soft file size limit of running processes (their children inherit it); Python
    ignores SIGXFSZ, so a write past the limit fails with EFBIG. Returns those it was set on."""
    done = []
    for pid in pids:
        try:
            hard = resource.prlimit(pid, resource.RLIMIT_FSIZE)[1]
            resource.prlimit(pid, resource.RLIMIT_FSIZE, (limit, hard))
        except (ProcessLookupError, PermissionError):
            continue
        done.append(pid)
    return done


def kill(pids: Sequence[int]) -> None:
    """SIGKILL each process still running (a crash, not a shutdown)."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
