"""Learning more from less, measured: selection, curriculum, replay and the distilled student.

Each variant is one ``fedretrain simulate experiment=drift`` run on the same federation, the
same target epsilon and the same optimizer steps a round (``scenario.steps=4``: version 1 at
step 0, the drift at step 3 and its cycle, one more step). What changes is which records the
sites train on (``train.selection``, ``train.curriculum_*``, ``train.replay``) or, for
``distill``, that a student is distilled from each published version.

For each run the drift cycle's candidate adapter (published or not: the method is measured, not
the gate) is scored on

* **fresh data**: step 4's probe, records from the drifted federation none of the sites had;
* **the pre-drift distribution**: step 2's probe, to measure **forgetting** as its loss under the
  drift cycle's candidate minus its loss under the first cycle's.

A variant is compared with its baseline (``all``) record by record on the same probe records
(the same seed draws the same probe): the token-weighted loss difference and its 95% paired
bootstrap interval over the records of every seed run. The interval covers the records' spread,
not the DP noise of the sites' training (one draw per seed): ``--seeds`` repeats the whole
comparison with other draws, and each seed's own difference is listed too.

Run from the repository root::

    python benchmarks/bench_learning.py [--seeds 0,1] [--variants all,uncertainty,...] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fedretrain.arrays import from_torch_state_dict  # noqa: E402
from fedretrain.config import Config, compose_config  # noqa: E402
from fedretrain.data.encoding import encode_texts  # noqa: E402
from fedretrain.data.notes import read_records  # noqa: E402
from fedretrain.modeling.lora_model import load_adapter_arrays, load_lora_model  # noqa: E402
from fedretrain.registry.store import Registry  # noqa: E402
from fedretrain.registry.student import load_student  # noqa: E402
from fedretrain.training.evaluate import LossStats, evaluate_loss  # noqa: E402
from server.cycle.gate import paired_bootstrap  # noqa: E402

COMMON = ["experiment=drift", "scenario.steps=4", "gate.robustness.enabled=false"]
# The selections keep about half of a window: random and newest by their share; uncertainty
# the records at or above 6.3 nats under the installed version (about the drifted ones) plus a
# quarter of the rest.
UNCERTAINTY_THRESHOLD, UNCERTAINTY_SHARE = 6.3, 0.25
VARIANTS: dict[str, list[str]] = {
    "all": [],
    "random": ["train.selection=random", "train.selection_share=0.5"],
    "newest": ["train.selection=newest", "train.selection_share=0.5"],
    "uncertainty": [
        "train.selection=uncertainty",
        f"train.selection_threshold={UNCERTAINTY_THRESHOLD}",
        f"train.selection_share={UNCERTAINTY_SHARE}",
    ],
    "curriculum": ["train.curriculum_start=6.8", "train.curriculum_end=9.0"],
    "replay": ["train.replay=0.5"],
    # Every published version distilled into a student of half the layers (server/cycle/distill.py).
    "distill": ["distill.enabled=true"],
}
# variant -> the baseline it is judged against
BASELINES = {"random": "all", "newest": "all", "uncertainty": "random", "curriculum": "all", "replay": "all"}
FRESH_STEP, PRE_DRIFT_STEP = 4, 2
# The suite's rows (benchmarks/bench_suite.py lists them, null, when this section is skipped).
ROW_NAMES = (
    "learning_student_parameters_vs_teacher",
    *(f"learning_{v}_drift_fresh_vs_{p}" for v, p in BASELINES.items()),
    "learning_replay_forgetting_vs_all",
    "learning_curriculum_forgetting_vs_all",
    "learning_uncertainty_drift_fresh_vs_all",
    "learning_student_drift_fresh_vs_teacher",
)


def simulate(variant: str, seed: int, out: Path) -> Path:
    """One drift run; its run directory (a finished one already in ``out`` is reused: ``--keep``)."""
    done = sorted(out.glob("*/scenario.json"))
    if done:
        return done[-1].parent
    args = [*COMMON, *VARIANTS[variant], f"seed={seed}", f"output_dir={out}"]
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "cli.main", "simulate", *args], cwd=REPO, capture_output=True, text=True, timeout=3600
    )
    (out / "simulate.log").write_text(proc.stdout + proc.stderr)  # the sites' "keeps N of M records" lines
    if proc.returncode not in (0, 4):
        print((proc.stdout + proc.stderr)[-3000:], file=sys.stderr)
        raise RuntimeError(f"{variant} seed {seed}: exit status {proc.returncode}")
    (run_dir,) = out.glob("*/scenario.json")
    print(f"{variant:<12} seed {seed}: {time.perf_counter() - started:.0f} s", flush=True)
    return run_dir.parent


def score(run_dir: Path, cfg: Config) -> dict[str, LossStats | float]:
    """The first and the drift cycle's candidates on the fresh and the pre-drift probes."""
    cycles = sorted((run_dir / "cycles").iterdir())
    # The first cycle and the one the drift started (not another that a trigger started in between).
    scenario = json.loads((run_dir / "scenario.json").read_text())
    started = [s["step"] for s in scenario["timeline"] if s["cycle_started"]]
    if scenario["drift_cycle_step"] not in started or len(cycles) != len(started):
        raise RuntimeError(f"{run_dir}: no drift cycle to score (cycles at steps {started})")
    cycles = [cycles[0], cycles[started.index(scenario["drift_cycle_step"])]]
    lm = load_lora_model(cfg.model, cfg.lora, seed=cfg.seed, device="cpu")
    probes = {
        name: encode_texts(
            lm.tokenizer,
            [r.text for r in read_records(run_dir / "probe" / f"step-{step:02d}.jsonl")],
            cfg.model.max_length,
        )
        for name, step in (("fresh", FRESH_STEP), ("pre_drift", PRE_DRIFT_STEP))
    }
    scores: dict[str, Any] = {}
    for label, cycle in (("first", cycles[0]), ("drift", cycles[1])):
        weights = (cycle / "candidate_adapter" / "adapter_model.safetensors").read_bytes()
        load_adapter_arrays(lm, from_torch_state_dict(_load(weights)))
        for name, dataset in probes.items():
            scores[f"{label}_{name}"] = evaluate_loss(lm.model, dataset, batch_size=cfg.train.eval_batch_size)
    summary = json.loads((cycles[1] / "summary.json").read_text())
    scores["epsilon"] = max(s["epsilon"] for s in summary["sites"].values() if s.get("epsilon") is not None)
    student = summary.get("student")
    if student and student.get("decision") == "passed":
        # The drift cycle's student against its teacher (that cycle's published version) on fresh data.
        registry = Registry(run_dir / "sites" / "coordinator" / "registry")
        model = load_student(registry.student(student["version"]))
        scores["student_fresh"] = evaluate_loss(model, probes["fresh"], batch_size=cfg.train.eval_batch_size)
        scores["student"] = student
    return scores


