"""SecAgg+ protocol core: exact sums with dropouts, refusals that release nothing, tamper checks."""

from __future__ import annotations

from collections.abc import Collection

import numpy as np
import pytest
from flwr.common.secure_aggregation.crypto.shamir import combine_shares, create_shares
from privatune.common.secure_aggregation import (
    SecAggSite,
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
    harary_graph,
)
from privatune.common.secure_aggregation_coordinator import (
    AggregateResult,
    SecAggCoordinator,
)
from scipy import stats

LENGTH = 1_000


def wire(message):
    """Every message crosses the 'transport' as a dict of ints, bytes and lists."""
    data = message.to_dict()
    for value in data.values():
        assert isinstance(value, (int, bytes, list))
        assert not isinstance(value, list) or all(isinstance(v, (int, bytes)) for v in value)
    return type(message).from_dict(data)


def vectors(config: SecAggConfig, seed: int = 0) -> dict[int, np.ndarray]:
    """Signed integers, some large enough that the sum wraps modulo 2^b."""
    rng = np.random.default_rng(seed)
    top = 2 ** (config.modulus_bits - 1)
    return {i: rng.integers(-top, top - 1, config.vector_length, dtype=np.int64, endpoint=True)
            for i in config.site_ids}


def expected_sum(xs: dict[int, np.ndarray], sites: Collection[int], bits: int) -> np.ndarray:
    total = np.zeros_like(next(iter(xs.values())), dtype=np.uint64)
    for i in sites:
        total = total + xs[i].astype(np.uint64)
    return total & np.uint64(2**bits - 1)


class Round:
    """One round in process, each stage callable on its own so tests can stop or tamper."""

    def __init__(self, config: SecAggConfig) -> None:
        self.config = wire(config)
        self.sites = {i: SecAggSite(i, self.config) for i in config.site_ids}
        self.coordinator = SecAggCoordinator(config)
        self.xs = vectors(config)

    def keys(self, absent: Collection[int] = ()) -> KeyDirectory:
        sent = [wire(s.public_keys()) for i, s in self.sites.items() if i not in absent]
        return wire(self.coordinator.receive_public_keys(sent))

    def shares(self, directory: KeyDirectory, absent: Collection[int] = ()) -> dict[int, ShareDelivery]:
        sent = [wire(self.sites[i].share_keys(directory)) for i in directory.site_ids if i not in absent]
        return {i: wire(d) for i, d in self.coordinator.receive_encrypted_shares(sent).items()}

    def masked(self, deliveries: dict[int, ShareDelivery], absent: Collection[int] = ()) -> UnmaskRequest:
        sent = [wire(self.sites[i].masked_input(d, self.xs[i])) for i, d in deliveries.items() if i not in absent]
        return wire(self.coordinator.receive_masked_inputs(sent))

    def unmask(self, request: UnmaskRequest, absent: Collection[int] = ()) -> AggregateResult:
        sent = [wire(self.sites[i].unmask(request)) for i in request.survivors if i not in absent]
        return self.coordinator.receive_unmask_shares(sent)

    def run(self, drop_before_shares: Collection[int] = (), drop_before_masking: Collection[int] = ()) -> AggregateResult:
        directory = self.keys()
        deliveries = self.shares(directory, absent=drop_before_shares)
        return self.unmask(self.masked(deliveries, absent=drop_before_masking))


def config(n: int, t: int, bits: int = 32, length: int = LENGTH, **kw) -> SecAggConfig:
    return SecAggConfig.create(round_id=3, site_ids=range(10, 10 + n), threshold=t, modulus_bits=bits,
                               vector_length=length, **kw)


