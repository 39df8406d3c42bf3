"""SecAgg+ (Bell et al., CCS 2020): a site's side of secure aggregation, and what both sides share.

The coordinator must learn only the sum, modulo 2^b, of the sites' integer vectors. Each site
masks its vector twice: a self mask from a random seed, and a pairwise mask with every neighbour
that cancels in the sum (one adds it, the other subtracts it). Each site Shamir-shares its seed
and its mask private key among its neighbours (threshold t), so the coordinator can remove the
masks of a site that dropped after sharing, and the self masks of the sites that stayed; a site
never reveals both kinds of share for the same peer, which is what keeps a site that was only
slow (its masked vector arriving after it was declared dropped) protected.

The protocol is transport-agnostic: every message
(``privatune.common.secure_aggregation_messages``, with the configuration and the errors) is a
frozen dataclass with ``to_dict`` / ``from_dict`` over ints, bytes and lists of them (what a
Flower ConfigRecord holds). The site's identity in a message (``site_id``) is whatever the
transport authenticated; this module trusts it. The coordinator's side is
``privatune.common.secure_aggregation_coordinator``.

Round (one SecAggConfig, fresh keys and seeds; nothing is reused across rounds)::

    stage 0  coordinator -> all     SecAggConfig (sites, t, b, vector length, neighbour graph)
    stage 1  site -> coordinator    PublicKeys          coordinator -> sites  KeyDirectory
    stage 2  site -> coordinator    EncryptedShares     coordinator -> site   ShareDelivery
    stage 3  site -> coordinator    MaskedInput         coordinator -> sites  UnmaskRequest
    stage 4  site -> coordinator    UnmaskShares        coordinator: the sum, or a refusal

Cryptography is Flower's and ``cryptography``'s: ECDH on P-384 with HKDF-SHA256
(``generate_shared_key``), Fernet (AES-CBC + HMAC-SHA256) for the shares in transit, Flower's
Shamir over GF(2^128) (``create_shares`` / ``combine_shares``) and its share framing
(``share_keys_plaintext_concat``). Masks are AES-256-CTR keystreams (``cryptography``), not
Flower's ``pseudo_rand_gen``: that one folds its seed into 32 bits for numpy's RandomState (a
coordinator could try every seed) and never draws 2^b - 1, so its masks are not uniform.

Beyond the paper's semi-honest protocol: ``2t > |holders|`` for every site (its neighbours and
itself), so a coordinator that tells different sites different stories about who dropped still
cannot collect t shares of both kinds for one site from honest holders.
"""

from __future__ import annotations

import base64
import enum
import hashlib
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.fernet import InvalidToken
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from flwr.common.secure_aggregation.crypto.shamir import create_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import (
    decrypt,
    encrypt,
    generate_shared_key,
)
from flwr.common.secure_aggregation.secaggplus_utils import (
    share_keys_plaintext_concat,
    share_keys_plaintext_separate,
)
from flwr.supercore.primitives.asymmetric import (
    bytes_to_public_key,
    generate_key_pairs,
    public_key_to_bytes,
)

from privatune.common.secure_aggregation_messages import (EncryptedShares, KeyDirectory,
                                                          MaskedInput, PublicKeys, SecAggConfig,
                                                          SecAggError, SecAggIntegrityError,
                                                          SecAggRefused, ShareDelivery,
                                                          UnmaskRequest, UnmaskShares, WireValue,
                                                          _width)

SEED_BYTES = 32
"""The self-mask seed: an AES-256 key."""
MASK_CURVE = ec.SECP384R1()
"""The curve of Flower's ``generate_key_pairs``; the mask private key is shared as its scalar."""
SCALAR_BYTES = 48


# ------------------------------------------------------------------------------ masks and vectors


def _mask_bits(bits: int) -> np.uint64:
    return np.uint64((1 << bits) - 1)