def uncertainty_pool(run_dir: Path, cfg: Config, threshold: float, share: float) -> dict[str, float]:
    """Each site's expected share of its drift-cycle window that ``selection=uncertainty`` keeps.

    The selection never leaves a site, so it is recomputed here from what the simulation left:
    the window (the newest ``train.window`` records before step 4's arrivals), scored by version 1
    (installed then); kept: every record at or above ``threshold``, and each other one with
    probability ``share``."""
    import numpy as np

    from simulation.drift import ARRIVALS_EPOCH

    lm = load_lora_model(cfg.model, cfg.lora, seed=cfg.seed, device="cpu")
    registry = run_dir / "sites" / "coordinator" / "registry" / "versions" / "000001"
    load_adapter_arrays(lm, from_torch_state_dict(_load((registry / "adapter_model.safetensors").read_bytes())))
    # Timestamps are ISO 8601 UTC ("...Z"), so they order as text.
    cutoff = (ARRIVALS_EPOCH + timedelta(seconds=FRESH_STEP * cfg.scenario.step_s)).strftime("%Y-%m-%dT%H:%M:%SZ")
    shares = {}
    for site in sorted(p.name for p in (run_dir / "sites").glob("site-*")):
        records = sorted(read_records(run_dir / "sites" / site / "train.jsonl"), key=lambda r: r.timestamp or "")
        window = [r for r in records if (r.timestamp or "") < cutoff][-(cfg.train.window or len(records)) :]
        dataset = encode_texts(lm.tokenizer, [r.text for r in window], cfg.model.max_length)
        losses = np.asarray(evaluate_loss(lm.model, dataset, batch_size=cfg.train.eval_batch_size).example_losses)
        above = int((losses >= threshold).sum())
        shares[site] = round((above + share * (len(window) - above)) / len(window), 3)
    return shares


