"""Distributed Skellam noise for secure DP-SGD: encode a site's share, decode the sum.

In secure DP-SGD (issue 27) the coordinator learns only the modular sum of the sites'
contributions (SecAgg+, built elsewhere), so the noise can be shared: each site adds a share of
Skellam noise and the sum over at least t sites holds the calibrated total. This module is the
numeric part, and knows nothing of Flower or of the masking:

* ``encode_contribution``: a site's sum of clipped per-record gradients is rotated by a
  randomised Hadamard transform (public seed, so L2 norms are kept and coordinates flattened),
  scaled by gamma, stochastically rounded (unbiased), noised with its Skellam share and
  reduced modulo 2^b;
* ``decode_sum``: the modular sum of the contributions is centred, refused if any coordinate
  is beyond the bound the range was sized for (an aggregate that may have wrapped around is
  never decoded), divided by gamma and rotated back;
* ``choose_parameters``: bit width, scale and noise shares from the dimension, the threshold
  t, the number of sites, the clip, the records a site may sum and the noise multiplier;
* ``site_guarantees``: a site's epsilon (a) from the aggregate noise of at least t
  contributions and (b) from its own share alone, by ``distributed_noise_accounting``.

Skellam(V) here is Poisson(V/2) - Poisson(V/2), variance V; a sum of independent Skellams is
Skellam with the summed variance, so t shares of V/t are exactly Skellam(V).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np
from privatune.common.distributed_noise_accounting import (
    calibrate_skellam_noise,
    skellam_epsilon,
)

if TYPE_CHECKING:
    from privatune.common.secure_random import RandomSource

DEFAULT_FAILURE_PROBABILITY = 1e-9
# The rounding may lengthen one record's shift by this share at most (on average over the
# rounding; the accounting bounds it exactly), which fixes the scale gamma (``scaled_clip_for``).
DEFAULT_SENSITIVITY_INFLATION = 1e-3
DEFAULT_MAX_BITS = 32
MAX_BITS = 62  # a sum of two values below 2^62 still fits in an unsigned 64-bit integer
Guarantee = Literal["aggregate", "fallback"]
_ROTATION_DOMAIN = b"privatune distributed-noise rotation v1:"


class AggregateOverflowError(ValueError):
    """A decoded aggregate has coordinates beyond the range it was sized for: it may have
    wrapped around the modulus, so it is not decoded."""


def padded_dimension(dimension: int) -> int:
    """The smallest power of two at least ``dimension`` (the Hadamard transform's length)."""
    if int(dimension) != dimension or dimension < 1:
        raise ValueError(f"dimension must be a positive integer, got {dimension!r}")
    return 1 << (int(dimension) - 1).bit_length()


def scaled_clip_for(dimension: int,
                    sensitivity_inflation: float = DEFAULT_SENSITIVITY_INFLATION) -> float:
    """The clip in integer units (C times gamma) at which rounding lengthens one record's
    shift by ``sensitivity_inflation`` at most in expectation.

    Rounding adds at most 1/4 of variance per coordinate, so the shift's mean square norm is at
    most ``S^2 + D/4`` over the ``D`` padded coordinates; ``S = sqrt(D / (4((1 + i)^2 - 1)))``
    keeps its root within ``(1 + i) S``. The sensitivity then hardly depends on d, and only
    the bit width pays for it (about log2 of 1/sqrt(i) bits).
    """
    if not (math.isfinite(sensitivity_inflation) and sensitivity_inflation > 0):
        raise ValueError(f"sensitivity_inflation must be a positive finite number, "
                         f"got {sensitivity_inflation!r}")
    padded = padded_dimension(dimension)
    return math.sqrt(padded / (4 * ((1 + sensitivity_inflation) ** 2 - 1)))


# --- the randomised Hadamard rotation -------------------------------------------------------

def _hadamard(values: np.ndarray) -> np.ndarray:
    """The unnormalised fast Walsh-Hadamard transform of a power-of-two-long vector."""
    size = values.shape[0]
    out = values
    half = 1
    while half < size:
        blocks = out.reshape(-1, 2, half)
        out = np.stack((blocks[:, 0] + blocks[:, 1], blocks[:, 0] - blocks[:, 1]), axis=1)
        half *= 2
    return out.reshape(size)


def _signs(rotation_seed: int, padded: int) -> np.ndarray:
    """The rotation's public random signs: bits of SHAKE-128 of the seed, the same on every
    machine and NumPy version (NumPy keeps no promise that its distributions stay the same
    across versions, and a site that rotated with other signs than the coordinator would be
    decoded into a wrong update, not into an error)."""
    if isinstance(rotation_seed, bool) or int(rotation_seed) != rotation_seed or not (
            0 <= rotation_seed < 1 << 128):
        raise ValueError(f"rotation_seed must be an integer in [0, 2^128), got {rotation_seed!r}")
    stream = hashlib.shake_128(_ROTATION_DOMAIN + int(rotation_seed).to_bytes(16, "little"))
    bits = np.unpackbits(np.frombuffer(stream.digest((padded + 7) // 8), dtype=np.uint8))
    return 1.0 - 2.0 * bits[:padded]


def rotate(vector: np.ndarray, rotation_seed: int) -> np.ndarray:
    """``H D x / sqrt(len)``: the vector zero-padded to a power of two, its signs flipped by the
    public seed, Hadamard-transformed. Orthonormal, so norms are kept; each coordinate becomes
    a random-signed mix of all of them, so none is much above ``||x|| / sqrt(len)``."""
    values = np.asarray(vector, dtype=np.float64)
    if values.ndim != 1:
        raise ValueError(f"vector must be one-dimensional, got shape {values.shape}")
    padded = padded_dimension(values.shape[0])
    full = np.zeros(padded)
    full[:values.shape[0]] = values
    return _hadamard(full * _signs(rotation_seed, padded)) / math.sqrt(padded)


def unrotate(rotated: np.ndarray, rotation_seed: int, dimension: int) -> np.ndarray:
    """The inverse of ``rotate`` (H is symmetric and H H = len I), cropped to ``dimension``."""
    values = np.asarray(rotated, dtype=np.float64)
    padded = padded_dimension(dimension)
    if values.shape != (padded,):
        raise ValueError(f"rotated must have shape ({padded},) for dimension {dimension}, "
                         f"got {values.shape}")
    full = _hadamard(values) / math.sqrt(padded) * _signs(rotation_seed, padded)
    return full[:dimension]


# --- rounding and noise ----------------------------------------------------------------------

def stochastic_round(values: np.ndarray, rng: RandomSource) -> np.ndarray:
    """Round each value up with probability its fractional part, else down: unbiased, and off
    by less than 1 per coordinate."""
    values = np.asarray(values, dtype=np.float64)
    low = np.floor(values)
    return (low + (rng.random(values.shape) < values - low)).astype(np.int64)


def skellam_noise(variance: float, size: int, rng: RandomSource) -> np.ndarray:
    """``size`` draws of Skellam(variance) = Poisson(variance/2) - Poisson(variance/2)."""
    if not (math.isfinite(variance) and variance >= 0):
        raise ValueError(f"variance must be a non-negative finite number, got {variance!r}")
    return (rng.poisson(variance / 2, size).astype(np.int64)
            - rng.poisson(variance / 2, size).astype(np.int64))


# --- parameters ------------------------------------------------------------------------------

def _skellam_tail(variance: float, log_ratio: float) -> float:
    """The smallest s with ``P(|Z| >= s) <= 2 exp(-log_ratio)`` for Z ~ Skellam(variance), by
    the Chernoff bound ``P(Z >= s) <= exp(-(s asinh(s/V) - V (sqrt(1 + (s/V)^2) - 1)))``
    (its moment generating function is ``exp(V (cosh(theta) - 1))``)."""
    if variance == 0:
        return 0.0

    def exponent(s: float) -> float:
        r = s / variance
        return s * math.asinh(r) - variance * (math.sqrt(1 + r * r) - 1)

    low, high = 0.0, math.sqrt(2 * variance * log_ratio) + log_ratio + 1
    while exponent(high) < log_ratio:
        high *= 2
    for _ in range(100):
        middle = (low + high) / 2
        if exponent(middle) < log_ratio:
            low = middle
        else:
            high = middle
    return high


@dataclass(frozen=True)
class DistributedNoiseParams:
    """What every site and the coordinator must agree on for one run of secure DP-SGD.

    Integer units are the encoder's: a record's clipped gradient has norm at most
    ``clip * scale`` there, and the aggregate Skellam noise of ``min_contributions`` shares has
    variance ``aggregate_variance = (noise_multiplier * clip * scale)^2`` per coordinate.
    """

    dimension: int
    padded_dimension: int
    clip: float
    max_records_per_site: int
    min_contributions: int
    max_sites: int
    noise_multiplier: float
    scale: float
    bits: int
    aggregate_variance: float
    share_variance: float
    bound: float
    failure_probability: float
    sensitivity_inflation: float

    @property
    def modulus(self) -> int:
        return 1 << self.bits

    @property
    def scaled_clip(self) -> float:
        return self.clip * self.scale

    @property
    def dtype(self) -> type[np.unsignedinteger]:
        """The unsigned integers a contribution travels as (4 bytes each up to 32 bits)."""
        return np.uint32 if self.bits <= 32 else np.uint64

    def describe(self) -> str:
        """One paragraph for ``plan`` and the report."""
        return (f"Skellam distributed noise: d={self.dimension} (padded to "
                f"{self.padded_dimension}), {self.bits}-bit modular sum, scale gamma="
                f"{self.scale:.6g} (clip {self.clip:g} = {self.scaled_clip:.6g} integer units); "
                f"aggregate noise multiplier {self.noise_multiplier:.6g} from at least "
                f"{self.min_contributions} of up to {self.max_sites} sites, each adding "
                f"Skellam variance {self.share_variance:.6g} (total "
                f"{self.aggregate_variance:.6g}); decoding refuses any coordinate beyond "
                f"{self.bound:.6g} (range +-{self.modulus // 2}), sized for at most "
                f"{self.max_records_per_site} records per site with failure probability "
                f"{self.failure_probability:g}")


def _positive_integer(name: str, value: int) -> int:
    if isinstance(value, bool) or int(value) != value or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _positive_number(name: str, value: float) -> float:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


def choose_parameters(dimension: int, *, min_contributions: int, max_sites: int, clip: float,
                      max_records_per_site: int, noise_multiplier: float,
                      failure_probability: float = DEFAULT_FAILURE_PROBABILITY,
                      sensitivity_inflation: float = DEFAULT_SENSITIVITY_INFLATION,
                      max_bits: int = DEFAULT_MAX_BITS) -> DistributedNoiseParams:
    """Bit width, scale and noise shares for a run; an error that names the parameter when
    no bit width up to ``max_bits`` holds the aggregate.

    The scale comes from the dimension alone (``scaled_clip_for``). The bit width is the
    smallest that keeps twice the bound ``B`` inside the signed range, ``2^(b-1) >= 2B``: the
    aggregate of up to ``max_sites`` contributions stays within ``B`` per coordinate except with
    probability ``failure_probability`` (half for the signal, half for the noise, each
    union-bounded over the coordinates), and the margin lets ``decode_sum`` see a coordinate
    that went past ``B``, up to ``2^b - B``, instead of decoding it wrapped around. ``B`` adds
    up:

    * the signal: the union's sum has norm at most ``R = clip * scale * max_sites *
      max_records_per_site``; after the random rotation each coordinate is a Rademacher sum
      with ``|y_i| <= R sqrt(2 ln(4D/f) / D)`` (Hoeffding);
    * the rounding: under 1 per site and coordinate;
    * the noise: Skellam of variance ``max_sites / min_contributions * aggregate_variance``
      (every site may add its share), by its Chernoff bound.
    """
    dimension = _positive_integer("dimension", dimension)
    t = _positive_integer("min_contributions", min_contributions)
    n = _positive_integer("max_sites", max_sites)
    if n < t:
        raise ValueError(f"max_sites ({n}) must be at least min_contributions ({t})")
    clip = _positive_number("clip", clip)
    records = _positive_integer("max_records_per_site", max_records_per_site)
    sigma = _positive_number("noise_multiplier", noise_multiplier)
    if not (isinstance(failure_probability, (int, float)) and 0 < failure_probability < 1):
        raise ValueError(f"failure_probability must be in (0, 1), got {failure_probability!r}")
    max_bits = _positive_integer("max_bits", max_bits)
    if not 2 <= max_bits <= MAX_BITS:
        raise ValueError(f"max_bits must be between 2 and {MAX_BITS}, got {max_bits}")
    padded = padded_dimension(dimension)
    scaled_clip = scaled_clip_for(dimension, sensitivity_inflation)
    aggregate_variance = (sigma * scaled_clip) ** 2
    log_ratio = math.log(4 * padded / failure_probability)
    reach = scaled_clip * n * records
    signal = min(reach, reach * math.sqrt(2 * log_ratio / padded))
    noise = _skellam_tail(aggregate_variance * n / t, log_ratio)
    bound = signal + n + noise
    bits = math.ceil(math.log2(bound)) + 2
    if bits > max_bits:
        raise ValueError(
            f"the aggregate needs {bits} bits, above max_bits={max_bits}: up to {n} sites of "
            f"{records} records each (max_sites, max_records_per_site) at noise_multiplier "
            f"{sigma:g} reach +-{bound:.4g} per coordinate; lower max_records_per_site or "
            f"max_sites, or raise max_bits")
    return DistributedNoiseParams(
        dimension=dimension, padded_dimension=padded, clip=clip,
        max_records_per_site=records, min_contributions=t, max_sites=n,
        noise_multiplier=sigma, scale=scaled_clip / clip, bits=bits,
        aggregate_variance=aggregate_variance, share_variance=aggregate_variance / t,
        bound=bound, failure_probability=failure_probability,
        sensitivity_inflation=sensitivity_inflation)


# --- encoding and decoding -------------------------------------------------------------------

def encode_contribution(summed_gradients: np.ndarray, params: DistributedNoiseParams, *,
                        rotation_seed: int, rng: RandomSource) -> np.ndarray:
    """A site's contribution: its sum of clipped per-record gradients, rotated, scaled,
    stochastically rounded, plus its Skellam share, modulo 2^bits (``params.dtype``).

    ``rotation_seed`` is public and the same at every site for the round (fresh each round,
    chosen independently of the data); ``rng`` is the site's own secret randomness. A vector
    longer than ``clip * max_records_per_site`` is refused: the range was not sized for it.
    """
    values = np.asarray(summed_gradients, dtype=np.float64)
    if values.shape != (params.dimension,):
        raise ValueError(f"summed_gradients must have shape ({params.dimension},), "
                         f"got {values.shape}")
    if not np.all(np.isfinite(values)):
        raise ValueError("summed_gradients has non-finite values")
    norm = float(np.linalg.norm(values))
    limit = params.clip * params.max_records_per_site
    if norm > limit * (1 + 1e-6):  # float32 clipping may leave a norm a hair above C
        raise ValueError(f"summed_gradients has norm {norm:.6g}, above clip * "
                         f"max_records_per_site = {limit:.6g}: the modular range was not "
                         f"sized for it")
    rounded = stochastic_round(rotate(values, rotation_seed) * params.scale, rng)
    noisy = rounded + skellam_noise(params.share_variance, params.padded_dimension, rng)
    return np.mod(noisy, params.modulus).astype(params.dtype)


def _check_modular(values: np.ndarray, params: DistributedNoiseParams, name: str) -> np.ndarray:
    array = np.asarray(values)
    if array.shape != (params.padded_dimension,):
        raise ValueError(f"{name} must have shape ({params.padded_dimension},), "
                         f"got {array.shape}")
    if not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{name} must hold integers, got {array.dtype}")
    if array.size and (int(array.min()) < 0 or int(array.max()) >= params.modulus):
        raise ValueError(f"{name} has values outside [0, 2^{params.bits})")
    return array.astype(np.uint64)


def modular_sum(contributions: Sequence[np.ndarray], params: DistributedNoiseParams) -> np.ndarray:
    """The sum of encoded contributions modulo 2^bits: what secure aggregation reveals."""
    if not contributions:
        raise ValueError("contributions must not be empty")
    total = np.zeros(params.padded_dimension, dtype=np.uint64)
    for i, contribution in enumerate(contributions):
        total = (total + _check_modular(contribution, params, f"contributions[{i}]")) \
            % np.uint64(params.modulus)
    return total.astype(params.dtype)


def centred(values: np.ndarray, bits: int) -> np.ndarray:
    """Residues modulo 2^bits as signed integers in [-2^(bits-1), 2^(bits-1))."""
    array = np.asarray(values).astype(np.int64)
    return np.where(array >= 1 << (bits - 1), array - (1 << bits), array)


def decode_sum(summed: np.ndarray, params: DistributedNoiseParams, *, rotation_seed: int,
               contributions: int) -> np.ndarray:
    """The noisy sum of the sites' gradient sums, from the modular sum of ``contributions``
    encodings: centred, checked, divided by the scale, rotated back, cropped.

    A sum of fewer than ``min_contributions`` is refused (its noise is below the calibrated
    total), as is one of more than ``max_sites`` (the range was sized for those). Any centred
    coordinate beyond ``params.bound`` raises ``AggregateOverflowError``: honest contributions
    exceed it with probability below ``failure_probability``, and an aggregate that went past
    the bound by less than ``2^bits - 2 bound`` lands there after wrapping around.
    """
    if int(contributions) != contributions or not (
            params.min_contributions <= contributions <= params.max_sites):
        raise ValueError(f"contributions must be between min_contributions "
                         f"({params.min_contributions}) and max_sites ({params.max_sites}), "
                         f"got {contributions!r}: a sum of fewer is never decoded")
    values = centred(_check_modular(summed, params, "summed"), params.bits)
    beyond = np.abs(values) > params.bound
    if np.any(beyond):
        raise AggregateOverflowError(
            f"the aggregate has {int(beyond.sum())} of {values.size} coordinates beyond the "
            f"bound +-{params.bound:.6g} (largest magnitude {int(np.abs(values).max())}, range "
            f"+-{params.modulus // 2}): it may have wrapped around the modulus, so it is not "
            f"decoded")
    return unrotate(values / params.scale, rotation_seed, params.dimension)


# --- the two guarantees of a site ------------------------------------------------------------

@dataclass(frozen=True)
class SiteGuarantees:
    """A site's epsilon at ``delta`` after ``steps`` steps at ``sample_rate``: (a) against the
    coordinator and the other sites, from the aggregate noise of ``honest_contributions``
    shares; (b) the fallback of its own share alone, if secure aggregation is broken."""

    aggregate_epsilon: float
    fallback_epsilon: float
    delta: float
    sample_rate: float
    steps: int
    min_contributions: int
    honest_contributions: int

    def describe(self) -> str:
        return (f"(a) epsilon {self.aggregate_epsilon:.4g} from the noise of "
                f"{self.honest_contributions} contributions (secure aggregation holds); "
                f"(b) epsilon {self.fallback_epsilon:.4g} from this site's share alone; "
                f"delta {self.delta:g}, {self.steps} steps at sample rate "
                f"{self.sample_rate:g}")


def site_guarantees(params: DistributedNoiseParams, *, sample_rate: float, steps: int,
                    delta: float, honest_contributions: int | None = None) -> SiteGuarantees:
    """Both guarantees of a site (``SiteGuarantees``).

    (a) counts ``honest_contributions`` shares (default ``min_contributions``: more only adds
    noise); a caller who fears that some sites collude with the coordinator, and so could
    subtract their own shares, passes fewer. (b) is the site's share alone, variance
    ``aggregate_variance / min_contributions``. Both use the rounded Skellam accounting of
    ``distributed_noise_accounting`` over the padded dimension.
    """
    t = params.min_contributions
    honest = t if honest_contributions is None else _positive_integer(
        "honest_contributions", honest_contributions)
    if honest > params.max_sites:
        raise ValueError(f"honest_contributions ({honest}) exceeds max_sites "
                         f"({params.max_sites})")

    def epsilon(shares: int) -> float:
        return skellam_epsilon(params.noise_multiplier * math.sqrt(shares / t),
                               params.scaled_clip, params.padded_dimension, sample_rate,
                               steps, delta)

    return SiteGuarantees(aggregate_epsilon=epsilon(honest), fallback_epsilon=epsilon(1),
                          delta=delta, sample_rate=sample_rate, steps=int(steps),
                          min_contributions=t, honest_contributions=honest)


def aggregate_noise_multiplier(epsilon: float, delta: float, sample_rate: float, steps: int, *,
                               dimension: int, min_contributions: int,
                               guarantee: Guarantee = "aggregate",
                               sensitivity_inflation: float = DEFAULT_SENSITIVITY_INFLATION
                               ) -> float:
    """The aggregate noise multiplier (for ``choose_parameters``) whose named guarantee is
    within ``epsilon``: ``aggregate`` is (a), the noise of ``min_contributions`` shares;
    ``fallback`` is (b), a site's share alone, so the aggregate is ``sqrt(t)`` times that."""
    t = _positive_integer("min_contributions", min_contributions)
    if guarantee not in ("aggregate", "fallback"):
        raise ValueError(f"guarantee must be 'aggregate' or 'fallback', got {guarantee!r}")
    sigma = calibrate_skellam_noise(epsilon, delta, sample_rate, steps,
                                    scaled_clip_for(dimension, sensitivity_inflation),
                                    padded_dimension(dimension))
    return sigma if guarantee == "aggregate" else sigma * math.sqrt(t)
