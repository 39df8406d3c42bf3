"""The site's privacy ledger: an append-only, hash-chained JSONL file kept on disk.

One entry per release that left the site. Adapter updates are DP releases and carry their full
mechanism (so epsilon can be recomputed by anyone); everything else (example counts, losses,
declines) is marked as a non-private release. Each entry holds the hash of the previous one, so
a changed, removed or reordered line is detected and located. The chain is checked on the JSON
as written; what an entry means is read through its type (``AdapterRelease``, ``SecureRelease``,
``NonPrivateRelease``, ``RollbackAcknowledgement``, in ``privatune.common.ledger_records``),
which also writes it. A secure DP-SGD step (``SecureRelease``) is private like an adapter update
and carries both of the site's guarantees; its history is read as the guarantee asked for.
Writes are fsync'ed and made under an exclusive ``flock``. No NaN or infinity is ever written,
and an adapter update whose mechanism cannot be accounted is refused on write and on read: a NaN
compares false with every cap, so it would pass any budget check.

The last line: a crash may over-count, never under-count. A last line without its newline (a
crash after its bytes but before the newline reached the disk, an editor, a copy tool) that
parses and chains (right seq, prev_hash and hash) is a complete entry: it is kept and its
newline restored. Only a last line that does not parse or does not chain is torn: it is moved,
byte for byte, to a ``<ledger>.torn-*`` side file (never lost), logged as a WARNING and exposed
as ``SiteLedger.set_aside`` so the node can surface it; ``audit`` reports both the torn line
and the side file as problems.

The head is also recorded beside the ledger (``<ledger>.head``, written atomically after each
append): a ledger file put back from an older copy, or deleted, no longer holds the head the
node itself recorded (``witnessed_head``).

Anchoring: every reply a node sends carries its ledger's head (``LedgerHead``: the number of
entries and the last entry's hash) and the coordinator keeps it. A ledger that no longer holds
a head it reported (``head_problem``: a cut tail, or a history rewritten and re-chained) is
behind what left the site. After an operator acknowledges such a rollback, a
``rollback_acknowledged`` entry records the spend the coordinator held for the site, and the
site's epsilon is that reported spend composed (basic composition: epsilons and deltas add)
with everything the ledger still accounts (``RollbackFloor``): the lost releases are never
forgotten, and the surviving ones may be counted twice, an over-count, never an under-count.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from privatune.common.durable import fsync_dir, write_atomically
from privatune.common.ledger_records import (GUARANTEES, PRIVATE_KINDS, AdapterRelease,
                                             LedgerRecord, Numbered, RecordT,
                                             RollbackAcknowledgement, RollbackFloor, SecureRelease,
                                             entry_problem, is_adapter_update, record_of)
from privatune.common.privacy import PRV, Step, epsilon_of

GENESIS_HASH = "0" * 64

log = logging.getLogger(__name__)


class LedgerError(ValueError):
    """The ledger file is broken; the message names the file and the first bad line."""

    def __init__(self, message: str, line: int):
        super().__init__(message)
        self.line = line


class LedgerWriteError(OSError):
    """An entry could not be written (disk full, file too large, I/O error). The ledger was cut
    back to the entries it held before, so it stays valid; what the entry records must not
    leave the site."""


@dataclass(frozen=True)
class SetAside:
    """A torn last line moved out of the ledger: where it went, and what to tell the operator."""

    side_file: Path
    message: str


@dataclass(frozen=True)
class LedgerHead:
    """Where a ledger stood when a reply left: ``seq`` entries (the last one's number) and the
    last entry's hash; an empty ledger is (0, GENESIS_HASH), and ``seq`` -1 means unknown (the
    coordinator has no reply of the site yet)."""

    seq: int
    hash: str

    @property
    def known(self) -> bool:
        return self.seq >= 0


NO_HEAD = LedgerHead(-1, "")


def head_problem(entries: list[dict[str, Any]], head: LedgerHead,
                 holder: str = "the site reported") -> str | None:
    """Why verified ``entries`` do not hold ``head`` (a head the site reported, or the node's
    own witness of it: ``holder`` says which, for the message), or None.

    A ledger shorter than the head lost its tail; one whose entry at the head's number has
    another hash was rewritten (re-chained or not) since the head was reported.
    """
    if not head.known:
        return None
    if len(entries) < head.seq:
        return (f"the ledger has {len(entries)} entries, but {holder} a head at entry "
                f"{head.seq} (entries were removed from its tail)")
    held = entries[head.seq - 1]["hash"] if head.seq else GENESIS_HASH
    if held != head.hash:
        return (f"entry {head.seq} has hash {held[:16]}..., but {holder} "
                f"{head.hash[:16]}... for it (its history was rewritten)")
    return None


def entry_hash(entry: Mapping[str, Any]) -> str:
    """Hash of an entry's canonical JSON, excluding its own ``hash`` field."""
    body = {k: v for k, v in entry.items() if k != "hash"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()



def _verified(line: str, number: int, previous: str, path: Path) -> dict[str, Any]:
    """The entry on ``line``, checked to sit at ``number`` right after the entry ``previous``."""
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
    return entry


def _parse(raw: bytes, path: Path) -> tuple[list[dict[str, Any]], str | None]:
    """Entries and torn last line of a ledger's bytes (see ``read_entries``)."""
    lines = raw.decode("utf-8", errors="replace").split("\n")
    last = lines.pop()  # "" when the file ends with its newline
    entries: list[dict[str, Any]] = []
    previous = GENESIS_HASH
    for number, line in enumerate(lines, start=1):
        entries.append(_verified(line, number, previous, path))
        previous = entries[-1]["hash"]
    if not last:
        return entries, None
    try:
        entries.append(_verified(last, len(lines) + 1, previous, path))
    except LedgerError:
        return entries, last
    return entries, None


def read_entries(path: Path) -> tuple[list[dict[str, Any]], str | None]:
    """Parse and verify a ledger, read-only; return its entries and its torn last line, if any.

    A last line without its newline that parses and chains is a complete entry and is returned
    with the others; one that does not is the torn line. Raises LedgerError at the first bad
    line before the last; the entries before its ``line`` are verified.
    """
    if not path.exists():
        return [], None
    return _parse(path.read_bytes(), path)


def _encode(entry: Mapping[str, Any], path: Path) -> bytes:
    """The entry as one JSON line's bytes; NaN and infinity are refused (JSON has neither)."""
    try:
        text = json.dumps(entry, sort_keys=True, ensure_ascii=True, allow_nan=False)
    except ValueError as err:
        raise ValueError(f"{path}: refusing to write a {entry.get('kind')} entry holding NaN or "
                         f"infinity ({err}); nothing was written") from err
    return text.encode("ascii") + b"\n"


class SiteLedger:
    """Append-only privacy ledger of one site, verified and its last line repaired when opened.

    ``set_aside`` is the latest torn line this instance moved out of the ledger, or None.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.entries: list[dict[str, Any]] = []
        self.set_aside: SetAside | None = None
        if not self.path.exists():
            return
        raw = self.path.read_bytes()
        if raw[-1:] in (b"", b"\n"):  # nothing to repair: no lock, and a read-only copy opens
            self.entries, _ = self._checked(raw)
        else:
            with self._locked() as handle:
                self._load(handle)

    @contextmanager
    def _locked(self) -> Iterator[BinaryIO]:
        """The ledger open to read and append, under an exclusive lock across processes: one
        writer or repairer at a time, so no one cuts or forks a line another is writing."""
        with open(self.path, "a+b") as handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            try:
                yield handle
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)

    def _load(self, handle: BinaryIO) -> None:
        """Read and verify the locked ledger; restore a complete last line's newline, set a torn
        one aside. A broken ledger raises LedgerError before anything is changed."""
        handle.seek(0)
        raw = handle.read()
        entries, torn = self._checked(raw)
        if torn is not None:
            self._set_aside(handle, raw)
        elif raw and not raw.endswith(b"\n"):
            handle.write(b"\n")
            _sync(handle)
        self.entries = entries

    def _checked(self, raw: bytes) -> tuple[list[dict[str, Any]], str | None]:
        """Entries and torn last line of the ledger's bytes; LedgerError at a chain break or at
        an adapter update whose mechanism cannot be accounted."""
        entries, torn = _parse(raw, self.path)
        for entry in entries:
            if problem := entry_problem(entry):
                raise LedgerError(f"{self.path}, line {entry['seq']}: {problem}", entry["seq"])
        return entries, torn

    def _set_aside(self, handle: BinaryIO, raw: bytes) -> None:
        """Move a torn last line, byte for byte, to a new side file, then cut it from the ledger."""
        cut = raw.rfind(b"\n") + 1
        aside = self._write_side_file(raw[cut:])
        handle.truncate(cut)
        _sync(handle)
        message = (f"{self.path}: the last line was incomplete or did not chain to the entry "
                   f"before it; it was moved to {aside} and is not counted in this site's "
                   f"epsilon. Review it before trusting the ledger")
        log.warning(message)
        self.set_aside = SetAside(aside, message)

    def _write_side_file(self, tail: bytes) -> Path:
        """Durably write ``tail`` to a side file that did not exist before: none is overwritten."""
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        attempt = 0
        while True:
            attempt += 1
            aside = self.path.with_name(f"{self.path.name}.torn-{stamp}-{attempt}")
            try:
                with open(aside, "xb") as side:
                    side.write(tail)
                    _sync(side)
            except FileExistsError:
                continue
            fsync_dir(self.path.parent)
            return aside

    def _write_line(self, handle: BinaryIO, line: bytes, seq: int) -> None:
        """Append ``line`` and fsync it, or cut the file back to where it was and raise.

        Written with ``os.write`` on the descriptor, not through the buffered handle: a buffer
        that kept the unwritten rest of a failed line would write it out when the handle closes.
        """
        handle.flush()
        fd = handle.fileno()
        length = os.fstat(fd).st_size
        try:
            view = memoryview(line)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        except OSError as err:
            try:
                os.ftruncate(fd, length)
                os.fsync(fd)
            except OSError as cut_err:
                raise LedgerWriteError(
                    f"{self.path}: entry {seq} could not be written ({err.strerror or err}) and "
                    f"the file could not be cut back ({cut_err.strerror or cut_err}); its last "
                    "line will be set aside as torn when the ledger is next opened") from err
            raise LedgerWriteError(
                f"{self.path}: entry {seq} could not be written ({err.strerror or err}); the "
                f"ledger was cut back to its {seq - 1} entries and is valid") from err

    @property
    def last_hash(self) -> str:
        return self.entries[-1]["hash"] if self.entries else GENESIS_HASH

    @property
    def head(self) -> LedgerHead:
        return LedgerHead(len(self.entries), self.last_hash)

    def append(self, kind: str, fields: Mapping[str, Any]) -> dict[str, Any]:
        """Durably append one entry (flush + fsync) and return it.

        An entry its reader would reject (a NaN or an infinity anywhere, an adapter update whose
        mechanism cannot be accounted) raises ValueError before anything is written. A write or
        fsync that fails raises LedgerWriteError, the file cut back to its previous length.
        """
        entry: dict[str, Any] = {
            "seq": len(self.entries) + 1,
            "kind": kind,
            "private": kind in PRIVATE_KINDS,
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            **fields,
        }
        if problem := entry_problem(entry):
            raise ValueError(f"{self.path}: refusing to write a {kind} entry: {problem}; "
                             "nothing was written")
        _encode(entry, self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        new_file = not self.path.exists()
        with self._locked() as handle:
            # Re-read the tail under the lock so an entry another process appended meanwhile is
            # chained, never forked.
            self._load(handle)
            entry["seq"] = len(self.entries) + 1
            entry["prev_hash"] = self.last_hash
            entry["hash"] = entry_hash(entry)
            self._write_line(handle, _encode(entry, self.path), entry["seq"])
        if new_file:
            fsync_dir(self.path.parent)
        self.entries.append(entry)
        self._witness()
        return entry

    @property
    def witness_path(self) -> Path:
        return self.path.with_name(self.path.name + ".head")

    def _witness(self) -> None:
        """Record the head beside the ledger, so a ledger file put back from an older copy, or
        deleted, is caught by the node itself. Best effort: the entry is already durable, and a
        witness that lags the ledger is still one of its heads."""
        head = self.head
        try:
            write_atomically(self.witness_path,
                             json.dumps({"seq": head.seq, "hash": head.hash}).encode("ascii"))
        except OSError as err:
            log.warning("%s: the ledger's head could not be recorded (%s)", self.witness_path,
                        err.strerror or err)

    def witnessed_head(self) -> LedgerHead:
        """The head last recorded beside the ledger; NO_HEAD when there is none (or it cannot be
        read: then only the coordinator's anchor and the kept releases stand in for it)."""
        try:
            data = json.loads(self.witness_path.read_text(encoding="ascii"))
            return LedgerHead(int(data["seq"]), str(data["hash"]))
        except FileNotFoundError:
            return NO_HEAD
        except (OSError, ValueError, KeyError, TypeError) as err:
            log.warning("%s: unreadable (%s); not used", self.witness_path, err)
            return NO_HEAD

    def adapter_updates(self) -> list[dict[str, Any]]:
        """The adapter update entries as written (with their seq, time and hashes)."""
        return [e for e in self.entries if is_adapter_update(e)]

    def records(self) -> list[LedgerRecord]:
        """Every entry read as its type, in order: the record at index i is entry i + 1 (each
        checked when the ledger was read)."""
        return [record_of(e) for e in self.entries]

    def releases(self, run_id: str | None = None) -> list[AdapterRelease]:
        """Every adapter update (of ``run_id``, if given), in order."""
        return [r for r in self.records() if isinstance(r, AdapterRelease)
                and (run_id is None or r.run_id == run_id)]

    def secure_releases(self, run_id: str | None = None) -> list[SecureRelease]:
        """Every secure update (of ``run_id``, if given), in order."""
        return [r for r in self.records() if isinstance(r, SecureRelease)
                and (run_id is None or r.run_id == run_id)]

    def append_record(self, record: RecordT) -> Numbered[RecordT]:
        """Durably append a typed entry (see ``append``); the record with its entry's number."""
        return Numbered(self.append(record.KIND, record.fields())["seq"], record)

    def mechanism_history(self, guarantee: str = "enforced") -> list[Step]:
        """Every DP mechanism this site has released, in order; a secure update as the step of
        the named guarantee (``SecureRelease.mechanism``)."""
        if guarantee not in GUARANTEES:
            raise ValueError(f"unknown guarantee {guarantee!r} (known: {', '.join(GUARANTEES)})")
        return [r.step if isinstance(r, AdapterRelease) else r.mechanism(guarantee)
                for r in self.records() if isinstance(r, (AdapterRelease, SecureRelease))]

    def floor(self) -> RollbackFloor:
        """The floor of the latest acknowledged rollback (an earlier one is inside the spend the
        site reported since, so only the latest counts); zero without one."""
        acknowledged = [r for r in self.records() if isinstance(r, RollbackAcknowledgement)]
        return acknowledged[-1].floor if acknowledged else RollbackFloor()

    def epsilon(self, delta: float, accountant: str = PRV, then: Sequence[Step] = (),
                guarantee: str = "enforced") -> float:
        """Epsilon of everything this site has released so far, and of the steps ``then`` if
        they were released too, recomputed from the whole mechanism history by ``accountant``
        (entries written under another accountant keep their recorded figures; their mechanisms
        are composed like any other), plus the floor of an acknowledged rollback (then at delta
        plus the floor's delta). Secure updates count by ``guarantee`` (``then`` holds secure
        steps already in that form), and make the whole history count by RDP."""
        return self.floor().epsilon + epsilon_of(
            [*self.mechanism_history(guarantee), *then], delta, accountant)


def _sync(handle: BinaryIO) -> None:
    handle.flush()
    os.fsync(handle.fileno())