def _load(data: bytes) -> dict[str, torch.Tensor]:
    import safetensors.torch

    return safetensors.torch.load(data)


def _stats(losses: tuple[float, ...], tokens: tuple[int, ...]) -> LossStats:
    """Per-record losses and token counts as LossStats, with their token-weighted mean."""
    total = sum(tokens)
    mean = sum(x * t for x, t in zip(losses, tokens, strict=True)) / total
    return LossStats(mean, total, len(losses), losses, tokens)


def _pooled(stats: list[LossStats]) -> LossStats:
    return _stats(tuple(x for s in stats for x in s.example_losses), tuple(t for s in stats for t in s.example_tokens))


def _forgetting(first: LossStats, drift: LossStats) -> LossStats:
    """Per record: loss under the drift cycle's candidate minus under the first's (pre-drift probe)."""
    diffs = tuple(d - f for d, f in zip(drift.example_losses, first.example_losses, strict=True))
    return _stats(diffs, first.example_tokens)


def compare(runs: dict[tuple[str, int], dict[str, Any]], variant: str, peer: str, key: str) -> dict[str, Any]:
    """``variant`` vs ``peer`` on one measure, records of every seed pooled; lower is better."""
    seeds = sorted(s for v, s in runs if v == variant and (peer, s) in runs)

    def measure(v: str, s: int) -> LossStats:
        r = runs[(v, s)]
        return _forgetting(r["first_pre_drift"], r["drift_pre_drift"]) if key == "forgetting" else r[key]

    ours = _pooled([measure(variant, s) for s in seeds])
    theirs = _pooled([measure(peer, s) for s in seeds])
    # paired_bootstrap(baseline, candidate): the interval of baseline - candidate = peer - variant,
    # with the peer's token weights (the same records, the same tokens).
    low, high = paired_bootstrap(theirs, ours, 0.95, 2000, seed=0)
    return {
        "variant": variant,
        "peer": peer,
        "measure": key,
        "value": ours.loss,
        "peer_value": theirs.loss,
        "gain": theirs.loss - ours.loss,
        "ci_low": low,
        "ci_high": high,
        "per_seed_gain": [round(measure(peer, s).loss - measure(variant, s).loss, 4) for s in seeds],
        "records": ours.examples,
        "epsilon": max(runs[(variant, s)]["epsilon"] for s in seeds),
        "peer_epsilon": max(runs[(peer, s)]["epsilon"] for s in seeds),
    }


