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
    conversion (Balle et al. 2020) saves a site of its budget.

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

import numpy as np
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.analysis.rdp import compute_rdp

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
