"""Randomness a site's secure-aggregation share is drawn from: a cryptographic stream.

The Skellam share and the stochastic rounding of a secure DP-SGD contribution must be
unpredictable to the coordinator: a share it could predict it could subtract. NumPy's PCG64 is
a fine statistical generator but not a cryptographic one (enough of its outputs give its state
away), so the share is drawn from ChaCha20's keystream (``cryptography``'s OpenSSL binding),
keyed by 256 secret bits: without the key, the stream cannot be told from uniform bits by any
known means, however much of it an attacker saw.

Two draws are needed, as ``numpy.random.Generator`` names them: ``random`` (uniforms in [0, 1),
53 bits each) and ``poisson``. Poisson variates come from those uniforms: by inversion for a
mean below 10, and by Hörmann's transformed rejection with squeeze (PTRS; W. Hörmann, "The
transformed rejection method for generating Poisson random variables", Insurance: Mathematics
and Economics 12, 1993) above, which is exact up to floating-point rounding in its acceptance
test, as NumPy's own Poisson sampler is.
"""

from __future__ import annotations

import hashlib
import math
from typing import Protocol

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from scipy.special import gammaln

_KEY_BYTES = 32


class RandomSource(Protocol):
    """What a share's rounding and noise draw from: ``CipherRandom`` at a site, or a NumPy
    ``Generator`` where unpredictability does not matter (tests, benchmarks)."""

    def random(self, shape: int | tuple[int, ...] = ...) -> np.ndarray: ...

    def poisson(self, lam: float, size: int) -> np.ndarray: ...

_INVERSION_BELOW = 10.0  # PTRS needs a mean of at least 10
_UNIT = 2.0 ** -53


class CipherRandom:
    """Uniform and Poisson draws from the ChaCha20 keystream of one 256-bit secret key.

    Deterministic for a key (the same key gives the same draws); a fresh key for every use.
    """

    def __init__(self, key: bytes) -> None:
        if not isinstance(key, bytes) or len(key) != _KEY_BYTES:
            raise ValueError(f"the key must be {_KEY_BYTES} bytes")
        # a 16-byte nonce of zeros: ChaCha20's counter (its first 4 bytes) starts at 0, and the
        # key is never reused, so a fixed nonce is safe
        self._stream = Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor()

    @classmethod
    def derived(cls, secret: int, *labels: int) -> CipherRandom:
        """A generator keyed by SHA-256 of a non-negative ``secret`` (e.g. 256 bits from the
        OS) and ``labels`` (a step, a purpose), so one secret gives independent streams."""
        digest = hashlib.sha256(b"privatune/secure-random/v1")
        for what, value in (("secret", secret), *(("labels", label) for label in labels)):
            if isinstance(value, bool) or int(value) != value or value < 0:
                raise ValueError(f"{what} must be non-negative integers, got {value!r}")
            encoded = int(value).to_bytes(max(1, (int(value).bit_length() + 7) // 8), "big")
            digest.update(len(encoded).to_bytes(4, "big") + encoded)
        return cls(digest.digest())

    def _mantissas(self, count: int) -> np.ndarray:
        """``count`` integers of 53 random bits each, as float64 (exactly)."""
        words = np.frombuffer(self._stream.update(bytes(8 * count)), dtype=np.uint64)
        return (words >> np.uint64(11)).astype(np.float64)

    def random(self, shape: int | tuple[int, ...] = ()) -> np.ndarray:
        """Uniforms in [0, 1) with 53 random bits each, like ``Generator.random``."""
        return (self._mantissas(int(np.prod(shape, dtype=np.int64))) * _UNIT).reshape(shape)

    def _open_uniforms(self, count: int) -> np.ndarray:
        """Uniforms in (0, 1): never 0, so logarithms and divisions stay finite."""
        return (self._mantissas(count) + 0.5) * _UNIT

    def poisson(self, lam: float, size: int) -> np.ndarray:
        """``size`` Poisson(``lam``) draws as int64, like ``Generator.poisson``."""
        if not (math.isfinite(lam) and lam >= 0):
            raise ValueError(f"lam must be a non-negative finite number, got {lam!r}")
        if isinstance(size, bool) or int(size) != size or size < 0:
            raise ValueError(f"size must be a non-negative integer, got {size!r}")
        if lam == 0 or size == 0:
            return np.zeros(int(size), dtype=np.int64)
        if lam < _INVERSION_BELOW:
            return self._poisson_by_inversion(lam, int(size))
        return self._poisson_ptrs(lam, int(size))

    def _poisson_by_inversion(self, lam: float, size: int) -> np.ndarray:
        """The smallest k with P(X <= k) > u, found by walking up the probabilities."""
        u = self._open_uniforms(size)
        draws = np.zeros(size, dtype=np.int64)
        probability = math.exp(-lam)
        cumulative = probability
        # past lam + 40 sqrt(lam) + 40 the remaining mass is below 1e-300: a uniform that is
        # still above the sum there is one rounding has kept from reaching 1
        for k in range(1, int(lam + 40 * math.sqrt(lam) + 40)):
            above = u > cumulative
            if not above.any():
                break
            draws += above
            probability *= lam / k
            cumulative += probability
        return draws

    def _poisson_ptrs(self, lam: float, size: int) -> np.ndarray:
        """Hörmann's PTRS for lam >= 10: propose k from a transformed uniform, accept at once in
        the squeeze, else by the exact density ratio; about 1.1 proposals per draw."""
        root, log_lam = math.sqrt(lam), math.log(lam)
        b = 0.931 + 2.53 * root
        a = -0.059 + 0.02483 * b
        log_inverse_alpha = math.log(1.1239 + 1.1328 / (b - 3.4))
        squeeze = 0.9277 - 3.6224 / (b - 2)
        draws = np.empty(size, dtype=np.int64)
        pending = np.arange(size)
        while pending.size:
            u = self._open_uniforms(pending.size) - 0.5
            v = self._open_uniforms(pending.size)
            us = 0.5 - np.abs(u)
            k = np.floor((2 * a / us + b) * u + lam + 0.43)
            quick = (us >= 0.07) & (v <= squeeze)
            possible = ~quick & (k >= 0) & ~((us < 0.013) & (v > us))
            safe_k = np.where(possible, k, 0.0)
            exact = possible & (np.log(v) + log_inverse_alpha - np.log(a / (us * us) + b)
                                <= -lam + safe_k * log_lam - gammaln(safe_k + 1))
            accepted = quick | exact
            draws[pending[accepted]] = k[accepted].astype(np.int64)
            pending = pending[~accepted]
        return draws