def rows_from(runs: dict[tuple[str, int], dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per measure: fresh-data loss for every variant, forgetting for replay."""
    ran = {v for v, _ in runs}
    rows = []
    for variant, peer in BASELINES.items():
        if {variant, peer} <= ran:
            rows.append(compare(runs, variant, peer, "drift_fresh"))
    if {"replay", "all"} <= ran:
        rows.append(compare(runs, "replay", "all", "forgetting"))
    if {"curriculum", "all"} <= ran:
        rows.append(compare(runs, "curriculum", "all", "forgetting"))
    if {"uncertainty", "all"} <= ran:  # half the records against all of them
        rows.append(compare(runs, "uncertainty", "all", "drift_fresh"))
    if "distill" in ran:
        rows.append(student_row(runs))
    return rows


def student_row(runs: dict[tuple[str, int], dict[str, Any]]) -> dict[str, Any]:
    """The students of the drift cycles against their teachers on fresh data; size and speed."""
    seeds = sorted(s for v, s in runs if v == "distill" and "student_fresh" in runs[(v, s)])
    if not seeds:
        raise RuntimeError("no drift cycle of the distill variant published a student")
    ours = _pooled([runs[("distill", s)]["student_fresh"] for s in seeds])
    theirs = _pooled([runs[("distill", s)]["drift_fresh"] for s in seeds])
    low, high = paired_bootstrap(theirs, ours, 0.95, 2000, seed=0)
    figures = [runs[("distill", s)]["student"] for s in seeds]
    return {
        "variant": "student",
        "peer": "teacher",
        "measure": "drift_fresh",
        "value": ours.loss,
        "peer_value": theirs.loss,
        "gain": theirs.loss - ours.loss,
        "ci_low": low,
        "ci_high": high,
        "per_seed_gain": [
            round(runs[("distill", s)]["drift_fresh"].loss - runs[("distill", s)]["student_fresh"].loss, 4)
            for s in seeds
        ],
        "records": ours.examples,
        "epsilon": max(runs[("distill", s)]["epsilon"] for s in seeds),
        "peer_epsilon": max(runs[("distill", s)]["epsilon"] for s in seeds),
        "size_share": statistics.median(f["size_share"] for f in figures),
        "parameters": figures[0]["architecture"]["parameters"],
        "teacher_parameters": figures[0]["architecture"]["teacher_parameters"],
        "speedup": statistics.median(f["speedup"] for f in figures),
        "tokens_per_s": [f["tokens_per_s"] for f in figures],
        "held_out_gap": [f["gap"] for f in figures],
        "distill_seconds": [f["seconds"] for f in figures],
    }


def suite_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows in the benchmark suite's form (value vs peer, lower is better)."""
    extra = [
        {
            "name": "learning_student_parameters_vs_teacher",
            "value": r["parameters"],
            "limit_or_peer": r["teacher_parameters"],
            "note": f"the student's tokens/s {r['speedup']:.2f}x its teacher's (forward passes, best of 3)",
        }
        for r in rows
        if r["variant"] == "student"
    ]
    return extra + [
        {
            "name": f"learning_{r['variant']}_{r['measure']}_vs_{r['peer']}",
            "value": r["value"],
            "limit_or_peer": r["peer_value"],
            "note": f"gain {r['gain']:+.4f} nats, 95% CI [{r['ci_low']:+.4f}, {r['ci_high']:+.4f}] "
            f"over {r['records']} probe records; per seed {r['per_seed_gain']}",
        }
        for r in rows
    ]


def print_table(rows: list[dict[str, Any]]) -> None:
    print(f"\n{'variant':<12}{'vs':<8}{'measure':<14}{'value':>9}{'peer':>9}{'gain':>9}  95% CI          per seed")
    for r in rows:
        print(
            f"{r['variant']:<12}{r['peer']:<8}{r['measure']:<14}{r['value']:>9.4f}{r['peer_value']:>9.4f}"
            f"{r['gain']:>+9.4f}  [{r['ci_low']:+.3f}, {r['ci_high']:+.3f}]  {r['per_seed_gain']}"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1", help="comma-separated seeds (one run of each variant per seed)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="subset of " + ",".join(VARIANTS))
    parser.add_argument("--keep", type=Path, help="keep the run directories here (default: a temporary folder)")
    parser.add_argument("--json", type=Path, help="write the suite's rows here")
    parser.add_argument("--table", type=Path, help="write the full comparison rows here")
    args = parser.parse_args(argv)
    names = args.variants.split(",")
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"--variants: unknown {unknown}; choose from {', '.join(VARIANTS)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    runs: dict[tuple[str, int], dict[str, Any]] = {}
    cfg = compose_config(COMMON)  # once, before any run: the model and tokenizer settings of every run
    with tempfile.TemporaryDirectory(prefix="bench-learning-") as tmp:
        root = args.keep or Path(tmp)
        for seed in seeds:
            for variant in names[seed % len(names) :] + names[: seed % len(names)]:  # each goes first in turn
                run_dir = simulate(variant, seed, root / f"{seed}-{variant}")
                runs[(variant, seed)] = score(run_dir, cfg)
                first = runs[(variant, seed)]
                print(
                    f"{variant} seed {seed}: version 1's loss on the pre-drift probe "
                    f"{first['first_pre_drift'].loss:.3f}, on the fresh drifted one {first['first_fresh'].loss:.3f}",
                    flush=True,
                )
                if variant == "uncertainty":
                    pool = uncertainty_pool(run_dir, cfg, UNCERTAINTY_THRESHOLD, UNCERTAINTY_SHARE)
                    print(f"uncertainty seed {seed}: expected share of each site's window kept: {pool}", flush=True)
    rows = rows_from(runs)
    print_table(rows)
    eps = {f"{v}/{s}": round(r["epsilon"], 4) for (v, s), r in runs.items()}
    print(f"largest site epsilon of each drift cycle: {eps}")
    if args.table is not None:
        args.table.write_text(json.dumps({"rows": rows, "epsilon": eps}, indent=2) + "\n")
    if args.json is not None:
        args.json.write_text(json.dumps(suite_rows(rows), indent=2) + "\n")
    if rows and statistics.median(len(r["per_seed_gain"]) for r in rows) < 1:
        raise SystemExit("no comparison ran")


if __name__ == "__main__":
    main()
