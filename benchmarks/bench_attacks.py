"""Robust aggregation against attackers: each defence's improvement at 0 %, 10 % and 30 % attackers.

Every cell is one real ``fedretrain simulate`` (Flower's simulation engine, DP at every site)
on the same 10-site federation (``experiment=smoke`` sites, shrunk: 80 notes a site, 6
local steps of notes cut to 64 tokens, 2 rounds), with ``simulation.attackers`` marking
1 or 3 sites (chosen by the seed) as sign-flipping (``G - (U - G)``) or scaling
(``G + 10 (U - G)``) attackers. A cell's figure is the candidate's improvement on the
coordinator's validation set (baseline loss - candidate loss), against the same defence's
improvement without attackers: the ratio is how much of the clean gain survives (the
goal: >= 0.9 at 30 % for a robust defence). The gate's decision is in the note; a
candidate that got worse must never be published. Two backdoor cells (30 % of the sites
write a phrase into every training note) give the phrase's loss under the candidate against
its loss under the same defence's clean candidate (lower: likelier; fine-tuning on notes
alone lowers it too, hence the clean reference).

Defences (the update norm bound, strategies/update_bound.py, is off unless named):
``fedavg`` plain, ``fedavg+bound`` (3 x the median, the default), ``fedmedian``,
``fedtrimmedavg`` (beta 0.3), ``krum`` (f = 3), ``multikrum`` (f = 3, 5 selected).

About 45 s a cell on 2 cores; 32 cells. Run from the repository root::

    python benchmarks/bench_attacks.py [--defences fedavg,fedmedian] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

FEDERATION = [
    "experiment=smoke",
    "simulation.num_sites=10",
    "data.records_per_site=80",
    "train.local_steps=6",
    "model.max_length=64",
    "rounds=2",
    # A site holds 16 held-out notes: too few to confirm a gain; the gate rests on the
    # validation set and each site's own check.
    "gate.require_federated_confidence=false",
]
DEFENCES: dict[str, list[str]] = {
    "fedavg": ["strategy=fedavg", "strategy.max_update_norm_ratio=null"],
    "fedavg+bound": ["strategy=fedavg"],
    "fedmedian": ["strategy=fedmedian", "strategy.max_update_norm_ratio=null"],
    "fedtrimmedavg": ["strategy=fedtrimmedavg", "strategy.options.beta=0.3", "strategy.max_update_norm_ratio=null"],
    "krum": ["strategy=krum", "strategy.options.num_malicious_nodes=3", "strategy.max_update_norm_ratio=null"],
    "multikrum": [
        "strategy=multikrum",
        "strategy.options.num_malicious_nodes=3",
        "strategy.options.num_nodes_to_select=5",
        "strategy.max_update_norm_ratio=null",
    ],
}
ATTACKS = [("sign_flip", 0.1), ("sign_flip", 0.3), ("scale", 0.1), ("scale", 0.3)]
BACKDOOR_DEFENCES = ("fedavg+bound", "fedmedian")


def run_cell(defence: str, behaviour: str | None, share: float, out: Path) -> dict:
    """One simulation; its summary's figures (and attack.json's) as a dict."""
    attack = (
        []
        if behaviour is None
        else [f"simulation.attackers.share={share}", f"simulation.attackers.behaviour={behaviour}"]
    )
    args = [*FEDERATION, *DEFENCES[defence], *attack, f"output_dir={out}"]
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "cli.main", "simulate", *args], cwd=REPO, capture_output=True, text=True, timeout=1800
    )
    wall = time.perf_counter() - started
    if proc.returncode not in (0, 4):  # published, or the gate refused: both are results here
        print((proc.stdout + proc.stderr)[-3000:], file=sys.stderr)
        raise RuntimeError(f"{defence} {behaviour} {share}: exit status {proc.returncode}")
    (summary_path,) = out.glob("*/summary.json")
    summary = json.loads(summary_path.read_text())
    cell = {
        "defence": defence,
        "behaviour": behaviour or "none",
        "share": share,
        "baseline_loss": summary["baseline_loss"],
        "candidate_loss": summary["candidate_loss"],
        "improvement": summary["baseline_loss"] - summary["candidate_loss"],
        "decision": summary["gate"]["decision"],
        "wall_s": round(wall, 1),
    }
    report = summary_path.parent / "attack.json"
    if report.exists():
        cell["attack"] = json.loads(report.read_text())
    elif behaviour is None and defence in BACKDOOR_DEFENCES:
        # The reference for a backdoor cell: how likely its phrase became without any attacker.
        cell["phrase_loss_clean"] = round(_phrase_loss(defence, summary_path.parent), 4)
    print(
        f"{defence:<14}{cell['behaviour']:<10}{share:>5.0%}  improvement {cell['improvement']:+.4f}  "
        f"{cell['decision']:<17}{wall:.0f} s",
        flush=True,
    )
    return cell


def _phrase_loss(defence: str, run_dir: Path) -> float:
    """The backdoor phrase's loss under a clean run's candidate, scored as attack.json scores it."""
    sys.path.insert(0, str(REPO))
    from fedretrain.config import compose_config
    from fedretrain.data.notes import read_records
    from simulation.attacks import phrase_loss
    from simulation.session import PHRASE_PROMPTS

    cfg = compose_config([*FEDERATION, *DEFENCES[defence]])
    prompts = [r.text for r in read_records(run_dir / "sites" / "coordinator" / "validation.jsonl")][:PHRASE_PROMPTS]
    return phrase_loss(cfg, run_dir / "candidate_adapter", prompts)


def rows_from(cells: list[dict]) -> list[dict]:
    """The suite's rows: per attacked cell, its improvement against the same defence's clean one."""
    clean = {c["defence"]: c["improvement"] for c in cells if c["behaviour"] == "none"}
    rows = []
    for c in cells:
        if c["behaviour"] == "backdoor":
            a = c.get("attack", {})
            reference = next(
                (x["phrase_loss_clean"] for x in cells if x["defence"] == c["defence"] and "phrase_loss_clean" in x),
                None,
            )
            if "phrase_loss_candidate" in a:
                rows.append(
                    {
                        "name": f"attack_backdoor_phrase_loss_{c['defence']}",
                        "value": a["phrase_loss_candidate"],
                        "limit_or_peer": reference,
                        "note": f"30% backdoor sites; phrase loss vs the clean run's candidate "
                        f"(base model {a['phrase_loss_base']}); gate {c['decision']}",
                    }
                )
            continue
        if c["behaviour"] == "none":
            continue
        worse = c["candidate_loss"] > c["baseline_loss"]
        rows.append(
            {
                "name": f"attack_{c['behaviour']}_{round(c['share'] * 100)}pct_{c['defence']}",
                "value": c["improvement"],
                "limit_or_peer": clean.get(c["defence"]),
                "note": f"gate {c['decision']}" + ("; WORSE THAN BASELINE" if worse else ""),
            }
        )
    rows.append(
        {
            "name": "attack_worse_candidates_published",
            "value": float(
                sum(1 for c in cells if c["candidate_loss"] > c["baseline_loss"] and c["decision"] == "publish")
            ),
            "limit_or_peer": None,
            "note": "candidates worse than the baseline that the gate published (must be 0)",
        }
    )
    return rows


def row_names(defences: list[str] | None = None, backdoor: bool = True) -> tuple[str, ...]:
    """The names of the rows a full run writes (the suite lists them, null, when it skips this section)."""
    defences = list(DEFENCES) if defences is None else defences
    names = [f"attack_{b}_{round(s * 100)}pct_{d}" for d in defences for b, s in ATTACKS]
    if backdoor:
        names += [f"attack_backdoor_phrase_loss_{d}" for d in BACKDOOR_DEFENCES if d in defences]
    return (*names, "attack_worse_candidates_published")


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, run every cell, print, optionally write JSON rows (and the cells beside them)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--defences", default=",".join(DEFENCES), help="comma-separated subset of the defences")
    parser.add_argument("--no-backdoor", action="store_true", help="skip the two backdoor cells")
    parser.add_argument(
        "--backdoor-only", action="store_true", help="only the backdoor cells and their defences' clean runs"
    )
    parser.add_argument("--json", type=Path, help="write result rows here (cells to <name>.cells.json)")
    args = parser.parse_args(argv)
    defences = [d for d in args.defences.split(",") if d]
    unknown = sorted(set(defences) - set(DEFENCES))
    if unknown:
        parser.error(f"unknown defences {unknown}; choose from {', '.join(DEFENCES)}")
    cells = []
    with tempfile.TemporaryDirectory(prefix="bench-attacks-") as tmp:
        plan = [(d, None, 0.0) for d in defences] + [(d, b, s) for d in defences for b, s in ATTACKS]
        if args.backdoor_only:
            plan = [(d, None, 0.0) for d in defences if d in BACKDOOR_DEFENCES]
        if not args.no_backdoor:
            plan += [(d, "backdoor", 0.3) for d in BACKDOOR_DEFENCES if d in defences]
        for index, (defence, behaviour, share) in enumerate(plan):
            cells.append(run_cell(defence, behaviour, share, Path(tmp) / str(index)))
    rows = rows_from(cells)
    for row in rows:
        print(row)
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
        args.json.with_suffix(".cells.json").write_text(json.dumps(cells, indent=2) + "\n")


if __name__ == "__main__":
    main()
