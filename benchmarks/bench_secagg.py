"""Secure aggregation's cost per round against plain aggregation, side by side.

K sites answer one train round in this process: each a Flower ClientApp whose train
function adds a fixed update to the global adapter (no training, so what is timed is
the protocol), with the secure-aggregation mod (client/secagg.py) around it, keeping its
Context between messages as a SuperNode does. The coordinator runs the round loop
(server/cycle/rounds.py) with and without ``secure``; the two take turns
(``interleaved_best``). Reported:

- the round's wall time, secure vs plain: all of the sites' and the coordinator's compute
  (key pairs, Shamir shares, share encryption, quantisation, masks, unmasking) on one core;
  on a real federation the sites compute in parallel and the three extra exchanges add
  three network round trips;
- the round's bytes (every stage's messages, down and up), secure vs plain;
- how far the secure mean is from the plain mean, against one quantisation step;
- the mask generator: ChaCha20 (fedretrain/secagg.py) vs Flower's ``pseudo_rand_gen``
  (numpy's RandomState over a 32-bit seed) for one update's mask.

Run from the repository root::

    python benchmarks/bench_secagg.py [--sites K] [--params P] [--reps N] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
from flwr.app import ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen
from flwr.supercore.task_identity import TaskIdentity
from timing import interleaved_best

from client.secagg import secure_aggregation_mod
from fedretrain.arrays import AdapterSpec, from_array_record, to_array_record
from fedretrain.config.schema import SecureAggregationConfig
from fedretrain.secagg import mask_stream
from server.cycle.rounds import RoundPolicy, run_rounds
from strategies import FedAvgLoRA
from strategies.validation import TRAIN_METRICS

NUM_TENSORS = 64
SITE_METRICS = dict(zip(TRAIN_METRICS, (2.0, 8.0, 1e-5, 1.1, 0.05, 40), strict=True))
ROW_NAMES = (
    "secagg_round_s_vs_plain",
    "secagg_round_bytes_vs_plain",
    "secagg_mean_error_vs_quantisation_step",
    "secagg_mask_s_chacha20_vs_flower",
)


class InProcessSites:
    """Flower's Grid as ``run_rounds`` uses it, each node answered by its own ClientApp state."""

    def __init__(self, k: int, updates: dict[int, float]) -> None:
        self.nodes = list(range(1, k + 1))
        self.updates = updates
        self.app = ClientApp(mods=[secure_aggregation_mod])
        self.reset()
        self.sent = 0

        @self.app.train()
        def train(msg: Message, context: Context) -> Message:
            config = msg.content["config"]
            arrays = from_array_record(msg.content["arrays"])
            delta = np.float32(self.updates[context.node_id])
            site = ConfigRecord(
                {
                    "site-id": f"site-{context.node_id:03d}",
                    "server-round": config["server-round"],
                    "global-hash": config["global-hash"],
                }
            )
            trained = to_array_record({k: v + delta for k, v in arrays.items()})
            content = RecordDict({"arrays": trained, "metrics": MetricRecord(dict(SITE_METRICS)), "site": site})
            return Message(content, reply_to=msg)

        @self.app.evaluate()
        def evaluate(msg: Message, context: Context) -> Message:
            return Message(Error(code=4109, reason="not measured"), reply_to=msg)

    def reset(self) -> None:
        self.contexts = {
            n: Context(run_id=1, node_id=n, node_config={}, state=RecordDict(), run_config={}) for n in self.nodes
        }

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for msg in messages:
            self.sent += 1
            msg.metadata.__dict__["_message_id"] = f"m{self.sent}"
            reply = self.app(msg, self.contexts[msg.metadata.dst_node_id])
            reply.metadata.__dict__["_src_node_id"] = msg.metadata.dst_node_id
            replies.append(reply)
        return replies


def one_round(sites: InProcessSites, spec: AdapterSpec, start, secure: SecureAggregationConfig | None):
    """One train round; the new adapter and the round's bytes (down + up)."""
    k = len(sites.nodes)
    strategy = FedAvgLoRA(spec=spec, max_update_norm_ratio=None, min_train_nodes=k, min_available_nodes=k)
    final = run_rounds(
        sites,
        strategy,
        start,
        first_round=1,
        num_rounds=1,
        policy=RoundPolicy(deadline_s=60.0, quorum=k, wait_for=k),
        train_config=ConfigRecord(),
        evaluate_config=ConfigRecord(),
        evaluate_fn=lambda r, a: None,
        on_round_end=lambda r, a: None,
        secure=secure,
    )
    entry = strategy.round_log[1]
    return from_array_record(final), entry.bytes_down + entry.bytes_up


