"""A site's state directory, its one layout: the ledger, the releases kept for resending, the
node's lock.

::

    <state_dir>/ledger.jsonl          the privacy ledger (common.ledger), and ledger.jsonl.head
    <state_dir>/released/<run>-round<NNNN>.json         what an accepted reply released
    <state_dir>/released/<run>-round<NNNN>.safetensors  the update it sent
    <state_dir>/node.lock             held by the one node process answering a request

A kept release is evidence as well as a cache: it is written only after the ledger entry that
lists its update, so a release on disk that the ledger does not list means the ledger lost
entries (restored from an older copy, or deleted). Release files are written atomically
(temporary file, fsync, rename): a crash leaves the old file or the new one, never a torn one;
a file that is torn all the same (edited, damaged) is answered as missing, with a warning.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import shutil
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from privatune.common.durable import write_atomically
from privatune.common.ledger_records import AdapterRelease, LedgerRecord, RollbackAcknowledgement
from privatune.common.lora import update_hash
from privatune.common.protocol import TrainReply

log = logging.getLogger(__name__)


class SiteBusy(RuntimeError):
    """Another process holds this site's state: two nodes must not spend one budget at once."""


@dataclass(frozen=True)
class KeptRelease:
    """One kept release: the reply an accepted round sent, and the hash of its update."""

    path: Path  # the .json file
    run_id: str  # "" in files kept before the run id was recorded
    round: int
    input_sha256: str  # the global adapter the round trained from
    update_sha256: str
    reply: TrainReply  # as sent

    @property
    def epsilon(self) -> float:
        """The site's cumulative epsilon when this release left (the reply's)."""
        return self.reply.epsilon

    @property
    def delta(self) -> float:
        return self.reply.delta


def listed_updates(records: Sequence[LedgerRecord]) -> set[str]:
    """Update hashes the ledger lists: its adapter updates', and those a rollback
    acknowledgement took back in after they were found lost from it."""
    listed = {r.update_sha256 for r in records
              if isinstance(r, AdapterRelease) and r.update_sha256 is not None}
    for record in records:
        if isinstance(record, RollbackAcknowledgement):
            listed.update(record.recovered_releases or ())
    return listed


class SiteState:
    """The files of one site's state directory (see the module docstring)."""

    def __init__(self, state_dir: Path):
        self.directory = state_dir
        self.ledger_path = state_dir / "ledger.jsonl"
        self.released_dir = state_dir / "released"
        self.lock_path = state_dir / "node.lock"

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        """Hold this site's lock from the budget check to the ledger append, across processes.

        Raises SiteBusy at once when another process holds it: a second node on the same state
        would check the budget before the first one's entry exists and both could spend it.
        """
        self.directory.mkdir(parents=True, exist_ok=True)
        with open(self.lock_path, "a+b") as handle:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError as err:
                raise SiteBusy(
                    f"another privatune node process is answering a request with this site's "
                    f"state directory ({self.directory}) right now; one node per site: the "
                    "request is declined and nothing was trained or spent") from err
            try:
                yield
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)

    def free_bytes(self) -> int:
        """Free space where the ledger and the kept releases are written."""
        self.directory.mkdir(parents=True, exist_ok=True)
        return shutil.disk_usage(self.directory).free

    def _stem(self, run_id: str, round_number: int) -> Path:
        safe_run = hashlib.sha256(run_id.encode()).hexdigest()[:16]
        return self.released_dir / f"{safe_run}-round{round_number:04d}"

    def keep(self, run_id: str, round_number: int, input_sha256: str,
             state: Mapping[str, torch.Tensor], reply: TrainReply) -> None:
        """Keep the update an accepted round sent (after its ledger entry), to resend it if the
        reply is lost. The update first, then its record: a record always has its update."""
        stem = self._stem(run_id, round_number)
        self.released_dir.mkdir(parents=True, exist_ok=True)
        write_atomically(stem.with_suffix(".safetensors"),
                          save({n: t.contiguous() for n, t in state.items()}))
        meta = {"run_id": run_id, "round": round_number, "input_sha256": input_sha256,
                "update_sha256": update_hash(state), "reply": reply.to_json()}
        write_atomically(stem.with_suffix(".json"), json.dumps(meta).encode("utf-8"))

    def _read(self, meta_path: Path) -> KeptRelease | None:
        """The release a record describes; None (and a warning) when it is torn or unreadable."""
        round_text = meta_path.stem.rpartition("-round")[2]
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            update_sha256 = meta.get("update_sha256") or update_hash(
                load_file(str(meta_path.with_suffix(".safetensors"))))
            return KeptRelease(meta_path, str(meta.get("run_id", "")),
                               int(meta.get("round", round_text)), str(meta["input_sha256"]),
                               str(update_sha256), TrainReply.from_json(meta["reply"]))
        except (OSError, ValueError, KeyError, TypeError, AttributeError, SafetensorError) as err:
            log.warning("%s: kept release is torn or unreadable (%s); answered as missing",
                        meta_path, err)
            return None

    def kept(self, run_id: str, round_number: int) -> KeptRelease | None:
        """The release kept for this run and round, or None."""
        meta_path = self._stem(run_id, round_number).with_suffix(".json")
        return self._read(meta_path) if meta_path.is_file() else None

    def update(self, release: KeptRelease) -> dict[str, torch.Tensor] | None:
        """The update a release sent, or None when its file is missing, torn or not the one the
        record names."""
        try:
            state = load_file(str(release.path.with_suffix(".safetensors")))
        except (OSError, SafetensorError) as err:
            log.warning("%s: kept update is missing or torn (%s); answered as missing",
                        release.path, err)
            return None
        return state if update_hash(state) == release.update_sha256 else None

    def kept_releases(self) -> list[KeptRelease]:
        """Every readable kept release, in file-name order."""
        if not self.released_dir.is_dir():
            return []
        found = (self._read(p) for p in sorted(self.released_dir.glob("*.json")))
        return [release for release in found if release is not None]

    def unlisted_releases(self, records: Sequence[LedgerRecord]) -> list[KeptRelease]:
        """Kept releases whose update the ledger does not list: the ledger lost them."""
        listed = listed_updates(records)
        return [r for r in self.kept_releases() if r.update_sha256 not in listed]
