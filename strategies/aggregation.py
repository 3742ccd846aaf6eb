"""Weighted average of adapter updates in one pass over the client bytes.

This replaces Flower's ``aggregate_arrayrecords`` (flwr 1.41), which runs about
10x below memory bandwidth for two reasons (research/performance.md §4):
``Array.numpy()`` deserializes every update with ``np.load``, copying it, and
``acc += value.numpy() * weight`` allocates a full-size temporary per addition.
Here the inputs are zero-copy views (``fedretrain.records.from_array_record``) and
each addition is one fused, in-place ``acc.add_(x, alpha=w)``: read x, update acc.
Per key the accumulator (a LoRA A or B matrix, typically well under a few MB) stays
in cache while the K inputs stream through it.

Measured on 2 cores, K=100 x 4M float32 params in 64 tensors, in GB/s of client
bytes (``benchmarks/bench_aggregation.py`` times the chosen path):

=============================  ===========  ===========================
                               quiet cores  2 other CPU-bound processes
=============================  ===========  ===========================
torch ``add_``, 2 threads      16.7         2.0-2.4
torch ``add_``, 1 thread       13.2         6.6-8.7
NumPy multiply(out=) + add     10.1         7-10
=============================  ===========  ===========================

So the loop runs torch single-threaded: two OpenMP threads gain a quarter on quiet
cores but lose 3-4x when another process (the SuperLink, a training job) holds a
core, because every 256 KB add waits for a descheduled peer thread.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import numpy as np
import torch


def normalised_weights(weights: Sequence[float]) -> list[float]:
    """Return ``weights`` scaled to sum to 1.

    Raises
    ------
    ValueError
        No weights, a negative or non-finite weight, or a sum that is not positive.
    """
    if len(weights) == 0:
        raise ValueError("weighted_average needs at least one input")
    values = [float(w) for w in weights]
    bad = [w for w in values if not math.isfinite(w) or w < 0]
    if bad:
        raise ValueError(f"weights must be finite and non-negative, got {bad}")
    total = math.fsum(values)
    if total <= 0:
        raise ValueError(f"weights must sum to a positive number, got {total}")
    return [w / total for w in values]


def weighted_average(
    arrays: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float]
) -> dict[str, np.ndarray]:
    """Average adapter tensors key by key, weighted by ``weights``.

    Parameters
    ----------
    arrays : Sequence[Mapping[str, np.ndarray]]
        One mapping per client; all must have the same keys and, per key, the same
        shape. Inputs are only read (they may be read-only views into messages).
    weights : Sequence[float]
        One non-negative weight per client, e.g. its number of examples. They are
        normalised to sum to 1.

    Returns
    -------
    dict[str, np.ndarray]
        ``sum_k w_k * arrays[k][key] / sum_k w_k`` per key, in float32, accumulated
        in float32, in the key order of ``arrays[0]``.

    Raises
    ------
    ValueError
        No inputs, bad weights, a length mismatch, or differing keys or shapes.
    """
    factors = normalised_weights(weights)
    if len(arrays) != len(factors):
        raise ValueError(f"{len(arrays)} inputs but {len(factors)} weights")
    keys = list(arrays[0])
    for k, update in enumerate(arrays[1:], start=1):
        if set(update) != set(keys):
            raise ValueError(f"input {k} has keys that differ from input 0")
    # The inputs are read-only views; torch warns once that it cannot protect them
    # from writes. Only the accumulator is written here, so the warning is noise.
    with warnings.catch_warnings(), _torch_single_threaded():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return {key: _average_one(key, [a[key] for a in arrays], factors) for key in keys}


@contextmanager
def _torch_single_threaded() -> Iterator[None]:
    """Run torch ops on one intra-op thread, then restore the process setting.

    See the module docstring for why. The setting is process-wide; the strategy
    runs in the ServerApp's single thread, so nothing else sees the change.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _average_one(key: str, tensors: list[np.ndarray], factors: list[float]) -> np.ndarray:
    """One key: ``acc = sum_k f_k * x_k`` in a float32 accumulator, in place."""
    shape = tensors[0].shape
    acc = torch.zeros(shape, dtype=torch.float32)
    for k, (x, factor) in enumerate(zip(tensors, factors, strict=True)):
        if x.shape != shape:
            raise ValueError(f"'{key}': input {k} has shape {x.shape}, input 0 has {shape}")
        if factor == 0.0:
            continue  # a zero weight must not turn 0 * NaN into NaN (or cost a pass)
        # add_ promotes float16/float64/int inputs into the float32 accumulator.
        acc.add_(torch.from_numpy(np.ascontiguousarray(x)), alpha=factor)
    return acc.numpy()