def mask_stream(key: bytes, round_id: int, length: int, bits: int) -> np.ndarray:
    """``length`` uniform values modulo 2^bits from a 32-byte key: the AES-256-CTR keystream.

    Every key is fresh in its round; the round id in the counter block keeps streams apart
    even so. Exact uniformity: 2^bits divides 2^32 (or 2^64), and the keystream is masked.
    """
    step = 4 if bits <= 32 else 8
    encryptor = Cipher(algorithms.AES(key), modes.CTR(round_id.to_bytes(8, "big") + bytes(8))).encryptor()
    stream = encryptor.update(bytes(length * step)) + encryptor.finalize()
    values = np.frombuffer(stream, dtype="<u4" if step == 4 else "<u8").astype(np.uint64)
    return values & _mask_bits(bits)


def pairwise_key(private_key: ec.EllipticCurvePrivateKey, public_key: ec.EllipticCurvePublicKey) -> bytes:
    """The 32-byte key two sites agree on (ECDH + HKDF, Flower's ``generate_shared_key``)."""
    return base64.urlsafe_b64decode(generate_shared_key(private_key, public_key))


def pairwise_sign(site_id: int, peer_id: int) -> int:
    """+1 if ``site_id`` adds the pair's mask, -1 if it subtracts it: the lower id adds."""
    return 1 if site_id < peer_id else -1


def add_mask(total: np.ndarray, mask: np.ndarray, sign: int, bits: int) -> np.ndarray:
    """``total + sign * mask`` modulo 2^bits (uint64 wraps modulo 2^64, a multiple of 2^bits)."""
    out = total + mask if sign > 0 else total - mask
    return out & _mask_bits(bits)


def to_residues(vector: np.ndarray, config: SecAggConfig) -> np.ndarray:
    """A site's integer vector as uint64 residues modulo 2^b (negatives: two's complement)."""
    arr = np.asarray(vector)
    if arr.shape != (config.vector_length,):
        raise SecAggError(f"the vector's shape is {arr.shape}, not ({config.vector_length},)")
    if not np.issubdtype(arr.dtype, np.integer):
        raise SecAggError(f"the vector's dtype is {arr.dtype}, not an integer type: encode it first")
    return arr.astype(np.int64 if np.issubdtype(arr.dtype, np.signedinteger) else np.uint64).astype(
        np.uint64) & _mask_bits(config.modulus_bits)


def pack(values: np.ndarray, bits: int) -> bytes:
    """Residues modulo 2^bits as little-endian ceil(bits/8)-byte integers."""
    width = _width(bits)
    raw = values.astype("<u8").view(np.uint8).reshape(-1, 8)
    return raw[:, :width].tobytes()


def unpack(data: bytes, length: int, bits: int) -> np.ndarray:
    """The inverse of ``pack``; a wrong length or an out-of-range value is an error."""
    width = _width(bits)
    if len(data) != length * width:
        raise SecAggError(f"a masked vector of {len(data)} bytes, not {length * width}")
    raw = np.zeros((length, 8), dtype=np.uint8)
    raw[:, :width] = np.frombuffer(data, dtype=np.uint8).reshape(length, width)
    values = raw.view("<u8").reshape(length).astype(np.uint64)
    if np.any(values > _mask_bits(bits)):
        raise SecAggError(f"a masked vector holds values of more than {bits} bits")
    return values


def seed_commitment(seed: bytes) -> bytes:
    """SHA-256 of a self-mask seed: a check of its reconstruction that reveals nothing of it."""
    return hashlib.sha256(seed).digest()


def load_public_key(owner: str, data: bytes) -> ec.EllipticCurvePublicKey:
    """A PEM public key on the mask curve, or a clear error naming whose key it is."""
    try:
        key = bytes_to_public_key(data)
    except (ValueError, TypeError, UnsupportedAlgorithm) as err:
        raise SecAggError(f"{owner}: not a PEM public key ({err})") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != MASK_CURVE.name:
        raise SecAggError(f"{owner}: not a {MASK_CURVE.name} public key")
    return key


def scalar_to_private_key(scalar: bytes) -> ec.EllipticCurvePrivateKey:
    """A mask private key rebuilt from its shared scalar (big-endian, SCALAR_BYTES)."""
    if len(scalar) != SCALAR_BYTES:
        raise SecAggIntegrityError(f"a rebuilt mask key of {len(scalar)} bytes, not {SCALAR_BYTES}")
    try:
        return ec.derive_private_key(int.from_bytes(scalar, "big"), MASK_CURVE)
    except ValueError as err:
        raise SecAggIntegrityError(f"a rebuilt mask key is not a valid scalar ({err})") from None


