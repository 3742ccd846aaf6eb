"""Privacy accounting: the project's epsilon against opacus' accountants and the literature.

On Abadi et al. 2016's example (q=0.01, sigma=4, 10,000 steps, delta=1e-5; published
epsilon ~1.26 with the moments accountant):

(a) ``fedretrain.privacy.accounting.epsilon_for_history`` with ``rdp`` (what a site's
    ledger reports by default) against opacus' ``RDPAccountant`` called directly:
    the project must add nothing (ratio 1.0);
(b) the same with ``prv`` against opacus' ``PRVAccountant``;
(c) the classic moments-accountant conversion (eps = min_a RDP(a) + log(1/delta)/(a-1),
    research/performance.md §5) against the published 1.26: it reproduces the paper;
(d) the project's RDP figure against that classic figure: how much the tighter
    conversion (Balle et al. 2020) saves a site of its budget;
(e) the time a site takes to fit a round's sigma to its remaining budget
    (``sigma_to_fit``, ~30 epsilons of its ledger plus the round) against the same
    bisection on opacus' ``RDPAccountant`` called directly: the project keeps each
    mechanism's per-step RDP curve, so the ratio is well below 1 and the sigma is the same.

Run from the repository root (not with ``-m``: opacus installs a ``benchmarks`` package)::

    python benchmarks/bench_accounting.py [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import math
import time

import numpy as np
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.analysis.rdp import compute_rdp

from fedretrain.privacy import accounting
from fedretrain.privacy.accounting import epsilon_for_history

ABADI = (4.0, 0.01, 10_000)  # (sigma, q, steps), as in an opacus history entry
ABADI_DELTA, ABADI_PUBLISHED = 1e-5, 1.26
# TF-Privacy's order grid, the one the published figures were computed on.
CLASSIC_ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))


def classic_epsilon(sigma: float, q: float, steps: int, delta: float) -> float:
    """Abadi/Mironov conversion used by TF-Privacy 2018-2020: min_a rdp(a) + log(1/delta)/(a-1)."""
    rdp = compute_rdp(q=q, noise_multiplier=sigma, steps=steps, orders=CLASSIC_ORDERS)
    return float(np.min(rdp + np.log(1 / delta) / (np.array(CLASSIC_ORDERS) - 1)))


def opacus_epsilon(cls: type, sigma: float, q: float, steps: int, delta: float) -> float:
    """Opacus' accountant ``cls`` on one history entry, called directly."""
    accountant = cls()
    accountant.history = [(sigma, q, steps)]
    return float(accountant.get_epsilon(delta=delta))


# A site's ledger after three cycles: training rounds at two rates and the charged evaluations.
LEDGER = ((1.1, 0.125, 12), (1.3, 0.125, 12), (0.9, 0.1, 24), (8.0, 1.0, 1), (9.5, 1.0, 1))
ROUND, CEILING = (0.125, 24), 16.0


def _bisect(epsilon: object) -> float:
    # sigma_to_fit's own bisection, on the epsilon function given.
    def fits(sigma: float) -> bool:
        return epsilon([*LEDGER, (sigma, *ROUND)]) <= CEILING  # type: ignore[operator]

    low, high = 0.1, 1e4
    while high / low > 1 + 1e-3:
        mid = math.sqrt(low * high)
        low, high = (low, mid) if fits(mid) else (mid, high)
    return high


def fit_times() -> tuple[float, float, float, float]:
    """(ours_s, opacus_s, our sigma, opacus' sigma) for one round's sigma fit, from a cold cache."""

    def direct(history: list) -> float:
        accountant = RDPAccountant()
        accountant.history = history
        return float(accountant.get_epsilon(delta=ABADI_DELTA))

    accounting._rdp_per_step.cache_clear()
    accounting.sigma_to_fit.cache_clear()
    with warnings.catch_warnings():
        # The bisection probes sigmas far from the answer, where the best order is at an end.
        warnings.filterwarnings("ignore", message="Optimal order is the")
        start = time.perf_counter()
        theirs = _bisect(direct)
        opacus_s = time.perf_counter() - start
        start = time.perf_counter()
        ours = accounting.sigma_to_fit(LEDGER, *ROUND, CEILING, ABADI_DELTA, "rdp")
        ours_s = time.perf_counter() - start
    return ours_s, opacus_s, ours, theirs


def _row(name: str, value: float, peer: float, note: str) -> dict[str, object]:
    return {"name": name, "value": value, "limit_or_peer": peer, "ratio": value / peer, "unit": "epsilon", "note": note}


def measure() -> list[dict[str, object]]:
    """The accounting rows; see the module docstring."""
    sigma, q, steps = ABADI
    delta = ABADI_DELTA
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        ours_rdp = epsilon_for_history([ABADI], delta, "rdp")
        ours_prv = epsilon_for_history([ABADI], delta, "prv")
        rdp = opacus_epsilon(RDPAccountant, sigma, q, steps, delta)
        prv = opacus_epsilon(PRVAccountant, sigma, q, steps, delta)
    classic = classic_epsilon(sigma, q, steps, delta)
    ours_s, opacus_s, ours_sigma, opacus_sigma = fit_times()
    fit = {
        "name": "sigma_fit_s_ours_vs_opacus",
        "value": ours_s,
        "limit_or_peer": opacus_s,
        "ratio": ours_s / opacus_s,
        "unit": "s",
        "note": f"one round's sigma fit to a 5-entry ledger; sigma {ours_sigma:.4f} vs {opacus_sigma:.4f}",
    }
    return [
        _row("eps_ours_rdp_vs_opacus_rdp", ours_rdp, rdp, "Abadi'16 case; must be 1.0"),
        _row("eps_ours_prv_vs_opacus_prv", ours_prv, prv, "Abadi'16 case; must be 1.0"),
        _row(
            "eps_classic_vs_published",
            classic,
            ABADI_PUBLISHED,
            "moments-accountant conversion vs Abadi et al. 2016's 1.26 (2 digits published)",
        ),
        _row("eps_ours_rdp_vs_classic", ours_rdp, classic, "tighter RDP conversion: below 1 saves budget"),
        _row("eps_ours_prv_vs_classic", ours_prv, classic, "PRV accountant (site_accountant=prv)"),
        fit,
    ]


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, measure, print, optionally write JSON rows."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write result rows here")
    args = parser.parse_args(argv)
    rows = measure()
    for row in rows:
        print(f"{row['name']:30s}{row['value']:8.4f}  vs {row['limit_or_peer']:8.4f}  ratio {row['ratio']:.4f}")
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
