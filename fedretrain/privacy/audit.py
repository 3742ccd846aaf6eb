"""Empirical privacy auditing in one training run (Steinke, Nasr and Jagielski, NeurIPS 2023).

The auditor plants ``m`` canaries and flips a fair coin for each: heads, the canary goes
into the training data. After training it guesses, for ``r`` of them, whether they
were in (it abstains on the others) and ``v`` of its guesses are right.

If training is ``(epsilon, 0)``-DP, the number of right guesses is stochastically
dominated by ``Binomial(r, e^eps / (1 + e^eps))`` (the paper's Theorem 3): no attack
does better than randomized response. With ``delta > 0`` the tail gains a term of at
most ``2 m delta max_i P[v - i <= Binomial < v] / i`` (the paper's Algorithm 2). So
``v`` right guesses at p-value below ``1 - confidence`` refute every epsilon whose tail
is that small, and the largest such epsilon is a lower bound on the training's true
epsilon, holding with that confidence over the auditor's coins.

Pure functions over counts and scores; nothing here knows about models or files.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.stats import binom

# Bisection on epsilon stops when the bracket is this narrow (nats).
_TOLERANCE = 1e-9


@dataclass(frozen=True)
class AuditBound:
    """What one audit refutes.

    Attributes
    ----------
    m
        Canaries planted.
    r
        Guesses made (``m - r`` abstentions).
    v
        Right guesses.
    k_plus, k_minus
        Guesses of IN (highest scores) and of OUT (lowest scores).
    confidence
        Probability over the auditor's coins that the bound holds, after the
        correction for every ``(k_plus, k_minus)`` that was tried.
    delta
        The ``delta`` of the ``(epsilon, delta)``-DP claims refuted.
    epsilon
        Every claim of ``(eps, delta)``-DP with ``eps < epsilon`` is refuted (0.0: none).
    """

    m: int
    r: int
    v: int
    k_plus: int
    k_minus: int
    confidence: float
    delta: float
    epsilon: float


def p_value(m: int, r: int, v: int, epsilon: float, delta: float = 0.0) -> float:
    """Probability of at least ``v`` right guesses out of ``r`` under ``(epsilon, delta)``-DP.

    Parameters
    ----------
    m
        Canaries, each included independently with probability 1/2.
    r
        Guesses made (abstentions excluded).
    v
        Right guesses.
    epsilon, delta
        The DP claim under test (the null hypothesis).

    Returns
    -------
    float
        ``P[Binomial(r, q) >= v] + 2 m delta max_{1<=i<=v} P[v-i <= Binomial(r, q) < v] / i``
        with ``q = e^eps / (1 + e^eps)``, capped at 1.

    Raises
    ------
    ValueError
        Unless ``0 <= v <= r <= m``, ``epsilon >= 0`` and ``0 <= delta <= 1``.
    """
    _check_counts(m, r, v)
    if not epsilon >= 0:
        raise ValueError(f"epsilon must be >= 0, got {epsilon}")
    if not 0 <= delta <= 1:
        raise ValueError(f"delta must be in [0, 1], got {delta}")
    q = 1.0 / (1.0 + math.exp(-epsilon))  # accuracy of epsilon-DP randomized response
    tail = float(binom.sf(v - 1, r, q))  # P[Binomial(r, q) >= v]
    if delta == 0 or v == 0:
        return min(tail, 1.0)
    i = np.arange(1, v + 1)
    # P[v - i <= Binomial < v] = P[Binomial >= v - i] - P[Binomial >= v], for i = 1..v.
    below = binom.sf(v - i - 1, r, q) - tail
    alpha = float(np.max(below / i))
    return min(tail + alpha * delta * 2 * m, 1.0)


def epsilon_lower_bound(m: int, r: int, v: int, *, confidence: float = 0.95, delta: float = 0.0) -> float:
    """The largest epsilon that ``v`` right guesses out of ``r`` refute at ``confidence``.

    Returns the supremum of the epsilons whose p-value (:func:`p_value`) is below
    ``1 - confidence``, or 0.0 when not even ``epsilon = 0`` is refuted.

    Raises
    ------
    ValueError
        On counts as in :func:`p_value` or a confidence outside (0, 1).
    """
    _check_counts(m, r, v)
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    significance = 1.0 - confidence
    if p_value(m, r, v, 0.0, delta) >= significance:
        return 0.0
    # The p-value grows with epsilon; keep p(lo) < significance <= p(hi) and bisect.
    lo, hi = 0.0, 1.0
    while p_value(m, r, v, hi, delta) < significance:
        # Terminates: q -> 1 as epsilon grows, and then P[Binomial(r, q) >= v] -> 1.
        lo, hi = hi, 2 * hi
    while hi - lo > _TOLERANCE:
        mid = (lo + hi) / 2
        if p_value(m, r, v, mid, delta) < significance:
            lo = mid
        else:
            hi = mid
    return lo


def guesses_from_scores(scores: Sequence[float] | np.ndarray, k_plus: int, k_minus: int) -> np.ndarray:
    """Guess IN for the ``k_plus`` highest scores, OUT for the ``k_minus`` lowest, abstain on the rest.

    A score is larger the more a canary looks trained on (e.g. how much its loss fell).
    Ties keep canary order, so the guesses depend on the scores alone.

    Returns
    -------
    numpy.ndarray
        ``[m]`` int8: +1 guessed IN, -1 guessed OUT, 0 abstained.

    Raises
    ------
    ValueError
        If ``k_plus`` or ``k_minus`` is negative, their sum exceeds ``m``, or a score is not finite.
    """
    values = np.asarray(scores, dtype=np.float64)
    if values.ndim != 1 or not np.isfinite(values).all():
        raise ValueError("scores must be a 1-D sequence of finite numbers")
    if k_plus < 0 or k_minus < 0 or k_plus + k_minus > len(values):
        raise ValueError(
            f"need k_plus, k_minus >= 0 and k_plus + k_minus <= m={len(values)}, got {k_plus} and {k_minus}"
        )
    order = np.argsort(-values, kind="stable")  # highest first; ties in canary order
    guesses = np.zeros(len(values), dtype=np.int8)
    guesses[order[:k_plus]] = 1
    if k_minus:
        guesses[order[len(values) - k_minus :]] = -1
    return guesses


def count_guesses(guesses: np.ndarray, included: Sequence[bool] | np.ndarray) -> tuple[int, int]:
    """``(r, v)``: guesses made and right guesses, against the auditor's coins ``included``."""
    guesses = np.asarray(guesses)
    truth = np.where(np.asarray(included, dtype=bool), 1, -1)
    if guesses.shape != truth.shape:
        raise ValueError(f"{guesses.shape[0]} guesses for {truth.shape[0]} canaries")
    made = guesses != 0
    return int(made.sum()), int((guesses[made] == truth[made]).sum())


