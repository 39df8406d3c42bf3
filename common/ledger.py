"""The site's privacy ledger: an append-only, hash-chained JSONL file kept on disk.

One entry per release that left the site. Adapter updates are DP releases and carry their
full mechanism (so epsilon can be recomputed by anyone); everything else (example counts,
losses, declines) is marked as a non-private release. Each entry holds the hash of the
previous one, so a changed, removed or reordered line is detected and located. Writes are
fsync'ed; a line torn by a crash is moved aside, never silently kept or dropped.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from privatune.common.privacy import MechanismStep, rdp_epsilon

GENESIS_HASH = "0" * 64
ADAPTER_UPDATE = "adapter_update"
NON_PRIVATE = "non_private"


class LedgerError(ValueError):
    """The ledger file is broken; the message names the file and the first bad line."""

    def __init__(self, message: str, line: int):
        super().__init__(message)
        self.line = line


def entry_hash(entry: Mapping[str, Any]) -> str:
    """Hash of an entry's canonical JSON, excluding its own ``hash`` field."""
    body = {k: v for k, v in entry.items() if k != "hash"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()


def read_entries(path: Path) -> tuple[list[dict[str, Any]], str | None]:
    """Parse and verify a ledger; return its entries and a torn final line, if any.

    Raises LedgerError at the first line whose content, position or link is wrong; the
    entries before its ``line`` are verified.
    """
    entries: list[dict[str, Any]] = []
    if not path.exists():
        return entries, None
    raw = path.read_bytes().decode("utf-8", errors="replace")
    lines = raw.split("\n")
    torn = None
    if lines and lines[-1] != "":
        torn = lines.pop()  # no newline: the write of this line never completed
    elif lines:
        lines.pop()
    previous = GENESIS_HASH
    for number, line in enumerate(lines, start=1):
        where = f"{path}, line {number}"
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as err:
            raise LedgerError(f"{where}: not valid JSON ({err.msg})", number) from err
        if not isinstance(entry, dict):
            raise LedgerError(f"{where}: entry is not a JSON object", number)
        if entry.get("seq") != number:
            raise LedgerError(f"{where}: sequence number {entry.get('seq')!r}, expected {number}"
                              " (an entry was removed, inserted or reordered)", number)
        if entry.get("prev_hash") != previous:
            raise LedgerError(f"{where}: link to the previous entry is broken"
                              " (an earlier entry was changed, removed or reordered)", number)
        if entry.get("hash") != entry_hash(entry):
            raise LedgerError(f"{where}: content does not match its hash (entry was changed)", number)
        previous = entry["hash"]
        entries.append(entry)
    return entries, torn


class SiteLedger:
    """Append-only privacy ledger of one site, verified when opened."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.entries, torn = read_entries(self.path)
        if torn is not None:
            self._set_aside_torn_tail(torn)

    def _set_aside_torn_tail(self, torn: str) -> None:
        """Keep a crash-torn last line in a side file and cut it from the ledger."""
        aside = self.path.with_suffix(self.path.suffix + f".torn-{int(time.time())}")
        aside.write_text(torn, encoding="utf-8")
        with open(self.path, "r+b") as handle:
            content = handle.read()
            cut = content.rfind(b"\n") + 1
            handle.truncate(cut)
            handle.flush()
            os.fsync(handle.fileno())

    @property
    def last_hash(self) -> str:
        return self.entries[-1]["hash"] if self.entries else GENESIS_HASH

    def append(self, kind: str, fields: Mapping[str, Any]) -> dict[str, Any]:
        """Durably append one entry (flush + fsync) and return it."""
        entry: dict[str, Any] = {
            "seq": len(self.entries) + 1,
            "kind": kind,
            "private": kind == ADAPTER_UPDATE,
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            **fields,
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        new_file = not self.path.exists()
        with open(self.path, "a", encoding="ascii") as handle:
            # One writer at a time, across processes: re-read the tail under the lock so an
            # entry another process appended meanwhile is chained, never forked.
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            try:
                self.entries, torn = read_entries(self.path)
                if torn is not None:
                    self._set_aside_torn_tail(torn)
                entry["seq"] = len(self.entries) + 1
                entry["prev_hash"] = self.last_hash
                entry["hash"] = entry_hash(entry)
                handle.write(json.dumps(entry, sort_keys=True, ensure_ascii=True) + "\n")
                handle.flush()
                os.fsync(handle.fileno())
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
        if new_file:
            _fsync_dir(self.path.parent)
        self.entries.append(entry)
        return entry

    def adapter_updates(self) -> list[dict[str, Any]]:
        return [e for e in self.entries if e["kind"] == ADAPTER_UPDATE]

    def mechanism_history(self) -> list[MechanismStep]:
        """Every DP mechanism this site has released, in order."""
        return [MechanismStep(float(e["noise_multiplier"]), float(e["sample_rate"]),
                              int(e["steps"])) for e in self.adapter_updates()]

    def epsilon(self, delta: float) -> float:
        """Epsilon of everything this site has released so far, recomputed from history."""
        return rdp_epsilon(self.mechanism_history(), delta)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
