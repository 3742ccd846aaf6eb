"""What both sides of secure aggregation compute: quantised updates and the masks that hide them.

The protocol is Flower's SecAgg+ (Bell et al. 2020), its stages, messages and record keys
(``flwr.common.secure_aggregation``), and so are its key agreement, Shamir shares,
share encryption and stochastic quantisation; this module adds the two pieces fedretrain
does differently:

- **The mask stream.** Flower's ``pseudo_rand_gen`` folds each 256-bit seed into 32 bits
  for numpy's ``RandomState`` (Mersenne Twister): a coordinator could try all 2**32 private
  seeds of a site. Here the mask is ChaCha20's keystream under the SHA-256 of the seed
  (``cryptography``, which Flower's primitives use too), so the seeds keep their 256 bits;
  it is also faster (benchmarks/bench_secagg.py).
- **What is masked.** Sites mask their update (adapter minus the global adapter they
  trained from), not the adapter: a round's change is small, so the quantisation range
  (``clipping_range``) can be tight and its step fine. Every site weighs the same, as
  in the unmasked rounds, so no weight travels with the vector: the coordinator divides
  the unmasked sum by the number of sites it holds.

Masked vectors travel as uint32 (the modulus is at most 2**32), half the bytes of
Flower's int64.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from flwr.common.secure_aggregation.quantization import dequantize, quantize
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage

__all__ = [
    "RECORD_KEY_CONFIGS",
    "Key",
    "Stage",
    "mask_stream",
    "quantize_update",
    "mask",
    "unmasked_mean",
    "MAX_MODULUS",
    "SECURE_STAGE",
]

# The record a site's mod (client/secagg.py) adds to a train message it answers inside the
# protocol, and strips from any other: what a site requiring secure aggregation checks.
SECURE_STAGE = "secure-aggregation"
# Masked vectors travel as uint32.
MAX_MODULUS = 2**32
# The ChaCha20 nonce: each key masks one vector once (keys are new every round).
_NONCE = bytes(16)


def mask_stream(seed: bytes, modulus: int, shapes: Sequence[tuple[int, ...]]) -> list[np.ndarray]:
    """Uniform integers in ``[0, modulus)`` (a power of two, at most 2**32), one array per shape.

    The same ``seed`` gives the same arrays on every machine: ChaCha20's keystream under
    ``SHA-256(seed)``, read as little-endian uint32 and reduced modulo ``modulus``.
    """
    if modulus <= 1 or modulus > MAX_MODULUS or modulus & (modulus - 1):
        raise ValueError(f"the modulus must be a power of two up to 2**32, got {modulus}")
    sizes = [int(np.prod(shape, dtype=np.int64)) for shape in shapes]
    key = hashlib.sha256(seed).digest()
    encryptor = Cipher(algorithms.ChaCha20(key, _NONCE), mode=None).encryptor()
    stream = np.frombuffer(encryptor.update(bytes(4 * sum(sizes))), dtype="<u4").astype(np.int64)
    stream &= modulus - 1
    out, start = [], 0
    for shape, size in zip(shapes, sizes, strict=True):
        out.append(stream[start : start + size].reshape(shape))
        start += size
    return out


def quantize_update(
    update: Sequence[np.ndarray], clipping_range: float, quantization_range: int
) -> tuple[list[np.ndarray], int]:
    """Flower's stochastic quantisation of ``update`` into ``[0, quantization_range]``, and how many values it clipped.

    A value beyond ``±clipping_range`` is clipped to it (Flower does so silently); the
    count lets the site say so.
    """
    arrays = [np.asarray(a, dtype=np.float64) for a in update]
    clipped = int(sum(np.count_nonzero(np.abs(a) > clipping_range) for a in arrays))
    return [q.astype(np.int64) for q in quantize(arrays, clipping_range, quantization_range)], clipped


def mask(
    quantized: Sequence[np.ndarray],
    modulus: int,
    private_seed: bytes,
    pairwise: Mapping[int, bytes],
    own_id: int,
) -> list[np.ndarray]:
    """``quantized`` plus the private mask and each pairwise mask, modulo ``modulus``, as uint32.

    ``pairwise`` maps each neighbour's node id to the key this site shares with it; the
    site with the larger id adds the pair's mask and the other subtracts it, so the pair's
    masks cancel in the sum.
    """
    shapes = [a.shape for a in quantized]
    total = [
        np.asarray(a, dtype=np.int64) + m
        for a, m in zip(quantized, mask_stream(private_seed, modulus, shapes), strict=True)
    ]
    for node_id, key in pairwise.items():
        sign = 1 if own_id > node_id else -1
        for acc, m in zip(total, mask_stream(key, modulus, shapes), strict=True):
            acc += sign * m
    return [np.mod(acc, modulus).astype(np.uint32) for acc in total]


def unmasked_mean(
    unmasked_sum: Sequence[np.ndarray], contributors: int, clipping_range: float, quantization_range: int
) -> list[np.ndarray]:
    """The mean update of ``contributors`` sites from the sum of their quantised updates.

    Each site's value ``x`` was quantised to about ``(x + c) * T / (2c)``; the sum of ``n``
    of them dequantises (Flower's ``dequantize``, which subtracts one ``c``) to
    ``sum(x) + (n - 1) c``.
    """
    if contributors < 1:
        raise ValueError("no site contributed to the sum")
    summed = dequantize([np.asarray(a, dtype=np.int64) for a in unmasked_sum], clipping_range, quantization_range)
    offset = (contributors - 1) * clipping_range
    return [(a - offset) / contributors for a in summed]