@pytest.mark.parametrize("n", [4, 5])
def test_sum_of_all_sites_is_recovered_exactly(n: int) -> None:
    rnd = Round(config(n, n // 2 + 1))
    result = rnd.run()
    assert result.contributors == rnd.config.site_ids and result.dropped == ()
    assert result.total.dtype == np.uint64
    np.testing.assert_array_equal(result.total, expected_sum(rnd.xs, rnd.config.site_ids, 32))


@pytest.mark.parametrize("bits", [20, 64])
def test_other_bit_widths_pack_and_sum_exactly(bits: int) -> None:
    rnd = Round(config(4, 3, bits=bits, length=200))
    result = rnd.run(drop_before_masking={11})
    np.testing.assert_array_equal(result.total, expected_sum(rnd.xs, (10, 12, 13), bits))


def test_site_dropping_after_sharing_keys_is_recovered_from_shares() -> None:
    rnd = Round(config(5, 3))
    result = rnd.run(drop_before_masking={12})
    assert result.contributors == (10, 11, 13, 14) and result.dropped == (12,)
    np.testing.assert_array_equal(result.total, expected_sum(rnd.xs, result.contributors, 32))


def test_site_dropping_before_sharing_is_left_out_of_every_mask() -> None:
    rnd = Round(config(5, 3))
    result = rnd.run(drop_before_shares={14}, drop_before_masking={10})
    assert result.contributors == (11, 12, 13) and result.dropped == (10,)
    np.testing.assert_array_equal(result.total, expected_sum(rnd.xs, result.contributors, 32))


def test_sparse_neighbourhoods_sum_exactly_with_a_dropout() -> None:
    graph = harary_graph(range(10, 18), degree=4, seed=1)
    assert all(len(peers) == 4 for peers in graph.values())
    rnd = Round(config(8, 3, length=300, graph=graph))
    result = rnd.run(drop_before_masking={15})
    np.testing.assert_array_equal(result.total, expected_sum(rnd.xs, result.contributors, 32))


def test_round_with_t_minus_1_contributions_refuses() -> None:
    rnd = Round(config(5, 3))
    deliveries = rnd.shares(rnd.keys())
    with pytest.raises(SecAggRefused, match="2 masked inputs arrived, below t = 3"):
        rnd.masked(deliveries, absent={10, 11, 12})
    with pytest.raises(SecAggError, match="out of order"):  # the refused round stays closed
        rnd.coordinator.receive_unmask_shares([])
    # a coordinator that claims t - 1 survivors gets nothing from the sites either
    with pytest.raises(SecAggRefused, match="2 survivors listed, below t = 3"):
        rnd.sites[13].unmask(UnmaskRequest(3, survivors=(13, 14), dropped=(10, 11, 12)))


def test_too_few_sites_with_keys_or_shares_refuse() -> None:
    rnd = Round(config(5, 3))
    with pytest.raises(SecAggRefused, match="2 sites sent public keys"):
        rnd.keys(absent={10, 11, 12})
    rnd = Round(config(4, 3))
    directory = rnd.keys(absent={13})  # site 13's absence leaves each site exactly t holders
    with pytest.raises(SecAggRefused, match="2 sites sent their shares"):
        rnd.shares(directory, absent={10})


def test_site_refuses_to_mask_when_fewer_than_t_could_unmask_it() -> None:
    rnd = Round(config(4, 3))
    deliveries = rnd.shares(rnd.keys())
    only_one = ShareDelivery(3, 10, deliveries[10].senders[:1], deliveries[10].ciphertexts[:1])
    with pytest.raises(SecAggRefused, match="below t - 1 = 2"):
        rnd.sites[10].masked_input(only_one, rnd.xs[10])


def test_site_never_reveals_both_kinds_of_share_for_one_peer() -> None:
    with pytest.raises(SecAggError, match="lists a site twice"):  # not even expressible in one request
        UnmaskRequest(3, survivors=(10, 11, 12), dropped=(12,))
    rnd = Round(config(5, 3))
    deliveries = rnd.shares(rnd.keys())
    request = rnd.masked(deliveries, absent={12})  # 12 was only slow: declared dropped
    shares = rnd.sites[10].unmask(request)
    assert 12 in shares.key_owners and 12 not in shares.seed_owners
    assert rnd.sites[10].unmask(request) == shares  # asking again is answered the same
    for i in (11, 13, 14):
        rnd.sites[i].unmask(request)
    rnd.sites[12].masked_input(deliveries[12], rnd.xs[12])  # its masked vector arrives late
    # the coordinator, holding 12's mask-key shares, now asks for its seed shares: refused, nothing revealed
    greedy = UnmaskRequest(3, survivors=(10, 11, 12, 13, 14), dropped=())
    for i in (10, 11, 13, 14):
        with pytest.raises(SecAggRefused, match=r"both kinds of share of site\(s\) \[12\]"):
            rnd.sites[i].unmask(greedy)
    # and the other way round: a seed share first, then a mask-key share of the same site
    rnd = Round(config(5, 3))
    request = rnd.masked(rnd.shares(rnd.keys()))
    rnd.sites[11].unmask(request)
    with pytest.raises(SecAggRefused, match="both kinds"):
        rnd.sites[11].unmask(UnmaskRequest(3, survivors=(10, 11, 13, 14), dropped=(12,)))


def test_threshold_must_exceed_half_of_the_holders() -> None:
    """So that two stories told to disjoint halves of the holders cannot yield t shares of each kind."""
    with pytest.raises(SecAggError, match="not above half of site 10's 4 share holders"):
        config(4, 2)
    with pytest.raises(SecAggError, match="below 2"):
        config(1, 1)
    with pytest.raises(SecAggError, match="exceeds"):
        config(4, 5)
    with pytest.raises(SecAggError, match="not symmetric"):
        config(3, 2, graph={10: (11, 12), 11: (10,), 12: (11,)})


def test_a_site_that_did_not_mask_is_not_asked_to_unmask() -> None:
    rnd = Round(config(4, 3))
    rnd.masked(rnd.shares(rnd.keys()), absent={13})
    with pytest.raises(SecAggRefused, match="out of order"):
        rnd.sites[13].unmask(UnmaskRequest(3, survivors=(10, 11, 12, 13), dropped=()))
    with pytest.raises(SecAggRefused, match="does not list it as a survivor"):
        rnd.sites[10].unmask(UnmaskRequest(3, survivors=(11, 12, 13), dropped=(10,)))


def test_one_masked_input_per_site_and_round() -> None:
    rnd = Round(config(4, 3))
    deliveries = rnd.shares(rnd.keys())
    rnd.sites[10].masked_input(deliveries[10], rnd.xs[10])
    with pytest.raises(SecAggRefused, match="out of order"):  # a second vector under the same masks would leak
        rnd.sites[10].masked_input(deliveries[10], np.zeros(LENGTH, dtype=np.int64))


def test_a_single_masked_vector_looks_uniform_and_hides_its_input() -> None:
    length = 40_000
    rnd = Round(config(4, 3, length=length))
    deliveries = rnd.shares(rnd.keys())
    plain = np.arange(length, dtype=np.int64) % 7  # very far from uniform
    masked = rnd.sites[10].masked_input(deliveries[10], plain)
    values = unpack(masked.masked, length, 32)
    assert np.mean(values == plain.astype(np.uint64)) < 1e-3
    for buckets in (values >> np.uint64(26), values & np.uint64(63)):  # top and bottom 6 bits
        counts = np.bincount(buckets.astype(np.int64), minlength=64)
        assert stats.chisquare(counts).pvalue > 1e-6
    counts = np.bincount(plain % 64, minlength=64)
    assert stats.chisquare(counts).pvalue < 1e-100  # the same test does tell the input apart


def test_fewer_than_t_shares_do_not_give_the_secret() -> None:
    secret = bytes(range(32))
    shares = create_shares(secret, 3, 5)
    assert combine_shares(shares[1:4]) == secret
    for subset in (shares[:2], shares[2:4], [shares[0], shares[4]]):
        try:
            rebuilt = combine_shares(subset)
        except ValueError:
            continue
        assert rebuilt != secret


def test_coordinator_with_fewer_than_t_shares_refuses() -> None:
    rnd = Round(config(4, 3))
    request = rnd.masked(rnd.shares(rnd.keys()))
    with pytest.raises(SecAggRefused, match="2 seed shares of site 10, below t = 3"):
        rnd.unmask(request, absent={12, 13})


def test_tampered_or_misrouted_ciphertext_is_rejected() -> None:
    rnd = Round(config(4, 3))
    deliveries = rnd.shares(rnd.keys())
    delivery = deliveries[10]
    token = bytearray(delivery.ciphertexts[0])
    token[len(token) // 2] ^= 0x01 if token[len(token) // 2] != ord("A") else 0x02
    tampered = ShareDelivery(3, 10, delivery.senders, (bytes(token), *delivery.ciphertexts[1:]))
    with pytest.raises(SecAggIntegrityError, match=f"from site {delivery.senders[0]} failed authentication"):
        rnd.sites[10].masked_input(tampered, rnd.xs[10])
    swapped = ShareDelivery(3, 10, delivery.senders, tuple(reversed(delivery.ciphertexts)))
    with pytest.raises(SecAggIntegrityError, match="failed authentication"):
        rnd.sites[10].masked_input(swapped, rnd.xs[10])
    rerouted = ShareDelivery(3, 11, deliveries[10].senders[1:], deliveries[10].ciphertexts[1:])
    with pytest.raises(SecAggIntegrityError):  # 12's shares for 10 handed to 11
        rnd.sites[11].masked_input(rerouted, rnd.xs[11])


def test_corrupted_unmask_share_stops_the_round() -> None:
    rnd = Round(config(4, 3))
    request = rnd.masked(rnd.shares(rnd.keys()))
    replies = [rnd.sites[i].unmask(request) for i in request.survivors]
    bad = replies[0]
    share = bytearray(bad.seed_shares[0])
    share[10] ^= 0xFF
    replies[0] = UnmaskShares(bad.round_id, bad.site_id, bad.seed_owners, (bytes(share), *bad.seed_shares[1:]),
                              bad.key_owners, bad.key_shares)
    with pytest.raises(SecAggIntegrityError, match="site 10's"):
        rnd.coordinator.receive_unmask_shares(replies)


def test_coordinator_rejects_strangers_duplicates_and_other_rounds() -> None:
    rnd = Round(config(4, 3))
    keys = [s.public_keys() for s in rnd.sites.values()]
    with pytest.raises(SecAggError, match="twice"):
        rnd.coordinator.receive_public_keys([*keys, keys[0]])
    stranger = SecAggSite(99, SecAggConfig.create(3, (10, 11, 12, 99), 3, 32, LENGTH)).public_keys()
    with pytest.raises(SecAggError, match="site 99"):
        rnd.coordinator.receive_public_keys([*keys[:3], stranger])
    other = PublicKeys(4, 10, keys[0].encryption_key, keys[0].mask_key)
    with pytest.raises(SecAggError, match="round 4"):
        rnd.coordinator.receive_public_keys([other])
    bad_key = PublicKeys(3, 10, b"not a key", keys[0].mask_key)
    with pytest.raises(SecAggError, match="site 10's encryption key"):
        rnd.coordinator.receive_public_keys([bad_key])


def test_site_checks_the_key_directory() -> None:
    rnd = Round(config(4, 3))
    directory = rnd.keys()
    swapped = KeyDirectory(3, directory.site_ids, directory.mask_keys, directory.encryption_keys)
    with pytest.raises(SecAggIntegrityError, match="misstates its own keys"):
        rnd.sites[10].share_keys(swapped)
    with pytest.raises(SecAggError, match="round 3, not"):
        SecAggSite(10, SecAggConfig.create(5, range(10, 14), 3, 32, LENGTH)).share_keys(directory)


def test_messages_decode_strictly() -> None:
    message = MaskedInput(3, 10, b"\x00" * 4)
    assert MaskedInput.from_dict(message.to_dict()) == message
    with pytest.raises(SecAggError, match="missing key 'masked'"):
        MaskedInput.from_dict({"round_id": 3, "site_id": 10})
    with pytest.raises(SecAggError, match="site_id is a bool"):
        MaskedInput.from_dict({"round_id": 3, "site_id": True, "masked": b""})
    with pytest.raises(SecAggError, match="unknown key"):
        MaskedInput.from_dict({**message.to_dict(), "extra": 1})
    with pytest.raises(SecAggError, match="not a list of bytes"):
        EncryptedShares.from_dict({"round_id": 3, "site_id": 1, "seed_commitment": b"", "recipients": [2],
                                   "ciphertexts": ["text"]})
    with pytest.raises(SecAggError, match="different lengths"):
        ShareDelivery(3, 10, (11, 12), (b"",))
    cfg = config(5, 3, graph=harary_graph(range(10, 15), degree=2, seed=0))
    assert SecAggConfig.from_dict(cfg.to_dict()) == cfg and cfg.share_holders(10) == tuple(
        sorted((10, *cfg.graph()[10])))
