"""SecAgg+'s configuration and messages, and their codec: what a site and the coordinator send.

Every message is a frozen dataclass with ``to_dict`` / ``from_dict`` over ints, bytes and lists
of them (what a Flower ConfigRecord holds); a missing or unknown key, or a value of the wrong
type, is a ``SecAggError``. ``SecAggConfig`` (stage 0, with its neighbour graphs) says who takes
part and how; the stages' messages follow it. The protocol, a site's side of it and the helpers
both sides share are ``privatune.common.secure_aggregation``; the coordinator's side is
``privatune.common.secure_aggregation_coordinator``.
"""

from __future__ import annotations

import dataclasses
import functools
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # typing.Self is Python 3.11; annotations are strings here, so 3.10 runs this
    from typing import Self


MAX_SITE_ID = 2**64 - 1
"""Flower's share framing writes site ids as 8 unsigned bytes."""

WireValue = int | bytes | list[int] | list[bytes]


class SecAggError(ValueError):
    """A message or a step that breaks the protocol; the round stops, nothing is released."""


class SecAggRefused(SecAggError):
    """A site or the coordinator refuses to go on: too few sites or shares, or a request that
    would expose one site's input."""


class SecAggIntegrityError(SecAggError):
    """A ciphertext, share or reconstruction failed its check: tampered, misrouted or corrupted."""


# ------------------------------------------------------------------------------ the codec


_SCALAR_KINDS: dict[str, type] = {"int": int, "bytes": bytes}
_LIST_KINDS: dict[str, type] = {"tuple[int, ...]": int, "tuple[bytes, ...]": bytes}


def _is(value: Any, kind: type) -> bool:
    """``isinstance`` that does not take a bool for an int."""
    return isinstance(value, kind) and not (kind is int and isinstance(value, bool))


