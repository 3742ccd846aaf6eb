"""Privacy accounting: pure functions over a DP-SGD history, opacus underneath.

A history is what opacus keeps in ``accountant.history``: a list of
``(noise_multiplier, sample_rate, steps)`` entries, each one a run of ``steps``
Poisson-subsampled Gaussian steps. The functions here never keep state; the
site's ledger (``fedretrain.privacy.ledger``) owns the lifetime history and asks
this module for the epsilon of all of it at once.

The accountants offered are those of ``fedretrain.privacy.accountants``.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Sequence
from typing import Any

from opacus.accountants.utils import get_noise_multiplier

from fedretrain.privacy.accountants import accountant_class

# One entry of a history: (noise_multiplier, sample_rate, steps), as in opacus.
HistoryEntry = tuple[float, float, int]


def epsilon_for_history(history: Sequence[HistoryEntry], delta: float, accountant: str = "rdp") -> float:
    """Epsilon of the whole composed ``history`` at ``delta``.

    Parameters
    ----------
    history
        ``(noise_multiplier, sample_rate, steps)`` entries, exactly as opacus'
        ``accountant.history``. Order does not matter (composition commutes).
    delta
        Target delta, in (0, 1).
    accountant
        A name from ``fedretrain.privacy.accountants.ACCOUNTANTS``.

    Returns
    -------
    float
        Epsilon of the composition; 0.0 for an empty history, ``inf`` when an
        entry has ``noise_multiplier == 0`` with steps > 0 (no noise, no bound).
    """
    cls = accountant_class(accountant)
    _check_delta(delta)
    merged = _merge_history(history)
    if not merged:
        return 0.0
    if any(sigma <= 0 for sigma, _, _ in merged):
        # Steps without noise have no finite bound (PRV would crash on them).
        return math.inf
    if cls.mechanism() == "rdp":
        return _rdp_epsilon(tuple(merged), delta)
    acc = cls()
    acc.history = merged
    with warnings.catch_warnings():
        # PRV takes log(1 - q), -inf for a Gaussian release (q = 1); numpy warns, the result is right.
        warnings.filterwarnings("ignore", message="divide by zero encountered in log")
        # Many cheap releases put RDP's best order at the largest alpha: the bound is still an
        # upper bound, only not the tightest; opacus would warn at every status poll.
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        return float(acc.get_epsilon(delta=delta))


def _rdp_epsilon(merged: tuple[HistoryEntry, ...], delta: float) -> float:
    # opacus' RDPAccountant.get_privacy_spent, step for step, with each mechanism's
    # per-step RDP curve computed once per process: compute_rdp(steps=n) is the steps=1
    # curve times n, so the sum, and the epsilon, are the same floats. Why: a site's
    # ledger holds the same few (sigma, q) mechanisms at every call, and sigma_to_fit
    # asks about 30 times per round; opacus recomputes every curve each time (one round's
    # fit to a 5-entry ledger: 5.6 s -> 1.8 s on 2 cores, the same sigma; row
    # sigma_fit_s_ours_vs_opacus of benchmarks/bench_accounting.py).
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis import rdp as analysis

    curve = sum([_rdp_per_step(sigma, q) * steps for sigma, q, steps in merged])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        eps, _ = analysis.get_privacy_spent(orders=RDPAccountant.DEFAULT_ALPHAS, rdp=curve, delta=delta)
    return float(eps)


@functools.lru_cache(maxsize=1024)
def _rdp_per_step(sigma: float, q: float) -> Any:
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis import rdp as analysis

    curve = analysis.compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=RDPAccountant.DEFAULT_ALPHAS)
    curve.setflags(write=False)  # shared by every later call
    return curve


# A pure function of its arguments, and opacus' binary search takes about a second: a site
# asks it again with the same inputs in every round of a run and in every status poll.
@functools.lru_cache(maxsize=128)
def noise_multiplier_for_target(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str = "rdp",
) -> float:
    """Smallest noise multiplier (to opacus' search tolerance) that keeps ``steps``
    steps at ``sample_rate`` within ``target_epsilon`` at ``delta``.

    Uses :func:`opacus.accountants.utils.get_noise_multiplier`, whose binary
    search returns a sigma whose epsilon is at most ``target_epsilon`` and within
    0.01 of it.

    Raises
    ------
    ValueError
        On an unknown accountant, a non-positive target, a delta outside (0, 1),
        a sample rate outside (0, 1], non-positive steps, or a target so small
        that opacus gives up (sigma > 1e6).
    """
    accountant_class(accountant)
    _check_delta(delta)
    if not target_epsilon > 0:
        raise ValueError(f"target_epsilon must be > 0, got {target_epsilon}")
    if not 0 < sample_rate <= 1:
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    with warnings.catch_warnings():
        # The binary search probes very large sigmas, where RDP's optimal order is the
        # largest alpha and opacus warns; those probes never decide the returned sigma.
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        sigma = get_noise_multiplier(
            target_epsilon=target_epsilon,
            target_delta=delta,
            sample_rate=sample_rate,
            steps=steps,
            accountant=accountant,
        )
    return float(sigma)


def _merge_history(history: Sequence[HistoryEntry]) -> list[HistoryEntry]:
    # Entries with the same (sigma, q) compose into one entry with summed steps,
    # as opacus' own accountant.step() does. The epsilon is the same; PRV's cost
    # grows with the number of distinct entries, and a ledger has one per round.
    steps_by_mechanism: dict[tuple[float, float], int] = {}
    for sigma, q, steps in history:
        if steps < 0:
            raise ValueError(f"history entry {(sigma, q, steps)} has negative steps")
        if steps == 0:
            continue
        key = (float(sigma), float(q))
        steps_by_mechanism[key] = steps_by_mechanism.get(key, 0) + int(steps)
    return [(sigma, q, steps) for (sigma, q), steps in steps_by_mechanism.items()]


def _check_delta(delta: float) -> None:
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")


# The widest sigma a fit may choose: above it a round's epsilon is ~0 at any rate and steps.
_MAX_FIT_SIGMA = 1e4


@functools.lru_cache(maxsize=64)
def sigma_to_fit(
    history: tuple[HistoryEntry, ...],
    sample_rate: float,
    steps: int,
    ceiling: float,
    delta: float,
    accountant: str = "rdp",
    rel_tol: float = 1e-3,
) -> float:
    """Smallest sigma (to ``rel_tol``) such that ``history`` plus ``steps`` DP-SGD steps at
    ``sample_rate`` stays within ``ceiling`` at ``delta``.

    ``history`` is what the site already released plus anything else planned with the
    steps (evaluations). Returns :data:`_MAX_FIT_SIGMA` when nothing fits (the history
    alone is at or over the ceiling): the caller's budget check then refuses the round.
    Bisection on the exact accountant, so the result is an upper bound like every
    epsilon here, never an approximation of one.
    """

    def fits(sigma: float) -> bool:
        return epsilon_for_history([*history, (sigma, sample_rate, steps)], delta, accountant) <= ceiling

    low, high = 0.1, _MAX_FIT_SIGMA
    if fits(low):
        return low
    if not fits(high):
        return high
    while high / low > 1 + rel_tol:
        mid = math.sqrt(low * high)  # sigma spans decades: bisect its logarithm
        low, high = (low, mid) if fits(mid) else (mid, high)
    return high