def audit_scores(
    scores: Sequence[float] | np.ndarray,
    included: Sequence[bool] | np.ndarray,
    choices: Sequence[tuple[int, int]],
    *,
    confidence: float = 0.95,
    delta: float = 0.0,
) -> AuditBound:
    """The best bound over several ``(k_plus, k_minus)`` choices, valid at ``confidence``.

    Picking the best of ``T`` choices after seeing the guesses is a multiple test, so
    each choice is judged at significance ``(1 - confidence) / T`` (Bonferroni): the
    maximum then holds at ``confidence``. With one choice this is the paper's audit as is.

    Raises
    ------
    ValueError
        On an empty ``choices`` or as :func:`guesses_from_scores` and :func:`epsilon_lower_bound`.
    """
    if not choices:
        raise ValueError("choices must name at least one (k_plus, k_minus)")
    m = len(np.asarray(scores))
    per_choice = 1.0 - (1.0 - confidence) / len(choices)
    bounds = []
    for k_plus, k_minus in choices:
        r, v = count_guesses(guesses_from_scores(scores, k_plus, k_minus), included)
        epsilon = epsilon_lower_bound(m, r, v, confidence=per_choice, delta=delta)
        bounds.append(
            AuditBound(
                m=m, r=r, v=v, k_plus=k_plus, k_minus=k_minus, confidence=confidence, delta=delta, epsilon=epsilon
            )
        )
    return max(bounds, key=lambda b: b.epsilon)  # the first of equals: choices order breaks ties


def _check_counts(m: int, r: int, v: int) -> None:
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= v <= r <= m, got m={m}, r={r}, v={v}")
