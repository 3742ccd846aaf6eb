"""FedAvg aggregation throughput: a memory copy vs Flower's path vs the real strategy.

K train replies of P float32 params, each a Flower reply Message as a site sends it: an
ArrayRecord of 64 LoRA-sized tensors, the train metrics (``TRAIN_METRICS``) and the
"site" record echoing round and global digest. Four timings (best of N, taking turns),
each reported in GB/s of client bytes (K*P*4 / time):

(a) ``np.copyto`` of the same bytes: the memory-bandwidth yardstick. A copy reads
    and writes every byte, an average only reads it, so ours can beat it.
(b) Flower 1.41 ``aggregate_arrayrecords`` on the replies' RecordDicts (np.load per
    array, a temporary per addition). It needs a weight key, so every reply also carries
    ``num-examples=1`` (equal weights, as ours; a real site sends no count).
(c) ours: ``FedAvgLoRA.aggregate_train``, what the server runs: every reply validated
    (size, round tag, metrics, site id; keys, shapes, dtype, finiteness and
    ``max_abs_value`` of every tensor), then ``weighted_average`` of zero-copy views and
    the result packed as an ArrayRecord.
(d) ours without the checks: ``from_array_record`` + ``weighted_average`` only, the
    average's own speed.

Run from the repository root::

    python benchmarks/bench_aggregation.py [--quick] [--json PATH]

(not ``python -m benchmarks...``: opacus 1.6 installs a top-level ``benchmarks``
package that shadows this folder.)

Server memory: the strategy holds all K replies before it averages (Flower's
``send_and_receive``), so its peak is at least K x update bytes; aggregation adds one
accumulator per key and the packed result. Measured from /proc/self/status: the peak
RSS (VmHWM, reset through /proc/self/clear_refs) during (c) above the RSS with the
replies held.

The benchmark's own peak is about 3 x K*P*4 bytes (5 GB for the default K=100, P=4M):
the copy's source and target stay alive beside the replies so that all take turns.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

# Run as a file, so make the repository root importable.
if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords
from flwr.supercore.task_identity import TaskIdentity
from timing import interleaved_best

from fedretrain.arrays import AdapterSpec, from_array_record, to_array_record
from fedretrain.config import compose_config
from strategies import FedAvgLoRA, build_strategy
from strategies.aggregation import weighted_average
from strategies.validation import TRAIN_METRICS

NUM_TENSORS = 64  # a LoRA adapter is many small A/B matrices, not one vector
ROUND = 1
# What a site reports (values as a DP site's; none depends on its records).
SITE_METRICS = dict(zip(TRAIN_METRICS, (2.0, 8.0, 1e-5, 1.1, 0.05, 40), strict=True))


class _Nodes:
    """The one Grid call ``configure_train`` makes: which nodes are connected."""

    def __init__(self, k: int) -> None:
        self.node_ids = list(range(1, k + 1))

    def get_node_ids(self) -> list[int]:
        return self.node_ids


def _serverapp_identity() -> None:
    """Flower 1.41 builds a Message from the process's TaskIdentity, which the ServerApp
    runtime sets; stand in for it, as a benchmark builds messages outside one."""
    TaskIdentity._run_id = 1  # pylint: disable=protected-access
    TaskIdentity._node_id = SUPERLINK_NODE_ID  # pylint: disable=protected-access
    TaskIdentity._task_id = 1  # pylint: disable=protected-access


def split(row: np.ndarray) -> dict[str, np.ndarray]:
    """One client's update as 64 tensors."""
    return {f"t{j:02d}": part for j, part in enumerate(np.split(row, NUM_TENSORS))}


def make_round(x: np.ndarray) -> tuple[FedAvgLoRA, list[Message]]:
    """A strategy that sent round 1 to K nodes, and each row of ``x`` as a node's reply.

    Every reply is a valid one, as ``client/`` sends it, plus ``num-examples=1`` for (b).
    """
    _serverapp_identity()
    cfg = compose_config([]).strategy  # the shipped strategy settings, as server/cycle/run.py builds it
    strategy = build_strategy(
        cfg.name,
        spec=AdapterSpec.from_state_dict(split(x[0])),
        max_abs_value=cfg.max_abs_value,
        fraction_train=1.0,
        min_train_nodes=len(x),
        min_available_nodes=len(x),
    )
    global_arrays = to_array_record({key: np.zeros_like(v) for key, v in split(x[0]).items()})
    sent = list(strategy.configure_train(ROUND, global_arrays, ConfigRecord(), _Nodes(len(x))))
    replies = []
    for i, (row, instruction) in enumerate(zip(x, sent, strict=True)):
        echo = instruction.content["config"]
        site = ConfigRecord(
            {"site-id": f"site-{i:03d}", "server-round": echo["server-round"], "global-hash": echo["global-hash"]}
        )
        content = RecordDict(
            {
                "arrays": to_array_record(split(row)),
                "metrics": MetricRecord({**SITE_METRICS, "num-examples": 1}),
                "site": site,
            }
        )
        replies.append(Message(content, reply_to=instruction))
    return strategy, replies


def ours(strategy: FedAvgLoRA, replies: list[Message]) -> ArrayRecord:
    """``aggregate_train`` as the server calls it; every reply must be accepted."""
    strategy.round_log.clear()  # a repeat of round 1 would refuse every site as a second reply
    arrays, metrics = strategy.aggregate_train(ROUND, replies)
    if arrays is None or metrics is None or metrics["accepted-replies"] != len(replies):
        raise SystemExit(f"the strategy left replies out: {strategy.round_log[ROUND].rejected[:1]}")
    return arrays