class _Wire:
    """Codec of a message: fields are int, bytes, tuple[int, ...] or tuple[bytes, ...]."""

    def to_dict(self) -> dict[str, WireValue]:
        """The message as a flat dict (tuples as lists), ready for a Flower ConfigRecord."""
        out: dict[str, WireValue] = {}
        for fld in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, fld.name)
            out[fld.name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Self:
        """Rebuild a message; a missing or unknown key, or a value of the wrong type, is an error."""
        name = cls.__name__
        known = {fld.name: str(fld.type) for fld in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise SecAggError(f"{name}: unknown key(s) {unknown}")
        values: dict[str, Any] = {}
        for key, kind in known.items():
            if key not in data:
                raise SecAggError(f"{name}: missing key {key!r}")
            raw = data[key]
            if kind in _SCALAR_KINDS:
                if not _is(raw, _SCALAR_KINDS[kind]):
                    raise SecAggError(f"{name}.{key} is a {type(raw).__name__}, not {kind}")
                values[key] = raw
            else:
                item = _LIST_KINDS[kind]
                if not isinstance(raw, (list, tuple)) or not all(_is(v, item) for v in raw):
                    raise SecAggError(f"{name}.{key} is not a list of {item.__name__}")
                values[key] = tuple(raw)
        return cls(**values)


def _unique(owner: str, ids: Sequence[int]) -> None:
    if len(set(ids)) != len(ids):
        raise SecAggError(f"{owner} lists a site twice")


def _same_length(owner: str, **lists: Sequence[Any]) -> None:
    lengths = {key: len(value) for key, value in lists.items()}
    if len(set(lengths.values())) > 1:
        raise SecAggError(f"{owner}: lists of different lengths {lengths}")




def _width(bits: int) -> int:
    return (bits + 7) // 8


# ------------------------------------------------------------------------------ stage 0


def complete_graph(site_ids: Iterable[int]) -> dict[int, tuple[int, ...]]:
    """Every site a neighbour of every other: the right graph for a few sites."""
    ids = sorted(site_ids)
    return {i: tuple(j for j in ids if j != i) for i in ids}


def harary_graph(site_ids: Iterable[int], degree: int, seed: int | None = None) -> dict[int, tuple[int, ...]]:
    """A ``degree``-regular graph (Harary's ring) over a random order of the sites.

    SecAgg+'s sparse neighbourhoods: each site masks with and shares to ``degree`` peers, so
    its cost grows with log n instead of n. An odd degree needs an even number of sites.
    """
    order = sorted(site_ids)
    n = len(order)
    if degree >= n - 1:
        return complete_graph(order)
    if degree < 1:
        raise SecAggError(f"harary_graph: degree {degree} is below 1")
    if degree % 2 and n % 2:
        raise SecAggError(f"harary_graph: an odd degree ({degree}) needs an even number of sites, not {n}")
    random.Random(seed).shuffle(order)
    links: dict[int, set[int]] = {i: set() for i in order}
    for pos, site in enumerate(order):
        steps = list(range(1, degree // 2 + 1)) + ([n // 2] if degree % 2 else [])
        for step in steps:
            peer = order[(pos + step) % n]
            links[site].add(peer)
            links[peer].add(site)
    return {i: tuple(sorted(links[i])) for i in sorted(links)}


@dataclass(frozen=True)
class SecAggConfig(_Wire):
    """Stage 0, coordinator to every sampled site: who takes part and how.

    ``neighbours`` is the graph flattened in ``site_ids`` order (``neighbour_counts`` peers
    each, self excluded), so the message is flat ints. A site's share holders are its
    neighbours and itself; ``threshold`` (t) shares rebuild a secret, at least t masked inputs
    make a sum, and ``2t > holders`` for every site (see the module's docstring).
    """

    round_id: int
    site_ids: tuple[int, ...]
    threshold: int
    modulus_bits: int
    vector_length: int
    neighbour_counts: tuple[int, ...]
    neighbours: tuple[int, ...]

    @classmethod
    def create(
        cls,
        round_id: int,
        site_ids: Iterable[int],
        threshold: int,
        modulus_bits: int,
        vector_length: int,
        graph: Mapping[int, Iterable[int]] | None = None,
    ) -> SecAggConfig:
        """A round's config; ``graph`` (site -> neighbours) defaults to the complete graph."""
        ids = tuple(sorted(site_ids))
        graph = complete_graph(ids) if graph is None else graph
        missing = [i for i in ids if i not in graph]
        if missing or set(graph) - set(ids):
            raise SecAggError(f"SecAggConfig: the graph's sites differ from the sampled sites {list(ids)}")
        rows = [tuple(sorted(graph[i])) for i in ids]
        return cls(
            round_id=round_id,
            site_ids=ids,
            threshold=threshold,
            modulus_bits=modulus_bits,
            vector_length=vector_length,
            neighbour_counts=tuple(len(r) for r in rows),
            neighbours=tuple(j for r in rows for j in r),
        )

    def __post_init__(self) -> None:
        ids = self.site_ids
        if not 0 <= self.round_id <= MAX_SITE_ID:
            raise SecAggError(f"SecAggConfig.round_id {self.round_id} is not in [0, 2^64)")
        if list(ids) != sorted(set(ids)):
            raise SecAggError("SecAggConfig.site_ids must be sorted and distinct")
        if any(not 0 <= i <= MAX_SITE_ID for i in ids):
            raise SecAggError("SecAggConfig.site_ids must be in [0, 2^64)")
        if not 1 <= self.modulus_bits <= 64:
            raise SecAggError(f"SecAggConfig.modulus_bits {self.modulus_bits} is not in [1, 64]")
        if self.vector_length < 1:
            raise SecAggError(f"SecAggConfig.vector_length {self.vector_length} is below 1")
        if self.threshold < 2:
            raise SecAggError(
                f"SecAggConfig.threshold {self.threshold} is below 2: the sum would be one site's input")
        if len(self.neighbour_counts) != len(ids) or sum(self.neighbour_counts) != len(self.neighbours) or any(
                c < 0 for c in self.neighbour_counts):
            raise SecAggError("SecAggConfig: neighbour_counts does not match site_ids and neighbours")
        graph = self.graph()
        for site, peers in graph.items():
            if site in peers or len(set(peers)) != len(peers) or not set(peers) <= set(ids):
                raise SecAggError(f"SecAggConfig: site {site}'s neighbours {list(peers)} are not distinct other sampled sites")
            if any(site not in graph[p] for p in peers):
                raise SecAggError(f"SecAggConfig: the graph is not symmetric at site {site}")
            holders = len(peers) + 1
            if self.threshold > holders:
                raise SecAggError(
                    f"SecAggConfig.threshold {self.threshold} exceeds site {site}'s {holders} share holders")
            if 2 * self.threshold <= holders:
                raise SecAggError(
                    f"SecAggConfig.threshold {self.threshold} is not above half of site {site}'s "
                    f"{holders} share holders: a coordinator could collect both kinds of its shares")

    @functools.cached_property
    def _adjacency(self) -> dict[int, tuple[int, ...]]:
        out: dict[int, tuple[int, ...]] = {}
        start = 0
        for site, count in zip(self.site_ids, self.neighbour_counts, strict=True):
            out[site] = self.neighbours[start:start + count]
            start += count
        return out

    @functools.cached_property
    def _holders(self) -> dict[int, tuple[int, ...]]:
        return {site: tuple(sorted((*peers, site))) for site, peers in self._adjacency.items()}

    def graph(self) -> dict[int, tuple[int, ...]]:
        """Site -> its neighbours (self excluded)."""
        return dict(self._adjacency)

    def share_holders(self, site_id: int) -> tuple[int, ...]:
        """Who holds ``site_id``'s shares, sorted; share number k + 1 belongs to the k-th."""
        return self._holders[site_id]

    @property
    def packed_bytes(self) -> int:
        """Bytes of one masked vector on the wire: ceil(b / 8) per value."""
        return self.vector_length * _width(self.modulus_bits)


# ------------------------------------------------------------------------------ messages


@dataclass(frozen=True)
class PublicKeys(_Wire):
    """Stage 1, site to coordinator: the public halves of its two fresh key pairs (PEM)."""

    round_id: int
    site_id: int
    encryption_key: bytes
    mask_key: bytes


@dataclass(frozen=True)
class KeyDirectory(_Wire):
    """Stage 1, coordinator to every site that sent keys: everyone's public keys."""

    round_id: int
    site_ids: tuple[int, ...]
    encryption_keys: tuple[bytes, ...]
    mask_keys: tuple[bytes, ...]

    def __post_init__(self) -> None:
        _same_length("KeyDirectory", site_ids=self.site_ids, encryption_keys=self.encryption_keys,
                     mask_keys=self.mask_keys)
        _unique("KeyDirectory", self.site_ids)


@dataclass(frozen=True)
class EncryptedShares(_Wire):
    """Stage 2, site to coordinator: for each holder, its two shares encrypted to that holder.

    ``seed_commitment`` (SHA-256 of the seed) lets the coordinator check the seed it rebuilds.
    """

    round_id: int
    site_id: int
    seed_commitment: bytes
    recipients: tuple[int, ...]
    ciphertexts: tuple[bytes, ...]

    def __post_init__(self) -> None:
        _same_length("EncryptedShares", recipients=self.recipients, ciphertexts=self.ciphertexts)
        _unique("EncryptedShares", self.recipients)


@dataclass(frozen=True)
class ShareDelivery(_Wire):
    """Stage 2, coordinator to one site: the ciphertexts addressed to it, by sender."""

    round_id: int
    site_id: int
    senders: tuple[int, ...]
    ciphertexts: tuple[bytes, ...]

    def __post_init__(self) -> None:
        _same_length("ShareDelivery", senders=self.senders, ciphertexts=self.ciphertexts)
        _unique("ShareDelivery", self.senders)


@dataclass(frozen=True)
class MaskedInput(_Wire):
    """Stage 3, site to coordinator: its vector plus masks modulo 2^b, ceil(b/8) bytes a value."""

    round_id: int
    site_id: int
    masked: bytes


@dataclass(frozen=True)
class UnmaskRequest(_Wire):
    """Stage 4, coordinator to the survivors: who sent a masked input and who did not."""

    round_id: int
    survivors: tuple[int, ...]
    dropped: tuple[int, ...]

    def __post_init__(self) -> None:
        _unique("UnmaskRequest", (*self.survivors, *self.dropped))


@dataclass(frozen=True)
class UnmaskShares(_Wire):
    """Stage 4, site to coordinator: seed shares of survivors, mask-key shares of the dropped."""

    round_id: int
    site_id: int
    seed_owners: tuple[int, ...]
    seed_shares: tuple[bytes, ...]
    key_owners: tuple[int, ...]
    key_shares: tuple[bytes, ...]

    def __post_init__(self) -> None:
        _same_length("UnmaskShares seeds", owners=self.seed_owners, shares=self.seed_shares)
        _same_length("UnmaskShares keys", owners=self.key_owners, shares=self.key_shares)
        _unique("UnmaskShares", (*self.seed_owners, *self.key_owners))
