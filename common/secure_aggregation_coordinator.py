"""SecAgg+ (Bell et al., CCS 2020): the coordinator's side, which learns the sum and nothing else.

The coordinator routes the sites' public keys and encrypted shares, collects masked vectors,
asks the survivors for the shares that remove the masks, and returns only the sum modulo 2^b
with who contributed. It refuses, raising ``SecAggRefused`` and releasing nothing, when fewer
than t masked vectors arrive or fewer than t shares are there to rebuild a secret it needs.
Every rebuilt secret is checked (a seed against its commitment, a mask key against its public
key), so a corrupted share stops the round instead of skewing the sum. The messages and the
site's side are in ``privatune.common.secure_aggregation``.

One ``SecAggCoordinator`` per round; call its ``receive_*`` methods in stage order with the
messages that arrived in time (the transport decides the deadline; a site missing from a stage
has dropped for the rest of the round).
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from cryptography.hazmat.primitives.asymmetric import ec
from flwr.common.secure_aggregation.crypto.shamir import combine_shares
from privatune.common.secure_aggregation import (
    add_mask,
    load_public_key,
    mask_stream,
    pairwise_key,
    pairwise_sign,
    scalar_to_private_key,
    seed_commitment,
    share_index,
    unpack,
)
from privatune.common.secure_aggregation_messages import (
    EncryptedShares,
    KeyDirectory,
    MaskedInput,
    PublicKeys,
    SecAggConfig,
    SecAggError,
    SecAggIntegrityError,
    SecAggRefused,
    ShareDelivery,
    UnmaskRequest,
    UnmaskShares,
)


@dataclass(frozen=True)
class AggregateResult:
    """What a round releases: the sum modulo 2^b of ``contributors``' vectors (uint64)."""

    total: np.ndarray
    contributors: tuple[int, ...]
    dropped: tuple[int, ...]


class _Stage(enum.Enum):
    KEYS = 1
    SHARES = 2
    MASKED = 3
    UNMASK = 4
    DONE = 5