def average_only(replies: list[Message]) -> dict[str, np.ndarray]:
    """Deserialize (zero-copy) and average, without the reply checks: (d)."""
    updates = [from_array_record(r.content.array_records["arrays"]) for r in replies]
    return weighted_average(updates, [1] * len(updates))


def flower(replies: list[Message]) -> ArrayRecord:
    """Flower's own average of the same replies: (b)."""
    return aggregate_arrayrecords([r.content for r in replies], "num-examples")


def _status_bytes(field: str) -> int:
    """A ``Vm*`` field of /proc/self/status, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def aggregation_extra_bytes(strategy: FedAvgLoRA, replies: list[Message]) -> int:
    """Peak RSS added by one run of (c) over the RSS with the replies held."""
    held = _status_bytes("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    result = ours(strategy, replies)
    extra = _status_bytes("VmHWM") - held
    del result
    return extra


def max_abs_diff(a: ArrayRecord, b: ArrayRecord) -> float:
    """Max abs difference between two averaged adapters."""
    x, y = from_array_record(a), from_array_record(b)
    return max(float(np.max(np.abs(x[key] - y[key]))) for key in x)


def run(k: int, p: int, reps: int) -> list[dict[str, object]]:
    """Time (a)-(d); print a table; return the JSON rows."""
    x = np.random.default_rng(0).standard_normal((k, p), dtype=np.float32)
    gb = x.nbytes / 1e9
    target = np.empty_like(x)
    logging.getLogger("flwr").setLevel(logging.WARNING)  # an INFO line per configure/aggregate_train
    strategy, replies = make_round(x)  # the records hold their own copy of the bytes
    # Side by side: they take turns, so a busy spell on the shared CPU hits all alike.
    best = interleaved_best(
        {
            "copy": lambda: np.copyto(target, x),  # noqa: F821 (deleted only after the timing)
            "flower": lambda: flower(replies),
            "ours": lambda: ours(strategy, replies),
            "average": lambda: average_only(replies),
        },
        reps,
    )
    del x, target
    diff = max_abs_diff(ours(strategy, replies), flower(replies))
    extra = aggregation_extra_bytes(strategy, replies)
    held = sum(r.content.array_records["arrays"].count_bytes() for r in replies)

    copy, flwr, mine, avg = (gb / best[name] for name in ("copy", "flower", "ours", "average"))
    print(f"K={k} P={p:,} ({gb:.2f} GB of client bytes); NumPy and ours are single-threaded")
    print(f"  (a) np.copyto                    {best['copy'] * 1e3:8.1f} ms  {copy:6.2f} GB/s")
    print(f"  (b) flwr aggregate_arrayrecords  {best['flower'] * 1e3:8.1f} ms  {flwr:6.2f} GB/s")
    print(f"  (c) ours, aggregate_train        {best['ours'] * 1e3:8.1f} ms  {mine:6.2f} GB/s")
    print(f"  (d) ours without reply checks    {best['average'] * 1e3:8.1f} ms  {avg:6.2f} GB/s")
    print(
        f"  ours/copy {mine / copy:.2f}   ours/flower {mine / flwr:.2f} (without checks "
        f"{avg / flwr:.2f})   max |ours - flower| {diff:.2e}"
    )
    print(
        f"  server memory: replies {held / 1e9:.2f} GB + aggregation {extra / 1e6:.1f} MB "
        f"(one update is {p * 4 / 1e6:.1f} MB)"
    )
    if diff > 1e-5:
        raise SystemExit(f"results disagree: max abs diff {diff:.2e}")
    size = f"K={k} x {p / 2**20:g}M params"
    return [
        {"name": "agg_copy_gbps", "value": copy, "limit_or_peer": None, "ratio": None},
        {"name": "agg_flower_gbps", "value": flwr, "limit_or_peer": None, "ratio": None},
        {
            "name": "agg_ours_vs_copy_gbps",
            "value": mine,
            "limit_or_peer": copy,
            "ratio": mine / copy,
            "note": f"{size}: FedAvgLoRA.aggregate_train (every reply validated) vs a memory copy of the same bytes",
        },
        {
            "name": "agg_ours_vs_flower_gbps",
            "value": mine,
            "limit_or_peer": flwr,
            "ratio": mine / flwr,
            "note": "FedAvgLoRA.aggregate_train (every reply validated) vs Flower's aggregate_arrayrecords",
        },
        {
            "name": "agg_ours_vs_flower_gbps_without_checks",
            "value": avg,
            "limit_or_peer": flwr,
            "ratio": avg / flwr,
            "note": "from_array_record + weighted_average only (no reply checks) vs Flower's aggregate_arrayrecords",
        },
        {
            "name": "agg_peak_server_bytes",
            "value": float(held + extra),
            "limit_or_peer": gb * 1e9,
            "ratio": (held + extra) / (gb * 1e9),
        },
        {
            "name": "agg_extra_bytes_vs_one_update",
            "value": float(extra),
            "limit_or_peer": p * 4.0,
            "ratio": extra / (p * 4.0),
        },
        {"name": "agg_max_abs_diff_vs_flower", "value": diff, "limit_or_peer": 1e-5, "ratio": diff / 1e-5},
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