def run(k: int, p: int, reps: int) -> list[dict[str, object]]:
    TaskIdentity._run_id = 1  # pylint: disable=protected-access
    TaskIdentity._node_id = SUPERLINK_NODE_ID  # pylint: disable=protected-access
    TaskIdentity._task_id = 1  # pylint: disable=protected-access
    # The sites here do not evaluate: their refusals would log a warning each round.
    logging.getLogger("flwr").setLevel(logging.ERROR)
    logging.getLogger("fedretrain").setLevel(logging.ERROR)
    rng = np.random.default_rng(0)
    start_arrays = {
        f"t{j:02d}": part for j, part in enumerate(np.split(rng.standard_normal(p, np.float32), NUM_TENSORS))
    }
    spec = AdapterSpec.from_state_dict(start_arrays)
    start = to_array_record(start_arrays)
    sites = InProcessSites(k, {n: float(rng.uniform(-0.01, 0.01)) for n in range(1, k + 1)})
    secure = SecureAggregationConfig(enabled=True)
    results: dict[str, tuple] = {}

    def timed(name: str, settings):
        def call():
            sites.reset()
            results[name] = one_round(sites, spec, start, settings)

        return call

    best = interleaved_best({"plain": timed("plain", None), "secure": timed("secure", secure)}, reps)
    (plain, plain_bytes), (masked, secure_bytes) = results["plain"], results["secure"]
    error = max(float(np.max(np.abs(masked[key].astype(np.float64) - plain[key]))) for key in plain)
    step = 2 * secure.clipping_range / secure.quantization_range
    shapes = [a.shape for a in start_arrays.values()]
    masks = interleaved_best(
        {
            "chacha20": lambda: mask_stream(b"\x01" * 32, 2**32, shapes),
            "flower": lambda: pseudo_rand_gen(b"\x01" * 32, 2**32, shapes),
        },
        reps,
    )
    print(f"K={k} sites, P={p:,} params per update; one core runs every site and the coordinator")
    print(f"  plain round   {best['plain'] * 1e3:9.1f} ms  {plain_bytes / 1e6:8.2f} MB")
    print(f"  secure round  {best['secure'] * 1e3:9.1f} ms  {secure_bytes / 1e6:8.2f} MB")
    print(f"  secure/plain  {best['secure'] / best['plain']:9.2f} x   {secure_bytes / plain_bytes:8.2f} x")
    print(f"  max |secure mean - plain mean| {error:.2e} (quantisation step {step:.2e})")
    print(
        f"  one update's mask: ChaCha20 {masks['chacha20'] * 1e3:.1f} ms, Flower's pseudo_rand_gen "
        f"{masks['flower'] * 1e3:.1f} ms"
    )
    size = f"K={k} x {p / 2**20:g}M params"
    return [
        {
            "name": "secagg_round_s_vs_plain",
            "value": best["secure"],
            "limit_or_peer": best["plain"],
            "ratio": best["secure"] / best["plain"],
            "note": f"{size}: one train round's compute, every site and the coordinator on one core",
        },
        {
            "name": "secagg_round_bytes_vs_plain",
            "value": float(secure_bytes),
            "limit_or_peer": float(plain_bytes),
            "ratio": secure_bytes / plain_bytes,
            "note": f"{size}: every stage's messages, down and up",
        },
        {
            "name": "secagg_mean_error_vs_quantisation_step",
            "value": error,
            "limit_or_peer": step,
            "ratio": error / step,
        },
        {
            "name": "secagg_mask_s_chacha20_vs_flower",
            "value": masks["chacha20"],
            "limit_or_peer": masks["flower"],
            "ratio": masks["chacha20"] / masks["flower"],
            "note": f"one {p / 2**20:g}M-value mask: ChaCha20 vs Flower's 32-bit-seeded RandomState",
        },
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, default=10)
    parser.add_argument("--params", type=int, default=2**20, help="values per update (a multiple of 64)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="3 sites, 64K params, 1 repetition")
    parser.add_argument("--json", type=Path, help="write result rows here")
    args = parser.parse_args(argv)
    k, p, reps = (3, 2**16, 1) if args.quick else (args.sites, args.params, args.reps)
    rows = run(k, p, reps)
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
