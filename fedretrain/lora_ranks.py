"""Mixed LoRA ranks across sites (HetLoRA's truncation, Cho et al. 2024): what both sides compute.

The global adapter has the job's rank ``r``: each ``lora_A`` weight is ``(r, in)`` and each
``lora_B`` weight ``(out, r)``, and component ``j`` of the adapter is row ``j`` of every A
with column ``j`` of every B. A site with less memory sets ``lora-rank = k < r``: it trains
components ``0..k-1`` only, as a peft LoRA of rank ``k`` whose ``alpha`` is scaled by
``k / r`` (peft's scale ``alpha / r`` stays the global adapter's, so its model starts
exactly as the global adapter truncated to ``k`` components), and sends back the full-rank
adapter with components ``k..r-1`` as it got them. The coordinator checks that those are
unchanged, and averages each component over the sites that trained it.

With every site weighing the same, that per-component mean follows from the plain mean of
all replies: for a component trained by ``n_j`` of ``K`` sites, the others sent the global
value ``G_j``, so ``mean_j = G_j + (K / n_j) (avg_j - G_j)`` (:func:`rescale_components`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

# Which axis of a LoRA weight indexes the rank's components.
_RANK_AXIS = {"lora_A": 0, "lora_B": 1}


def rank_axis(key: str) -> int:
    """The axis of tensor ``key`` that holds the rank's components (0 for lora_A, 1 for lora_B).

    Raises
    ------
    ValueError
        ``key`` is neither a lora_A nor a lora_B tensor.
    """
    for part, axis in _RANK_AXIS.items():
        if part in key:
            return axis
    raise ValueError(f"{key!r} is neither a lora_A nor a lora_B tensor: no rank to truncate")


def adapter_rank(shapes: Mapping[str, tuple[int, ...]]) -> int | None:
    """The common rank of an adapter's tensors, or None if they have none in common (not plain LoRA)."""
    ranks = set()
    for key, shape in shapes.items():
        try:
            axis = rank_axis(key)
        except ValueError:
            return None
        if len(shape) != 2:
            return None
        ranks.add(shape[axis])
    return ranks.pop() if len(ranks) == 1 else None


def truncate(arrays: Mapping[str, np.ndarray], rank: int) -> dict[str, np.ndarray]:
    """The adapter's first ``rank`` components (copies): a rank-``rank`` adapter."""
    return {key: np.array(np.take(a, range(rank), axis=rank_axis(key))) for key, a in arrays.items()}


def expand(trained: Mapping[str, np.ndarray], full: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``full`` with its first components replaced by the lower-rank ``trained`` ones."""
    out = {}
    for key, value in full.items():
        merged = np.array(value)
        part = trained[key]
        rank = part.shape[rank_axis(key)]
        index = (slice(None), slice(0, rank)) if rank_axis(key) else (slice(0, rank), slice(None))
        merged[index] = part
        out[key] = merged
    return out


def changed_beyond(arrays: Mapping[str, np.ndarray], sent: Mapping[str, np.ndarray], rank: int) -> list[str]:
    """The tensors of ``arrays`` whose components from ``rank`` on differ from ``sent``'s."""
    changed = []
    for key, value in arrays.items():
        axis = rank_axis(key)
        tail = (slice(None), slice(rank, None)) if axis else (slice(rank, None), slice(None))
        if not np.array_equal(value[tail], sent[key][tail]):
            changed.append(key)
    return changed


def rescale_components(
    mean: Mapping[str, np.ndarray], sent: Mapping[str, np.ndarray], ranks: Sequence[int]
) -> dict[str, np.ndarray]:
    """Turn the plain mean of ``len(ranks)`` replies into each component's mean over the sites that trained it.

    ``ranks``: each reply's rank (its components ``rank..`` are ``sent``'s). A component no
    site trained stays ``sent``'s.
    """
    k = len(ranks)
    out = {}
    for key, value in mean.items():
        axis = rank_axis(key)
        full = value.shape[axis]
        trained_by = np.array([sum(1 for r in ranks if r > j) for j in range(full)], dtype=np.float64)
        factor = np.divide(k, trained_by, out=np.zeros(full), where=trained_by > 0)
        shape = (1, full) if axis else (full, 1)
        centre = np.asarray(sent[key], dtype=np.float64)
        update = (np.asarray(value, dtype=np.float64) - centre) * factor.reshape(shape)
        out[key] = (centre + update).astype(value.dtype)
    return out