class SecAggCoordinator:
    """The coordinator's side of one SecAgg+ round."""

    def __init__(self, config: SecAggConfig) -> None:
        self.config = config
        self._stage = _Stage.KEYS
        self._encryption_keys: dict[int, bytes] = {}
        self._mask_keys: dict[int, ec.EllipticCurvePublicKey] = {}
        self._mask_key_bytes: dict[int, bytes] = {}
        self._commitments: dict[int, bytes] = {}
        self._masked_with: dict[int, tuple[int, ...]] = {}
        self._masked: dict[int, np.ndarray] = {}
        self._survivors: tuple[int, ...] = ()
        self._dropped: tuple[int, ...] = ()

    def setup(self) -> SecAggConfig:
        """Stage 0: the config every sampled site receives."""
        return self.config

    def _accept(self, stage: _Stage, messages: Sequence[PublicKeys | EncryptedShares | MaskedInput | UnmaskShares],
                allowed: Sequence[int], what: str) -> None:
        """Check a stage's batch: right stage and round, from expected sites, once each."""
        if self._stage is not stage:
            raise SecAggError(f"coordinator: {what} out of order (expected stage {self._stage.value})")
        seen: set[int] = set()
        for msg in messages:
            if msg.round_id != self.config.round_id:
                raise SecAggError(f"coordinator: {what} from site {msg.site_id} is for round {msg.round_id}")
            if msg.site_id not in allowed:
                raise SecAggError(f"coordinator: {what} from site {msg.site_id}, which is not in this stage")
            if msg.site_id in seen:
                raise SecAggError(f"coordinator: {what} from site {msg.site_id} twice")
            seen.add(msg.site_id)

    def _enough(self, count: int, what: str) -> None:
        if count < self.config.threshold:
            self._stage = _Stage.DONE
            raise SecAggRefused(
                f"coordinator: {count} {what}, below t = {self.config.threshold}; the round releases nothing")

    def receive_public_keys(self, messages: Sequence[PublicKeys]) -> KeyDirectory:
        """Stage 1: check the keys (valid, all distinct), and list them for every site that sent some."""
        self._accept(_Stage.KEYS, messages, self.config.site_ids, "public keys")
        for msg in messages:
            load_public_key(f"site {msg.site_id}'s encryption key", msg.encryption_key)
            self._mask_keys[msg.site_id] = load_public_key(f"site {msg.site_id}'s mask key", msg.mask_key)
            self._mask_key_bytes[msg.site_id] = msg.mask_key
            self._encryption_keys[msg.site_id] = msg.encryption_key
        all_keys = [*self._encryption_keys.values(), *self._mask_key_bytes.values()]
        if len(set(all_keys)) != len(all_keys):
            raise SecAggIntegrityError("coordinator: two sites sent the same public key")
        self._enough(len(messages), "sites sent public keys")
        ids = tuple(sorted(self._encryption_keys))
        self._stage = _Stage.SHARES
        return KeyDirectory(self.config.round_id, ids, tuple(self._encryption_keys[i] for i in ids),
                            tuple(self._mask_key_bytes[i] for i in ids))

    def receive_encrypted_shares(self, messages: Sequence[EncryptedShares]) -> dict[int, ShareDelivery]:
        """Stage 2: route each ciphertext to its holder; a site masks with exactly the senders it gets."""
        self._accept(_Stage.SHARES, messages, tuple(self._encryption_keys), "encrypted shares")
        senders = {msg.site_id for msg in messages}
        inbox: dict[int, dict[int, bytes]] = {i: {} for i in senders}
        for msg in messages:
            holders = set(self.config.share_holders(msg.site_id)) - {msg.site_id}
            if not set(msg.recipients) <= holders & set(self._encryption_keys):
                raise SecAggError(f"coordinator: site {msg.site_id} sent shares to sites that are not its holders")
            if len(msg.seed_commitment) != 32:
                raise SecAggError(f"coordinator: site {msg.site_id}'s seed commitment is not 32 bytes")
            self._commitments[msg.site_id] = msg.seed_commitment
            for recipient, ciphertext in zip(msg.recipients, msg.ciphertexts, strict=True):
                if recipient in inbox:
                    inbox[recipient][msg.site_id] = ciphertext
        self._enough(len(messages), "sites sent their shares")
        self._masked_with = {i: tuple(sorted(box)) for i, box in inbox.items()}
        self._stage = _Stage.MASKED
        return {i: ShareDelivery(self.config.round_id, i, tuple(sorted(box)), tuple(box[s] for s in sorted(box)))
                for i, box in inbox.items()}

    def receive_masked_inputs(self, messages: Sequence[MaskedInput]) -> UnmaskRequest:
        """Stage 3: keep the masked vectors; refuse below t; ask the survivors to unmask."""
        self._accept(_Stage.MASKED, messages, tuple(self._masked_with), "masked inputs")
        cfg = self.config
        for msg in messages:
            try:
                self._masked[msg.site_id] = unpack(msg.masked, cfg.vector_length, cfg.modulus_bits)
            except SecAggError as err:
                raise SecAggError(f"coordinator: site {msg.site_id}'s masked input: {err}") from None
        self._enough(len(messages), "masked inputs arrived")
        self._survivors = tuple(sorted(self._masked))
        self._dropped = tuple(sorted(set(self._masked_with) - set(self._masked)))
        self._stage = _Stage.UNMASK
        return UnmaskRequest(cfg.round_id, self._survivors, self._dropped)

    def _collect(self, messages: Sequence[UnmaskShares]) -> tuple[dict[int, list[bytes]], dict[int, list[bytes]]]:
        """Sort the survivors' shares by owner, keeping only shares each responder could hold."""
        seeds: dict[int, list[bytes]] = {i: [] for i in self._survivors}
        keys: dict[int, list[bytes]] = {j: [] for j in self._dropped}
        for msg in messages:
            for owners, shares, book, kind in ((msg.seed_owners, msg.seed_shares, seeds, "seed"),
                                               (msg.key_owners, msg.key_shares, keys, "mask-key")):
                for owner, share in zip(owners, shares, strict=True):
                    if owner not in book:
                        raise SecAggError(f"coordinator: site {msg.site_id} sent a {kind} share of site {owner}, "
                                          "which was not asked for")
                    holders = self.config.share_holders(owner)
                    if msg.site_id not in holders or (owner != msg.site_id
                                                      and owner not in self._masked_with[msg.site_id]):
                        raise SecAggError(f"coordinator: site {msg.site_id} does not hold a share of site {owner}")
                    if share_index(share) != holders.index(msg.site_id) + 1:
                        raise SecAggIntegrityError(
                            f"coordinator: site {msg.site_id}'s {kind} share of site {owner} is misnumbered")
                    book[owner].append(share)
        return seeds, keys

    def _rebuild(self, shares: list[bytes], owner: int, kind: str) -> bytes:
        t = self.config.threshold
        if len(shares) < t:
            self._stage = _Stage.DONE
            raise SecAggRefused(f"coordinator: {len(shares)} {kind} shares of site {owner}, below t = {t}; "
                                "the round releases nothing")
        try:
            return combine_shares(sorted(shares, key=share_index)[:t])
        except ValueError:
            raise SecAggIntegrityError(f"coordinator: the {kind} shares of site {owner} do not combine") from None

    def receive_unmask_shares(self, messages: Sequence[UnmaskShares]) -> AggregateResult:
        """Stage 4: rebuild the survivors' seeds and the dropped sites' mask keys, check them,
        and remove every mask; the sum is released only if every secret it needs is rebuilt."""
        self._accept(_Stage.UNMASK, messages, self._survivors, "unmask shares")
        cfg = self.config
        seeds_in, keys_in = self._collect(messages)
        needed_keys = sorted({j for i in self._survivors for j in self._masked_with[i] if j in keys_in})
        seeds: dict[int, bytes] = {}
        for owner in self._survivors:
            seed = self._rebuild(seeds_in[owner], owner, "seed")
            if seed_commitment(seed) != self._commitments[owner]:
                raise SecAggIntegrityError(f"coordinator: site {owner}'s rebuilt seed does not match its commitment")
            seeds[owner] = seed
        dropped_keys: dict[int, ec.EllipticCurvePrivateKey] = {}
        for owner in needed_keys:
            private = scalar_to_private_key(self._rebuild(keys_in[owner], owner, "mask-key"))
            if private.public_key().public_numbers() != self._mask_keys[owner].public_numbers():
                raise SecAggIntegrityError(f"coordinator: site {owner}'s rebuilt mask key does not match its public key")
            dropped_keys[owner] = private
        bits, n, round_id = cfg.modulus_bits, cfg.vector_length, cfg.round_id
        total = np.zeros(n, dtype=np.uint64)
        for site in self._survivors:
            total = add_mask(total, self._masked[site], 1, bits)
            total = add_mask(total, mask_stream(seeds[site], round_id, n, bits), -1, bits)
            for peer in self._masked_with[site]:
                if peer in dropped_keys:
                    key = pairwise_key(dropped_keys[peer], self._mask_keys[site])
                    total = add_mask(total, mask_stream(key, round_id, n, bits), -pairwise_sign(site, peer), bits)
        self._stage = _Stage.DONE
        self._masked.clear()
        return AggregateResult(total, self._survivors, self._dropped)
