"""FedAvg aggregation throughput: a memory copy vs Flower's path vs ours.

K client updates of P float32 params, each an ArrayRecord of 64 LoRA-sized tensors.
Three timings (best of N, taking turns), each reported in GB/s of client bytes (K*P*4 / time):

(a) ``np.copyto`` of the same bytes: the memory-bandwidth yardstick. A copy reads
    and writes every byte, an average only reads it, so ours can beat it.
(b) Flower 1.41 ``aggregate_arrayrecords`` on K RecordDicts (np.load per array,
    a temporary per addition).
(c) ours: ``from_array_record`` (zero-copy .npy views) + ``weighted_average``.

Run from the repository root::

    python benchmarks/bench_aggregation.py [--quick] [--json PATH]

(not ``python -m benchmarks...``: opacus 1.6 installs a top-level ``benchmarks``
package that shadows this folder.)

Server memory: the strategy holds all K replies before it averages (Flower's
``send_and_receive``), so its peak is at least K x update bytes; the average itself
adds one accumulator per key. Measured from /proc/self/status: the peak RSS (VmHWM,
reset through /proc/self/clear_refs) during (c) above the RSS with the replies held.

The benchmark's own peak is about 3 x K*P*4 bytes (5 GB for the default K=100, P=4M):
the copy's source and target stay alive beside the replies so that all three take turns.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# Run as a file, so make the repository root importable.
if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from timing import interleaved_best
from fedretrain.records import from_array_record
from strategies.aggregation import weighted_average

NUM_TENSORS = 64  # a LoRA adapter is many small A/B matrices, not one vector


def make_replies(x: np.ndarray) -> list[RecordDict]:
    """Each row of ``x`` as a Flower reply content: 64 tensors and num-examples."""
    replies = []
    for i, row in enumerate(x):
        parts = np.split(row, NUM_TENSORS)
        arrays = ArrayRecord({f"t{j:02d}": Array(a) for j, a in enumerate(parts)})
        metrics = MetricRecord({"num-examples": 100 + i})
        replies.append(RecordDict({"arrays": arrays, "metrics": metrics}))
    return replies


def ours(replies: list[RecordDict]) -> dict[str, np.ndarray]:
    """Deserialize (zero-copy) and average, as FedAvgLoRA does after validation."""
    updates = [from_array_record(r.array_records["arrays"]) for r in replies]
    weights = [float(r.metric_records["metrics"]["num-examples"]) for r in replies]
    return weighted_average(updates, weights)


def _status_bytes(field: str) -> int:
    """A ``Vm*`` field of /proc/self/status, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def aggregation_extra_bytes(replies: list[RecordDict]) -> int:
    """Peak RSS added by one run of (c) over the RSS with the replies held."""
    held = _status_bytes("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    result = ours(replies)
    extra = _status_bytes("VmHWM") - held
    del result
    return extra


def check_agreement(replies: list[RecordDict], got: dict[str, np.ndarray]) -> float:
    """Max abs difference between ours and Flower's result."""
    flower = aggregate_arrayrecords(replies, "num-examples")
    return max(float(np.max(np.abs(flower[key].numpy() - got[key]))) for key in got)


def run(k: int, p: int, reps: int) -> list[dict[str, object]]:
    """Time (a), (b), (c); print a table; return the JSON rows."""
    x = np.random.default_rng(0).standard_normal((k, p), dtype=np.float32)
    gb = x.nbytes / 1e9
    target = np.empty_like(x)
    replies = make_replies(x)  # the records hold their own copy of the bytes
    # Side by side: the three take turns, so a busy spell on the shared CPU hits all alike.
    best = interleaved_best({"copy": lambda: np.copyto(target, x),
                             "flower": lambda: aggregate_arrayrecords(replies, "num-examples"),
                             "ours": lambda: ours(replies)}, reps)
    del x, target
    t_copy, t_flower, t_ours = best["copy"], best["flower"], best["ours"]
    diff = check_agreement(replies, ours(replies))
    extra = aggregation_extra_bytes(replies)
    held = sum(r.array_records["arrays"].count_bytes() for r in replies)

    copy, flower, mine = gb / t_copy, gb / t_flower, gb / t_ours
    print(f"K={k} P={p:,} ({gb:.2f} GB of client bytes); NumPy and ours are single-threaded")
    print(f"  (a) np.copyto               {t_copy * 1e3:8.1f} ms  {copy:6.1f} GB/s")
    print(f"  (b) flwr aggregate_arrayrecords {t_flower * 1e3:4.0f} ms  {flower:6.1f} GB/s")
    print(f"  (c) ours                    {t_ours * 1e3:8.1f} ms  {mine:6.1f} GB/s")
    print(f"  ours/copy {mine / copy:.2f}   ours/flower {mine / flower:.1f}   "
          f"max |ours - flower| {diff:.2e}")
    print(f"  server memory: replies {held / 1e9:.2f} GB + aggregation {extra / 1e6:.1f} MB "
          f"(one update is {p * 4 / 1e6:.1f} MB)")
    if diff > 1e-5:
        raise SystemExit(f"results disagree: max abs diff {diff:.2e}")
    return [
        {"name": "agg_copy_gbps", "value": copy, "limit_or_peer": None, "ratio": None},
        {"name": "agg_flower_gbps", "value": flower, "limit_or_peer": None, "ratio": None},
        {"name": "agg_ours_vs_copy_gbps", "value": mine, "limit_or_peer": copy,
         "ratio": mine / copy},
        {"name": "agg_ours_vs_flower_gbps", "value": mine, "limit_or_peer": flower,
         "ratio": mine / flower},
        {"name": "agg_peak_server_bytes", "value": float(held + extra), "limit_or_peer": gb * 1e9,
         "ratio": (held + extra) / (gb * 1e9)},
        {"name": "agg_extra_bytes_vs_one_update", "value": float(extra), "limit_or_peer": p * 4.0,
         "ratio": extra / (p * 4.0)},
        {"name": "agg_max_abs_diff_vs_flower", "value": diff, "limit_or_peer": 1e-5,
         "ratio": diff / 1e-5},
    ]


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, run the benchmark, optionally write JSON rows."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="K=10 x 1M instead of 100 x 4M")
    parser.add_argument("--reps", type=int, default=5, help="best of this many runs")
    parser.add_argument("--json", type=Path, help="write result rows here")
    args = parser.parse_args(argv)
    k, p = (10, 1_048_576) if args.quick else (100, 4_194_304)
    rows = run(k, p, args.reps)
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
