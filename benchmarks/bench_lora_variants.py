"""FFA-LoRA and mixed ranks against standard LoRA at the same epsilon, on the demo's federation.

Each pair is three ``fedretrain simulate experiment=demo`` runs, taking turns: standard
LoRA (rank 8 at every site); ``lora.freeze_a=true`` (FFA-LoRA, Sun et al. 2024: lora_A
stays at its seeded initialisation, only lora_B trains); and mixed ranks
(``simulation.site_lora_ranks=[8,4,2]``: the three sites train ranks 8, 4 and 2 of the
rank-8 adapter, fedretrain/lora_ranks.py). All target the same epsilon, so each site's
sigma and spend are the same; the figure is the validation loss the candidate reaches
(lower is better) against standard LoRA's, and the improvement over the base model of
each. The sites' DP noise is their own, so a pair is one draw: ``--pairs`` repeats it.

Run from the repository root::

    python benchmarks/bench_lora_variants.py [--pairs N] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VARIANTS = {
    "lora": [],
    "ffa": ["lora.freeze_a=true"],
    "mixed": ["simulation.site_lora_ranks=[8,4,2]"],
    # What the sites could do without mixed ranks: all train the smallest site's rank (same scale alpha / r).
    "rank2": ["lora.r=2", "lora.alpha=4"],
}
ROW_NAMES = (
    "ffa_lora_candidate_loss_vs_lora",
    "ffa_lora_improvement_vs_lora",
    "ffa_lora_epsilon_vs_lora",
    "mixed_rank_candidate_loss_vs_lora",
    "mixed_rank_improvement_vs_lora",
    "mixed_rank_epsilon_vs_lora",
    "mixed_rank_improvement_vs_rank2",
)


def run(variant: str, out: Path) -> dict:
    """One demo cycle; its summary."""
    args = ["experiment=demo", *VARIANTS[variant], f"output_dir={out}"]
    proc = subprocess.run(
        [sys.executable, "-m", "cli.main", "simulate", *args], cwd=REPO, capture_output=True, text=True, timeout=3600
    )
    if proc.returncode not in (0, 4):
        print((proc.stdout + proc.stderr)[-3000:], file=sys.stderr)
        raise RuntimeError(f"{variant}: exit status {proc.returncode}")
    (path,) = out.glob("*/summary.json")
    summary = json.loads(path.read_text())
    eps = max(site["epsilon"] for site in summary["sites"].values())
    print(
        f"{variant:<5} validation {summary['baseline_loss']:.4f} -> {summary['candidate_loss']:.4f}, "
        f"max site epsilon {eps:.3f}, gate {summary['gate']['decision']}",
        flush=True,
    )
    return {
        "variant": variant,
        "baseline": summary["baseline_loss"],
        "candidate": summary["candidate_loss"],
        "eps": eps,
    }


def rows_from(runs: list[dict]) -> list[dict]:
    """Median candidate loss, improvement and epsilon of each variant against standard LoRA's.

    Rows only for the variants that ran (``--variants``)."""
    ran = {r["variant"] for r in runs}

    def median(variant: str, key: str) -> float:
        return statistics.median(r[key] for r in runs if r["variant"] == variant)

    def gain(variant: str) -> float:
        return statistics.median(r["baseline"] - r["candidate"] for r in runs if r["variant"] == variant)

    def against(prefix: str, variant: str, peer: str, what: str) -> list[dict]:
        if not {variant, peer} <= ran:
            return []
        draws = sum(1 for r in runs if r["variant"] == variant)
        return [
            {
                "name": f"{prefix}_candidate_loss_vs_{peer}",
                "value": median(variant, "candidate"),
                "limit_or_peer": median(peer, "candidate"),
                "note": f"{what}, same target epsilon; median of {draws} draw(s)",
            },
            {
                "name": f"{prefix}_improvement_vs_{peer}",
                "value": gain(variant),
                "limit_or_peer": gain(peer),
                "note": "validation loss gained over the base model",
            },
            {
                "name": f"{prefix}_epsilon_vs_{peer}",
                "value": median(variant, "eps"),
                "limit_or_peer": median(peer, "eps"),
                "note": "largest site epsilon of the cycle: must be the same",
            },
        ]

    rows = against("ffa_lora", "ffa", "lora", "demo federation, FFA-LoRA vs LoRA")
    rows += against("mixed_rank", "mixed", "lora", "sites of ranks 8, 4, 2 vs 8 everywhere")
    if {"mixed", "rank2"} <= ran:
        rows.append(
            {
                "name": "mixed_rank_improvement_vs_rank2",
                "value": gain("mixed"),
                "limit_or_peer": gain("rank2"),
                "note": "gain of ranks 8, 4, 2 vs rank 2 at every site (the smallest site's rank for all)",
            }
        )
    return rows


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, run the pairs, print, optionally write JSON rows."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=1)
    parser.add_argument(
        "--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ",".join(VARIANTS)
    )
    parser.add_argument("--json", type=Path, help="write result rows here")
    args = parser.parse_args(argv)
    runs = []
    with tempfile.TemporaryDirectory(prefix="bench-lora-") as tmp:
        names = args.variants.split(",")
        unknown = sorted(set(names) - set(VARIANTS))
        if unknown:
            raise SystemExit(f"--variants: unknown {unknown}; choose from {', '.join(VARIANTS)}")
        for pair in range(args.pairs):
            order = names[pair % len(names) :] + names[: pair % len(names)]  # each goes first in turn
            for variant in order:
                runs.append(run(variant, Path(tmp) / f"{pair}-{variant}"))
    rows = rows_from(runs)
    for row in rows:
        print(row)
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
