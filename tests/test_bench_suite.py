"""The benchmark suite: its quick run writes a valid table, and its row arithmetic by hand.

Nothing here asserts a timing: the figures are whatever the shared CPU gave.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from bench_attacks import row_names as attack_row_names  # noqa: E402
from bench_attacks import rows_from  # noqa: E402
from bench_learning import ROW_NAMES as LEARNING_ROW_NAMES  # noqa: E402
from bench_lora_variants import ROW_NAMES as LORA_ROW_NAMES  # noqa: E402
from bench_lora_variants import rows_from as lora_rows_from  # noqa: E402
from demo_figures import demo_rows, first_beating_round, union_in  # noqa: E402
from suite_rows import DEMO_ROW_NAMES, DEPLOY_ROW_NAMES, KEYS, finish_rows  # noqa: E402

SECTIONS = {
    "1 DP overhead",
    "2 Client throughput",
    "3 Communication",
    "4 Aggregation",
    "5 Framework overhead",
    "6 Start-up",
    "7 Time to value",
    "8 Privacy accounting",
    "9 Deployment",
    "10 Robustness",
    "11 DP-aware LoRA",
    "12 Secure aggregation",
    "13 Learning more from less",
}


@pytest.mark.slow
def test_quick_run_writes_every_row_with_its_keys(repo: Path, tmp_path: Path) -> None:
    # Prepare: the entry point `make bench QUICK=1` runs, writing to a temporary path.
    out = tmp_path / "latest.json"
    command = [sys.executable, str(repo / "benchmarks" / "bench_suite.py"), "--quick", "--out", str(out)]

    # Execute
    result = subprocess.run(command, cwd=repo, capture_output=True, text=True, timeout=600)

    # Assert: metadata, every section present, every row complete and self-consistent.
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    document = json.loads(out.read_text())
    assert document["quick"] is True and document["machine"]["cores"] >= 1 and document["date"]
    assert {"torch", "flwr", "cpu"} <= set(document["machine"])
    rows = document["rows"]
    assert {row["section"] for row in rows} == SECTIONS
    for row in rows:
        assert tuple(row) == KEYS, row["name"]
        value, peer, ratio = row["value"], row["limit_or_peer"], row["ratio"]
        if isinstance(value, float) and isinstance(peer, float) and peer != 0:
            assert math.isfinite(ratio) and math.isclose(ratio, value / peer, rel_tol=1e-12), row["name"]
        else:
            assert ratio is None, row["name"]
    names = {row["name"] for row in rows}
    # Listed, null, though quick mode skips them.
    skipped = set(DEMO_ROW_NAMES) | set(DEPLOY_ROW_NAMES) | set(attack_row_names()) | set(LORA_ROW_NAMES)
    assert skipped | set(LEARNING_ROW_NAMES) <= names
    assert {
        "dp_step_ms_hooks_b16",
        "agg_ours_vs_copy_gbps",
        "sim_round_s_n10",
        "eps_ours_rdp_vs_opacus_rdp",
        "comm_bytes_per_client_round",
        "dp_tokens_per_s_hooks_b16",
        "secagg_round_s_vs_plain",
        "secagg_mean_error_vs_quantisation_step",
    } <= names
    by_name = {row["name"]: row for row in rows}
    assert by_name["eps_ours_rdp_vs_opacus_rdp"]["ratio"] == pytest.approx(1.0, abs=1e-9)
    # The quick DP overhead run (bench_dp_overhead.py --quick --steps 3): hooks only, at B=16,
    # the ratio of medians carrying the paired spread and no target; no ghost or B=64 rows.
    step = by_name["dp_step_ms_hooks_b16"]
    assert step["value"] > 0 and step["limit_or_peer"] > 0
    assert step["target"] is None and "median of 3 paired ratios" in step["note"]
    assert by_name["grad_sample_floor_bytes_b16"]["value"] == 8192 * 16 * 4  # r=8 on q,v of 2 layers
    assert all(by_name.get(name, {}).get("value") is None for name in ("dp_step_ms_ghost_b16", "dp_step_ms_hooks_b64"))
    # The quick aggregation run (bench_aggregation.py --quick --reps 1): positive speed ratios; the
    # difference from Flower's result and aggregation's own extra bytes may be exactly 0 (a CI run
    # came out bit-identical to Flower's average), never negative.
    agg = {row["name"]: row for row in rows if row["name"].startswith("agg_") and row["value"] is not None}
    assert "agg_ours_vs_flower_gbps_without_checks" in agg
    assert all(row["ratio"] > 0 for name, row in agg.items() if name.startswith("agg_ours_vs_"))
    assert all(row["ratio"] is None or row["ratio"] >= 0 for row in agg.values())


def test_finish_rows_recomputes_ratios_and_judges_targets() -> None:
    # Prepare: a hooks step of 230 ms vs 200 ms plain -> 1.15, exactly at the 1.15 target (meets);
    # aggregation 4 GB/s vs a 10 GB/s copy -> 0.4, below the 0.5 target (misses, higher is better);
    # a non-finite peer and a missing value give no ratio.
    rows = [
        {"name": "dp_step_ms_hooks_b64", "value": 230.0, "limit_or_peer": 200.0, "ratio": 99.0},
        {"name": "agg_ours_vs_copy_gbps", "value": 4.0, "limit_or_peer": 10.0, "ratio": 0.4},
        {"name": "eps_x", "value": 1.0, "limit_or_peer": float("inf"), "ratio": 0.0},
        {"name": "ttv_y", "value": None, "limit_or_peer": 3.0, "ratio": None},
    ]

    # Execute
    got = {row["name"]: row for row in finish_rows(rows)}

    # Assert
    hooks = got["dp_step_ms_hooks_b64"]
    assert hooks["ratio"] == pytest.approx(1.15) and hooks["verdict"] == "meets" and hooks["target"] == 1.15
    assert got["agg_ours_vs_copy_gbps"]["verdict"] == "misses"
    assert got["eps_x"]["limit_or_peer"] is None and got["eps_x"]["ratio"] is None
    assert got["ttv_y"]["ratio"] is None and got["ttv_y"]["verdict"] is None
    assert [row["section"] for row in finish_rows(rows)] == sorted(row["section"] for row in got.values())


def test_union_counts_overlapping_client_intervals_once() -> None:
    # [0,4] and [2,6] overlap on [2,4]: union [0,6] is 6 s, clipped to the round [1,10] -> 5 s;
    # [8,12] clipped to [8,10] -> 2 s; [20,30] lies outside. Total 7 s.
    assert union_in([(0, 4), (2, 6), (8, 12), (20, 30)], 1, 10) == pytest.approx(7.0)
    assert union_in([], 0, 5) == 0.0


def test_first_beating_round_skips_the_starting_point() -> None:
    def entry(r: int, cand: float) -> dict:
        return {"round": r, "validation": {"candidate_loss": cand, "baseline_loss": 2.0}}

    # Round 0 equals the baseline, round 1 is worse, round 2 is the first below 2.0.
    assert first_beating_round([entry(0, 2.0), entry(1, 2.1), entry(2, 1.9), entry(3, 1.8)]) == 2
    assert first_beating_round([entry(0, 2.0), entry(1, 2.5)]) is None


def test_demo_rows_split_round_time_by_hand() -> None:
    # Prepare: rounds end at 10 (round 0), 50 and 70. Round 1 [10, 50]: the sites compute on
    # [20, 40] and [38, 45] (union 25 s), the server scores on [46, 49] (3 s). Round 2 [50, 70]:
    # sites [51, 65] (14 s), server [66, 69] (3 s); the publish query at 71 is after the rounds.
    run = {
        "t0": 0.0,
        "end": 100.0,
        "rounds": {"0": 10.0, "1": 50.0, "2": 70.0},
        "client": [
            {"what": "train.default", "start": 20, "end": 40},
            {"what": "evaluate.default", "start": 38, "end": 45},
            {"what": "train.default", "start": 51, "end": 65},
            {"what": "query.publish", "start": 71, "end": 80},
        ],
        "server_evals": [[5, 9], [46, 49], [66, 69]],
        "summary": {
            "published_version": 1,
            "rounds": 2,
            "communication": {"full_model_bytes": 1000, "bytes_per_client_per_round": 40},
        },
        "metrics": [
            {
                "round": r,
                "bytes_down": 30 * (r > 0),
                "bytes_up": 30 * (r > 0),
                "sites_sampled": 3 * (r > 0),
                "validation": {"candidate_loss": loss, "baseline_loss": 2.0},
            }
            for r, loss in ((0, 2.0), (1, 2.1), (2, 1.9))
        ],
    }

    # Execute: the cold run started 20 s earlier than the warm one
    got = {row["name"]: row for row in demo_rows(run, dict(run, t0=-20.0))}

    # Assert: not client compute (40 - 25) + (20 - 14) = 21 of 60 s; less server scoring 15 s;
    # rounds 2.. only: 6 and 3 of 20 s. Start-up 10 s warm, 30 s cold. Round 2 beats the baseline
    # after 120 bytes, against 2 rounds x 3 sites x 2 directions x 1000 bytes = 12000.
    assert (got["demo_not_client_compute_s"]["value"], got["demo_not_client_compute_s"]["limit_or_peer"]) == (21, 60)
    assert got["demo_framework_residual_s"]["value"] == 15
    assert got["demo_not_client_compute_s_rounds2on"]["value"] == 6
    assert got["demo_framework_residual_s_rounds2on"]["value"] == 3
    assert (got["startup_warm_s"]["value"], got["startup_cold_s"]["value"]) == (10, 30)
    assert got["ttv_rounds_to_beat_baseline"]["value"] == 2
    assert (got["ttv_bytes_to_beat_baseline"]["value"], got["ttv_bytes_to_beat_baseline"]["limit_or_peer"]) == (
        120,
        12000,
    )
    assert got["ttv_wall_s_to_published"]["limit_or_peer"] == 25 + 14  # the sites' compute in the rounds


def test_attack_rows_compare_each_attacked_cell_with_its_defences_clean_one():
    # Prepare: fedavg gains 0.5 clean, 0.1 under 30% sign flip (a fifth), and under 30% scaling
    # gets worse (-0.2) yet is refused; fedmedian gains 0.4 clean and 0.36 attacked (0.9).
    def cell(defence, behaviour, share, improvement, decision, **extra):
        return {
            "defence": defence,
            "behaviour": behaviour,
            "share": share,
            "baseline_loss": 6.0,
            "candidate_loss": 6.0 - improvement,
            "improvement": improvement,
            "decision": decision,
            **extra,
        }

    cells = [
        cell("fedavg", "none", 0.0, 0.5, "publish"),
        cell("fedavg", "sign_flip", 0.3, 0.1, "publish"),
        cell("fedavg", "scale", 0.3, -0.2, "refuse"),
        cell("fedmedian", "none", 0.0, 0.4, "publish", phrase_loss_clean=6.0),
        cell("fedmedian", "sign_flip", 0.3, 0.36, "publish"),
        cell(
            "fedmedian", "backdoor", 0.3, 0.3, "publish", attack={"phrase_loss_base": 8.0, "phrase_loss_candidate": 2.0}
        ),
    ]

    # Execute
    rows = {row["name"]: row for row in finish_rows(rows_from(cells))}

    # Assert
    assert rows["attack_sign_flip_30pct_fedavg"]["ratio"] == pytest.approx(0.2)
    assert rows["attack_sign_flip_30pct_fedmedian"]["ratio"] == pytest.approx(0.9)
    assert rows["attack_scale_30pct_fedavg"]["ratio"] == pytest.approx(-0.4)
    assert "WORSE THAN BASELINE" in rows["attack_scale_30pct_fedavg"]["note"]
    assert rows["attack_backdoor_phrase_loss_fedmedian"]["ratio"] == pytest.approx(2.0 / 6.0)
    assert rows["attack_worse_candidates_published"]["value"] == 0.0
    assert {row["section"] for row in rows.values()} == {"10 Robustness"}


def test_ffa_and_mixed_rank_rows_are_medians_of_the_pairs():
    # From a baseline of 6.8: LoRA reaches 5.4 and 5.6, FFA-LoRA 5.2 and 5.3, mixed ranks 5.7 and 5.9, rank 2 6.0.
    runs = [
        {"variant": "lora", "baseline": 6.8, "candidate": 5.4, "eps": 3.0},
        {"variant": "ffa", "baseline": 6.8, "candidate": 5.2, "eps": 3.0},
        {"variant": "mixed", "baseline": 6.8, "candidate": 5.7, "eps": 3.0},
        {"variant": "ffa", "baseline": 6.8, "candidate": 5.3, "eps": 3.0},
        {"variant": "mixed", "baseline": 6.8, "candidate": 5.9, "eps": 3.0},
        {"variant": "lora", "baseline": 6.8, "candidate": 5.6, "eps": 3.0},
        {"variant": "rank2", "baseline": 6.8, "candidate": 6.0, "eps": 3.0},
    ]
    rows = {row["name"]: row for row in finish_rows(lora_rows_from(runs))}
    assert set(rows) == set(LORA_ROW_NAMES)
    mixed = rows["mixed_rank_candidate_loss_vs_lora"]
    assert (mixed["value"], mixed["limit_or_peer"]) == (pytest.approx(5.8), pytest.approx(5.5))
    assert rows["mixed_rank_improvement_vs_lora"]["ratio"] == pytest.approx(1.0 / 1.3)
    assert rows["mixed_rank_improvement_vs_rank2"]["ratio"] == pytest.approx(1.0 / 0.8)
    # A subset of variants: rows for what ran only.
    only_ffa = lora_rows_from([r for r in runs if r["variant"] in ("lora", "ffa")])
    assert {row["name"] for row in only_ffa} == {n for n in LORA_ROW_NAMES if n.startswith("ffa_")}
    loss = rows["ffa_lora_candidate_loss_vs_lora"]
    assert (loss["value"], loss["limit_or_peer"]) == (pytest.approx(5.25), pytest.approx(5.5))
    assert rows["ffa_lora_improvement_vs_lora"]["ratio"] == pytest.approx(1.55 / 1.3)
    assert rows["ffa_lora_epsilon_vs_lora"]["ratio"] == 1.0
    assert {row["section"] for row in rows.values()} == {"11 DP-aware LoRA"}


def test_learning_rows_compare_each_method_with_its_baseline_record_by_record():
    from bench_learning import rows_from, suite_rows

    from fedretrain.training.evaluate import LossStats

    def stats(losses):
        return LossStats(sum(losses) / len(losses), len(losses) * 10, len(losses), tuple(losses), (10,) * len(losses))

    def run(fresh, shift=0.0, student=None):
        # Fresh-data loss of the drift cycle; the pre-drift probe before (5.0) and after (5.0 + shift).
        base = [0.01 * k for k in range(20)]
        out = {
            "drift_fresh": stats([fresh + b for b in base]),
            "first_pre_drift": stats([5.0 + b for b in base]),
            "drift_pre_drift": stats([5.0 + shift + b for b in base]),
            "first_fresh": stats([7.0] * 20),
            "epsilon": 3.0,
        }
        if student is not None:
            out["student_fresh"] = stats([student + b for b in base])
            out["student"] = {
                "size_share": 0.7,
                "speedup": 1.5,
                "architecture": {"parameters": 7, "teacher_parameters": 10},
                "tokens_per_s": {"teacher": 1.0, "student": 1.5},
                "gap": 0.01,
                "seconds": 30.0,
            }
        return out

    runs = {
        ("all", 0): run(6.5, shift=0.2),
        ("random", 0): run(6.6),
        ("newest", 0): run(6.4),
        ("uncertainty", 0): run(6.3),
        ("curriculum", 0): run(6.5, shift=0.2),
        ("replay", 0): run(6.5, shift=0.05),
        ("distill", 0): run(6.5, student=6.52),
    }
    rows = {(r["variant"], r["measure"], r["peer"]): r for r in rows_from(runs)}
    # Uncertainty against random: 0.3 nats lower on every record, so the interval is a point.
    uncertainty = rows[("uncertainty", "drift_fresh", "random")]
    assert uncertainty["peer"] == "random" and uncertainty["gain"] == pytest.approx(0.3)
    assert uncertainty["ci_low"] == pytest.approx(0.3) and uncertainty["ci_high"] == pytest.approx(0.3)
    # Replay forgets 0.05 where the baseline forgets 0.2: a gain of 0.15.
    assert rows[("replay", "forgetting", "all")]["gain"] == pytest.approx(0.15)
    assert rows[("uncertainty", "drift_fresh", "all")]["gain"] == pytest.approx(0.2)
    assert rows[("student", "drift_fresh", "teacher")]["gain"] == pytest.approx(-0.02)
    names = {r["name"] for r in finish_rows(suite_rows(list(rows.values())))}
    assert names == set(LEARNING_ROW_NAMES)
