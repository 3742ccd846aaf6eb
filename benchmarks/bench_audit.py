"""Empirical privacy audit in one run: the epsilon a site's ledger reports against a lower bound.

Steinke, Nasr and Jagielski (2023), through the site's real code path (simulation/audit.py):
m random canaries, each planted in one simulated site's data with probability 1/2, one
cycle of training, each canary scored by how much its loss fell, guesses turned into a
lower bound on epsilon at 95% confidence and the site's delta.

(a) with DP on, the lower bound against the ledger's epsilon: must be <= 1 (else the
    ledger, or the DP-SGD behind it, is wrong);
(b) with DP off (the site allows it), the lower bound against the best bound m canaries
    can give (every guess right): how much of the leak the audit can see.

Run from the repository root (not with ``-m``: opacus installs a ``benchmarks`` package)::

    python benchmarks/bench_audit.py [--quick] [--canaries M] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedretrain.privacy.audit import epsilon_lower_bound
from simulation.audit import AuditResult, AuditSettings, run_audit

# (k_plus, k_minus) as fractions of m; the best is kept, Bonferroni-corrected.
GUESS_FRACTIONS = ((0.1, 0.1), (0.25, 0.25), (0.5, 0.5))


def settings(canaries: int, private: bool) -> AuditSettings:
    """The audit of ``canaries`` canaries, steps scaled so each is seen as often at any m.

    About 20 passes over the site's data in a two-round cycle (batch 8, 16 honest notes
    plus m/2 canaries): enough for plain training to memorise the canaries.
    """
    steps = max(30, round(60 * canaries / 64))
    return AuditSettings(
        canaries=canaries,
        rounds=2,
        private=private,
        honest_records=16,
        overrides=(f"train.local_steps={steps}", "train.batch_size=8", "train.lr=0.01"),
        guess_fractions=GUESS_FRACTIONS,
    )


def attainable(result: AuditResult) -> float:
    """The best bound this audit could give: every guess right, at the best guess size."""
    s, choices = result.settings, result.settings.choices()
    per_choice = 1 - (1 - s.confidence) / len(choices)  # as audit_scores judges each choice
    return max(
        epsilon_lower_bound(s.canaries, k_plus + k_minus, k_plus + k_minus, confidence=per_choice, delta=s.delta)
        for k_plus, k_minus in choices
    )


def rows(private: AuditResult, plain: AuditResult) -> list[dict[str, object]]:
    """The suite's rows; see the module docstring."""
    p, n = private.bound, plain.bound
    return [
        {
            "name": "eps_audit_lower_dp_vs_ledger",
            "value": p.epsilon,
            "limit_or_peer": private.ledger_epsilon,
            "ratio": p.epsilon / private.ledger_epsilon if private.ledger_epsilon else None,
            "unit": "epsilon",
            "target": 1.0,
            "better": "lower",
            "note": f"one-run audit, DP on: m={p.m}, r={p.r}, v={p.v}, {p.confidence:.0%} confidence, "
            f"delta={p.delta:g}; must be <= the ledger's epsilon",
        },
        {
            "name": "eps_audit_lower_nodp_vs_attainable",
            "value": n.epsilon,
            "limit_or_peer": attainable(plain),
            "ratio": n.epsilon / attainable(plain),
            "unit": "epsilon",
            "target": 0.25,
            "better": "higher",
            "note": f"one-run audit, DP off: m={n.m}, r={n.r}, v={n.v}; vs every guess right (the leak shows)",
        },
    ]


def print_table(results: list[AuditResult]) -> None:
    print(
        f"{'DP':<5}{'m':>6}{'r':>6}{'v':>6}{'eps lower':>11}{'confidence':>12}{'delta':>9}{'ledger eps':>12}"
        f"{'wall s':>8}"
    )
    for res in results:
        b, ledger = res.bound, res.ledger_epsilon
        print(
            f"{'on' if res.settings.private else 'off':<5}{b.m:>6}{b.r:>6}{b.v:>6}{b.epsilon:>11.3f}"
            f"{b.confidence:>12.0%}{b.delta:>9.0e}{'-' if ledger is None else f'{ledger:.3f}':>12}"
            f"{res.wall_s:>8.0f}"
        )


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, run both audits, print the table, optionally write JSON rows."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--canaries", type=int, default=256, help="canaries m (default 256)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 64 canaries")
    parser.add_argument("--json", type=Path, help="write result rows here")
    args = parser.parse_args(argv)
    m = 64 if args.quick else args.canaries
    results = [run_audit(settings(m, private=True)), run_audit(settings(m, private=False))]
    print_table(results)
    if args.json is not None:
        args.json.write_text(json.dumps(rows(*results), indent=2) + "\n")


if __name__ == "__main__":
    main()