def share_index(share: bytes) -> int:
    """The 1-based holder number Flower's Shamir framing puts in a share's first 4 bytes."""
    return int.from_bytes(share[:4], "little", signed=False)


# ------------------------------------------------------------------------------ the site


class _Stage(enum.Enum):
    KEYS = "public keys sent"
    SHARED = "shares sent"
    MASKED = "masked input sent"


_SEED = "seed"
_KEY = "mask key"


class SecAggSite:
    """One site's side of one SecAgg+ round: fresh keys and seed, refusals that protect it.

    Call in order: ``public_keys``, ``share_keys``, ``masked_input``, then ``unmask`` (as often
    as asked; across all requests it reveals at most one kind of share per peer).
    """

    def __init__(self, site_id: int, config: SecAggConfig) -> None:
        if site_id not in config.site_ids:
            raise SecAggError(f"site {site_id} is not sampled in round {config.round_id}")
        self.site_id = site_id
        self.config = config
        self._holders = config.share_holders(site_id)
        self._encryption_sk, encryption_pk = generate_key_pairs()
        self._mask_sk, mask_pk = generate_key_pairs()
        self._public = PublicKeys(config.round_id, site_id, public_key_to_bytes(encryption_pk),
                                  public_key_to_bytes(mask_pk))
        self._seed = os.urandom(SEED_BYTES)
        self._stage = _Stage.KEYS
        self._peer_mask_keys: dict[int, ec.EllipticCurvePublicKey] = {}
        self._channel_keys: dict[int, bytes] = {}
        self._shares: dict[int, tuple[bytes, bytes]] = {}  # owner -> (seed share, mask-key share)
        self._masked_with: tuple[int, ...] = ()
        self._revealed: dict[int, str] = {}

    def to_state(self) -> dict[str, WireValue]:
        """Everything this site holds between stages, as a flat dict of the codec's kinds: a
        node that answers each stage in a fresh process (Flower's SuperNode) keeps it in its
        own state between messages. It holds the site's secrets: it must never leave the site."""
        def scalar(key: ec.EllipticCurvePrivateKey) -> bytes:
            return key.private_numbers().private_value.to_bytes(SCALAR_BYTES, "big")

        owners = sorted(self._shares)
        revealed = sorted(self._revealed)
        peers = sorted(self._peer_mask_keys)
        return {
            "site_id": self.site_id, "stage": list(_Stage).index(self._stage),
            "encryption_key": scalar(self._encryption_sk), "mask_key": scalar(self._mask_sk),
            "seed": self._seed,
            "peers": peers, "peer_mask_keys": [public_key_to_bytes(self._peer_mask_keys[p])
                                               for p in peers],
            "channel_keys": [self._channel_keys[p] for p in peers],
            "share_owners": owners, "seed_shares": [self._shares[o][0] for o in owners],
            "key_shares": [self._shares[o][1] for o in owners],
            "masked_with": list(self._masked_with),
            "revealed": revealed, "revealed_keys": [int(self._revealed[p] == _KEY) for p in revealed],
        }

    @classmethod
    def from_state(cls, config: SecAggConfig, state: Mapping[str, Any]) -> SecAggSite:
        """The site ``to_state`` saved, in the round ``config`` describes."""
        try:
            site = cls.__new__(cls)
            site.site_id, site.config = int(state["site_id"]), config
            if site.site_id not in config.site_ids:
                raise SecAggError(f"site {site.site_id} is not sampled in round {config.round_id}")
            site._holders = config.share_holders(site.site_id)
            site._encryption_sk = scalar_to_private_key(bytes(state["encryption_key"]))
            site._mask_sk = scalar_to_private_key(bytes(state["mask_key"]))
            site._public = PublicKeys(
                config.round_id, site.site_id,
                public_key_to_bytes(site._encryption_sk.public_key()),
                public_key_to_bytes(site._mask_sk.public_key()))
            site._seed = bytes(state["seed"])
            site._stage = list(_Stage)[int(state["stage"])]
            peers = [int(p) for p in state["peers"]]
            site._peer_mask_keys = {p: load_public_key(f"site {p}'s mask key", bytes(k))
                                    for p, k in zip(peers, state["peer_mask_keys"], strict=True)}
            site._channel_keys = {p: bytes(k) for p, k in zip(peers, state["channel_keys"],
                                                               strict=True)}
            site._shares = {int(o): (bytes(a), bytes(b)) for o, a, b in zip(
                state["share_owners"], state["seed_shares"], state["key_shares"], strict=True)}
            site._masked_with = tuple(int(p) for p in state["masked_with"])
            site._revealed = {int(p): (_KEY if k else _SEED) for p, k in zip(
                state["revealed"], state["revealed_keys"], strict=True)}
        except (KeyError, IndexError, TypeError, ValueError) as err:
            if isinstance(err, SecAggError):
                raise
            raise SecAggError(f"a site's saved SecAgg+ state is unreadable ({err!r})") from None
        return site

    def _expect(self, stage: _Stage, round_id: int, what: str) -> None:
        if round_id != self.config.round_id:
            raise SecAggError(f"site {self.site_id}: {what} is for round {round_id}, not {self.config.round_id}")
        if self._stage is not stage:
            raise SecAggRefused(f"site {self.site_id}: {what} out of order ({self._stage.value})")

    def public_keys(self) -> PublicKeys:
        """Stage 1: the public keys to advertise."""
        return self._public

    def share_keys(self, directory: KeyDirectory) -> EncryptedShares:
        """Stage 2: Shamir-share the seed and mask key, each holder's pair encrypted to it."""
        self._expect(_Stage.KEYS, directory.round_id, "the key directory")
        listed = dict(zip(directory.site_ids, zip(directory.encryption_keys, directory.mask_keys, strict=True),
                          strict=True))
        if listed.get(self.site_id) != (self._public.encryption_key, self._public.mask_key):
            raise SecAggIntegrityError(f"site {self.site_id}: the key directory misstates its own keys")
        if set(listed) - set(self.config.site_ids):
            raise SecAggError(f"site {self.site_id}: the key directory lists sites not sampled this round")
        all_keys = [k for pair in listed.values() for k in pair]
        if len(set(all_keys)) != len(all_keys):
            raise SecAggIntegrityError(f"site {self.site_id}: the key directory repeats a public key")
        present = [h for h in self._holders if h in listed]
        if len(present) < self.config.threshold:
            raise SecAggRefused(
                f"site {self.site_id}: {len(present)} of its share holders are present, below t = "
                f"{self.config.threshold}")
        t, n = self.config.threshold, len(self._holders)
        scalar = self._mask_sk.private_numbers().private_value.to_bytes(SCALAR_BYTES, "big")
        seed_shares = create_shares(self._seed, t, n)
        key_shares = create_shares(scalar, t, n)
        recipients: list[int] = []
        ciphertexts: list[bytes] = []
        for number, holder in enumerate(self._holders):
            if holder == self.site_id:
                self._shares[holder] = (seed_shares[number], key_shares[number])
                continue
            if holder not in listed:
                continue
            encryption_pk = load_public_key(f"site {holder}'s encryption key", listed[holder][0])
            self._peer_mask_keys[holder] = load_public_key(f"site {holder}'s mask key", listed[holder][1])
            channel = generate_shared_key(self._encryption_sk, encryption_pk)
            self._channel_keys[holder] = channel
            plaintext = share_keys_plaintext_concat(self.site_id, holder, seed_shares[number], key_shares[number])
            recipients.append(holder)
            ciphertexts.append(encrypt(channel, plaintext))
        self._stage = _Stage.SHARED
        return EncryptedShares(self.config.round_id, self.site_id, seed_commitment(self._seed),
                               tuple(recipients), tuple(ciphertexts))

    def _open(self, sender: int, ciphertext: bytes) -> tuple[bytes, bytes]:
        """Decrypt and check one sender's shares: authentic, addressed to this site, numbered right."""
        if sender not in self._channel_keys:
            raise SecAggError(f"site {self.site_id}: shares from site {sender}, which is not its neighbour this round")
        try:
            plaintext = decrypt(self._channel_keys[sender], ciphertext)
        except (InvalidToken, ValueError, TypeError):
            raise SecAggIntegrityError(
                f"site {self.site_id}: the shares from site {sender} failed authentication") from None
        source, destination, seed_share, key_share = share_keys_plaintext_separate(plaintext)
        if (source, destination) != (sender, self.site_id):
            raise SecAggIntegrityError(
                f"site {self.site_id}: shares labelled {source} -> {destination} came as {sender} -> {self.site_id}")
        number = self.config.share_holders(sender).index(self.site_id) + 1
        if share_index(seed_share) != number or share_index(key_share) != number:
            raise SecAggIntegrityError(f"site {self.site_id}: site {sender}'s shares are not numbered {number}")
        return seed_share, key_share

    def masked_input(self, delivery: ShareDelivery, vector: np.ndarray) -> MaskedInput:
        """Stage 3: the vector plus the self mask and the pairwise masks, modulo 2^b.

        Masks with exactly the neighbours whose shares arrived; refuses if fewer than t holders
        (itself included) could rebuild its secrets. Sends one masked vector per round at most.
        """
        self._expect(_Stage.SHARED, delivery.round_id, "the share delivery")
        if delivery.site_id != self.site_id:
            raise SecAggError(f"site {self.site_id}: a share delivery addressed to site {delivery.site_id}")
        if self.site_id in delivery.senders:
            raise SecAggError(f"site {self.site_id}: a share delivery lists the site itself as a sender")
        residues = to_residues(vector, self.config)
        opened = {s: self._open(s, c) for s, c in zip(delivery.senders, delivery.ciphertexts, strict=True)}
        if len(opened) + 1 < self.config.threshold:
            raise SecAggRefused(
                f"site {self.site_id}: {len(opened)} neighbours shared keys, below t - 1 = {self.config.threshold - 1}")
        self._shares.update(opened)
        bits, round_id = self.config.modulus_bits, self.config.round_id
        total = add_mask(residues, mask_stream(self._seed, round_id, residues.size, bits), 1, bits)
        for peer in sorted(opened):
            key = pairwise_key(self._mask_sk, self._peer_mask_keys[peer])
            total = add_mask(total, mask_stream(key, round_id, residues.size, bits), pairwise_sign(self.site_id, peer),
                             bits)
        self._masked_with = tuple(sorted(opened))
        self._stage = _Stage.MASKED
        return MaskedInput(round_id, self.site_id, pack(total, bits))

    def unmask(self, request: UnmaskRequest) -> UnmaskShares:
        """Stage 4: seed shares for survivors, mask-key shares for the dropped.

        Refuses (reveals nothing of this request) if fewer than t survivors are listed, if this
        site is not among them, or if the request would reveal, with what it already revealed,
        both kinds of share of one peer.
        """
        self._expect(_Stage.MASKED, request.round_id, "the unmask request")
        t = self.config.threshold
        if self.site_id not in request.survivors:
            raise SecAggRefused(f"site {self.site_id}: the unmask request does not list it as a survivor")
        if len(request.survivors) < t:
            raise SecAggRefused(
                f"site {self.site_id}: {len(request.survivors)} survivors listed, below t = {t}; nothing revealed")
        if not set(request.survivors) | set(request.dropped) <= set(self.config.site_ids):
            raise SecAggError(f"site {self.site_id}: the unmask request names sites not sampled this round")
        wanted = {p: _SEED for p in request.survivors if p in self._shares}
        wanted.update({p: _KEY for p in request.dropped if p in self._masked_with})
        clash = sorted(p for p, kind in wanted.items() if self._revealed.get(p, kind) != kind)
        if clash:
            raise SecAggRefused(
                f"site {self.site_id}: asked for both kinds of share of site(s) {clash}; nothing revealed")
        self._revealed.update(wanted)
        seeds = sorted(p for p, kind in wanted.items() if kind == _SEED)
        keys = sorted(p for p, kind in wanted.items() if kind == _KEY)
        return UnmaskShares(request.round_id, self.site_id, tuple(seeds), tuple(self._shares[p][0] for p in seeds),
                            tuple(keys), tuple(self._shares[p][1] for p in keys))
