"""Drift scores between a site's reference data and what arrived since: pure functions.

Two views of the same question, "does the new data look like the old?":

* ``token_js_divergence``: how differently the two samples use the vocabulary
  (new words, new templates, another specialty mix all move token frequencies);
* ``hidden_state_shift``: how far the base model's mean representation of a record
  moved, in units of the reference's own spread.

Both are estimated from finite samples, so both carry a small-sample bias that is
positive even when nothing drifted; each one subtracts its leading-order bias term
(see the functions) so that two samples of one distribution score near 0.
``mean_hidden_states`` is the one function here that runs a model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from peft import PeftModel
from scipy.spatial.distance import jensenshannon
from torch.utils.data import DataLoader, TensorDataset


def token_js_divergence(reference: Sequence[Sequence[int]], new: Sequence[Sequence[int]], vocab_size: int) -> float:
    """Jensen-Shannon divergence (bits, 0..1) of the token frequencies of two samples.

    Parameters
    ----------
    reference, new : Sequence[Sequence[int]]
        Token ids of each record (real tokens only, no padding), ids in ``[0, vocab_size)``.
    vocab_size : int
        Size of the vocabulary.

    Returns
    -------
    float
        ``JSD(P || Q) = H(M) - (H(P) + H(Q)) / 2`` with ``M = (P + Q) / 2``, where ``P``
        and ``Q`` are the token frequencies pooled over the records of each sample,
        minus the Miller-Madow estimate of the plug-in bias, clipped to ``[0, 1]``.
        0 for identical frequencies, 1 for disjoint supports (before the correction).

    Raises
    ------
    ValueError
        If a sample has no token, or an id is outside the vocabulary.
    """
    p, q = _token_counts(reference, vocab_size), _token_counts(new, vocab_size)
    n_p, n_q = float(p.sum()), float(q.sum())
    if n_p == 0 or n_q == 0:
        raise ValueError("token_js_divergence needs at least one token in each sample")
    # scipy returns the JS *distance*: the square root of the divergence.
    plug_in = float(jensenshannon(p / n_p, q / n_q, base=2.0)) ** 2
    return float(min(1.0, max(0.0, plug_in - _js_bias(p, q))))


def _js_bias(p: np.ndarray, q: np.ndarray) -> float:
    # Frequencies estimated from N tokens underestimate an entropy by about
    # (K - 1) / (2 N) nats (Miller-Madow; K = categories seen). The mixture M = (P + Q) / 2
    # is estimated from both samples, so its bias is (K_M - 1)(1/N_P + 1/N_Q) / 8. The
    # plug-in JSD therefore overestimates by the difference below, ~ (K - 1) / (4 N) bits
    # * 1/ln 2 for equal sizes: 0.01-0.05 bits for a few hundred notes over a ~2k vocabulary,
    # the same order as a drift threshold. Restricting to tokens seen in both samples
    # would hide exactly the new words drift brings; add-k smoothing changes the value
    # for disjoint supports. Miller-Madow keeps 0 and 1 bit where they belong (up to
    # its own small term) and removes most of the bias.
    n_p, n_q = p.sum(), q.sum()
    k_p, k_q, k_m = np.count_nonzero(p), np.count_nonzero(q), np.count_nonzero(p + q)
    nats = (k_p - 1) / (4 * n_p) + (k_q - 1) / (4 * n_q) - (k_m - 1) * (1 / n_p + 1 / n_q) / 8
    return float(nats / math.log(2))


def _token_counts(records: Sequence[Sequence[int]], vocab_size: int) -> np.ndarray:
    ids = np.fromiter((t for record in records for t in record), dtype=np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        raise ValueError(f"token ids must lie in [0, {vocab_size}), got {ids.min()}..{ids.max()}")
    return np.bincount(ids, minlength=vocab_size).astype(np.float64)  # [vocab_size]


def hidden_state_shift(reference: np.ndarray, new: np.ndarray) -> float:
    """Distance of the mean of ``new`` from the mean of ``reference``, in reference spreads.

    Parameters
    ----------
    reference : np.ndarray
        ``[n, d]`` per-record vectors (mean hidden states), ``n >= 2``.
    new : np.ndarray
        ``[m, d]``, ``m >= 1``.

    Returns
    -------
    float
        ``sqrt(max(0, |mu_new - mu_ref|^2 - tr S_ref / n - tr S_new / m) / tr S_ref)``,
        where ``mu`` are the sample means and ``tr S`` the sum of the per-dimension
        sample variances (``ddof=1``; ``tr S_new := tr S_ref`` when ``m = 1``).
        ``tr S_ref`` is the mean squared distance of a reference record from its mean,
        so 1.0 means the means are one typical record-to-mean distance apart.
        The two subtracted terms are the expected ``|mu_new - mu_ref|^2`` when both
        samples come from one distribution, so the score is ~0 then (not the
        ``sqrt(1/n + 1/m)`` of the uncorrected ratio).

    Raises
    ------
    ValueError
        On shapes that do not fit the above.
    """
    ref, cur = np.asarray(reference, dtype=np.float64), np.asarray(new, dtype=np.float64)
    if ref.ndim != 2 or cur.ndim != 2 or ref.shape[1] != cur.shape[1] or len(ref) < 2 or len(cur) < 1:
        raise ValueError(f"need reference [n>=2, d] and new [m>=1, d], got {ref.shape} and {cur.shape}")
    spread_ref = float(ref.var(axis=0, ddof=1).sum())
    spread_new = float(cur.var(axis=0, ddof=1).sum()) if len(cur) >= 2 else spread_ref
    gap = float(np.sum((cur.mean(axis=0) - ref.mean(axis=0)) ** 2))
    excess = max(0.0, gap - spread_ref / len(ref) - spread_new / len(cur))
    # A reference of identical records has no spread: fall back to a tiny one (finite score).
    return math.sqrt(excess / max(spread_ref, 1e-12))


def mean_hidden_states(model: PeftModel, dataset: TensorDataset, batch_size: int) -> np.ndarray:
    """Per-record mean of the base model's last hidden state over real tokens.

    Parameters
    ----------
    model : PeftModel
        A peft ``PeftModel`` (causal LM); its LoRA adapter is disabled here, so the
        result depends on the base model only.
    dataset : TensorDataset
        ``(input_ids [N, T], attention_mask [N, T])`` as ``encode_texts`` makes it.
    batch_size : int
        Records per forward pass (speed only).

    Returns
    -------
    np.ndarray
        ``[N, d]`` float32. The model's training mode is restored afterwards.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = next(model.parameters()).device
    was_training, means = model.training, []
    model.eval()
    try:
        with model.disable_adapter(), torch.no_grad():
            for input_ids, attention_mask in DataLoader(dataset, batch_size=batch_size):
                input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
                out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
                hidden = out.hidden_states[-1].float()  # [B, T, d]
                mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # [B, T, 1]
                means.append((hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0))  # [B, d]
    finally:
        model.train(was_training)
    return torch.cat(means).cpu().numpy().astype(np.float32)
