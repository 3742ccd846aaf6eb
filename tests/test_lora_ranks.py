"""Mixed LoRA ranks across sites: the arithmetic (fedretrain/lora_ranks.py), the site's lower-rank
training (client/round/site.py) and the coordinator's checks and per-component mean
(strategies/checked.py), with numbers worked out by hand.
"""

from __future__ import annotations

import dataclasses
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

from client.round.site import train_round
from fedretrain.arrays import AdapterSpec, from_array_record, to_array_record
from fedretrain.config import Job, SiteConfig, compose_config
from fedretrain.errors import ConfigError
from fedretrain.lora_ranks import adapter_rank, changed_beyond, expand, rescale_components, truncate
from fedretrain.modeling.lora_model import adapter_arrays, load_adapter_arrays, load_lora_model
from strategies import FedAvgLoRA, build_strategy
from strategies.validation import TRAIN_METRICS

REPO = Path(__file__).resolve().parents[1]

# One LoRA layer of rank 2: A is (2, 3), B is (4, 2).
A, B = "layer.lora_A.weight", "layer.lora_B.weight"
SPEC = AdapterSpec(entries=((A, (2, 3), "float32"), (B, (4, 2), "float32")))

pytestmark = pytest.mark.usefixtures("instruction_identity", "propagating_logs")


def adapter(a_rows, b_cols) -> dict[str, np.ndarray]:
    """A with rows ``a_rows`` (each a value for its 3 entries), B with columns ``b_cols`` (4 entries each)."""
    return {
        A: np.array([[v] * 3 for v in a_rows], np.float32),
        B: np.array([b_cols] * 4, np.float32),
    }


# ---- the arithmetic ----


def test_truncate_expand_and_the_components_beyond_a_rank():
    full = adapter([1, 2], [3, 4])
    small = truncate(full, 1)
    assert small[A].shape == (1, 3) and small[B].shape == (4, 1)
    assert small[A][0, 0] == 1 and small[B][0, 0] == 3
    back = expand({A: small[A] + 10, B: small[B] + 10}, full)
    assert back[A][:, 0].tolist() == [11, 2] and back[B][0].tolist() == [13, 4]
    assert changed_beyond(back, full, 1) == []
    assert changed_beyond(back, full, 0) == [A, B]
    assert adapter_rank({A: (2, 3), B: (4, 2)}) == 2
    assert adapter_rank({A: (2, 3), B: (4, 3)}) is None  # no common rank
    assert adapter_rank({"bias": (3,)}) is None


def test_each_component_is_averaged_over_the_sites_that_trained_it():
    # Global 0. Site 1 (rank 2) sends A rows 1, 2; sites 2 and 3 (rank 1) send 3 and 5 for
    # component 0 and the global 0 for component 1. The plain mean is 3 and 2/3; component 1
    # was trained by site 1 alone, so its mean is 2 = 0 + (3 / 1) (2/3 - 0).
    sent = adapter([0, 0], [0, 0])
    replies = [adapter([1, 2], [1, 2]), adapter([3, 0], [3, 0]), adapter([5, 0], [5, 0])]
    plain = {key: np.mean([r[key] for r in replies], axis=0) for key in sent}
    mean = rescale_components(plain, sent, [2, 1, 1])
    np.testing.assert_allclose(mean[A][:, 0], [3.0, 2.0], rtol=1e-6)
    np.testing.assert_allclose(mean[B][0], [3.0, 2.0], rtol=1e-6)
    # All at the full rank: the plain mean as it was.
    same = rescale_components(plain, sent, [2, 2, 2])
    assert all(np.allclose(same[k], plain[k]) for k in plain)


# ---- the coordinator ----


def round_of(strategy, replies: list[tuple[dict, int | None]], sent: dict):
    """``strategy`` sends ``sent`` to nodes 1..n and gets each (adapter, rank) back."""

    class Nodes:
        def get_node_ids(self):
            return list(range(1, len(replies) + 1))

    messages = list(strategy.configure_train(1, to_array_record(sent), ConfigRecord(), Nodes()))
    out = []
    for i, ((arrays, rank), msg) in enumerate(zip(replies, messages, strict=True)):
        echo = msg.content["config"]
        metrics = dict(zip(TRAIN_METRICS, (1.0, 8.0, 1e-5, 1.1, 0.05, 5), strict=True))
        if rank is not None:
            metrics["lora-rank"] = rank
        site = ConfigRecord({"site-id": f"s{i}", "server-round": 1, "global-hash": echo["global-hash"]})
        content = RecordDict({"arrays": to_array_record(arrays), "metrics": MetricRecord(metrics), "site": site})
        reply = Message(content, reply_to=msg)
        reply.metadata.__dict__["_src_node_id"] = msg.metadata.dst_node_id
        out.append(reply)
    return strategy.aggregate_train(1, out)


def test_fedavg_averages_mixed_ranks_by_component():
    strategy = FedAvgLoRA(spec=SPEC, max_update_norm_ratio=None, min_train_nodes=3, min_available_nodes=3)
    sent = adapter([0, 0], [0, 0])
    replies = [(adapter([1, 2], [1, 2]), None), (adapter([3, 0], [3, 0]), 1), (adapter([5, 0], [5, 0]), 1)]

    arrays, metrics = round_of(strategy, replies, sent)

    result = from_array_record(arrays)
    np.testing.assert_allclose(result[A][:, 0], [3.0, 2.0], rtol=1e-6)
    assert metrics["accepted-replies"] == 3


def test_a_reply_that_changed_components_beyond_its_rank_is_left_out():
    strategy = FedAvgLoRA(spec=SPEC, max_update_norm_ratio=None, min_train_nodes=3, min_available_nodes=3)
    sent = adapter([0, 0], [0, 0])
    replies = [(adapter([1, 2], [1, 2]), 2), (adapter([3, 9], [3, 0]), 1), (adapter([5, 0], [5, 0]), 1)]

    arrays, metrics = round_of(strategy, replies, sent)

    (rejected,) = strategy.round_log[1].rejected
    assert "trained LoRA rank 1 of 2 but changed components beyond it" in rejected.reason
    # The two left: component 0 (1 + 5) / 2 = 3, component 1 only site 0's 2.
    np.testing.assert_allclose(from_array_record(arrays)[A][:, 0], [3.0, 2.0], rtol=1e-6)


@pytest.mark.parametrize(("rank", "reason"), [(3, "whole number in \\[1, 2\\]"), (0.5, "whole number")])
def test_a_rank_outside_the_adapters_is_refused(rank, reason):
    strategy = FedAvgLoRA(spec=SPEC, max_update_norm_ratio=None, min_train_nodes=2, min_available_nodes=2)
    sent = adapter([0, 0], [0, 0])
    round_of(strategy, [(adapter([1, 2], [1, 2]), rank), (adapter([3, 0], [3, 0]), 1)], sent)
    (rejected,) = strategy.round_log[1].rejected
    assert rejected.site_id == "s0"
    assert re.search(reason, rejected.reason)


def test_a_robust_strategy_refuses_a_lower_rank_with_the_reason():
    strategy = build_strategy("fedmedian", spec=SPEC, max_update_norm_ratio=None, min_train_nodes=2)
    sent = adapter([0, 0], [0, 0])
    round_of(strategy, [(adapter([1, 2], [1, 2]), 2), (adapter([3, 0], [3, 0]), 1), (adapter([1, 1], [1, 1]), 2)], sent)
    (rejected,) = strategy.round_log[1].rejected
    assert "only a plain mean (FedAvg, FedProx) can do, not FedMedian" in rejected.reason


def test_secure_aggregation_rescales_by_the_ranks_the_sites_report():
    strategy = FedAvgLoRA(spec=SPEC, max_update_norm_ratio=None)
    sent = adapter([0, 0], [0, 0])

    class Nodes:
        def get_node_ids(self):
            return [1, 2]

    strategy.configure_train(1, to_array_record(sent), ConfigRecord(), Nodes())
    # The unmasked mean update of a rank-2 and a rank-1 site: component 1 is half the rank-2 site's.
    mean = adapter([2, 1], [2, 1])
    arrays, _ = strategy.aggregate_masked(1, {k: v.astype(np.float64) for k, v in mean.items()}, {1, 2}, [2, 1])
    np.testing.assert_allclose(from_array_record(arrays)[A][:, 0], [2.0, 2.0], rtol=1e-6)


# ---- the site ----


@pytest.fixture(scope="module")
def job() -> Job:
    cfg = compose_config(["experiment=smoke", "train.local_steps=3", "train.batch_size=8", "rounds=2"])
    return Job.from_config(cfg, run_id="rank-run")


def test_a_lower_rank_model_is_the_global_adapter_truncated_at_the_same_scale(job):
    full = load_lora_model(job.model, job.lora, seed=job.seed, device="cpu")
    small = load_lora_model(job.model, job.lora, seed=job.seed, device="cpu", rank=2)
    # A global adapter with every component non-zero; the same one with components 2.. zeroed.
    rng = np.random.default_rng(0)
    arrays = {k: rng.standard_normal(v.shape).astype(np.float32) * 0.1 for k, v in adapter_arrays(full.model).items()}
    zeroed = {k: v.copy() for k, v in arrays.items()}
    for key, value in zeroed.items():
        if "lora_B" in key:
            value[:, 2:] = 0
    load_adapter_arrays(full, zeroed)
    load_adapter_arrays(small, truncate(arrays, 2))
    tokens = full.tokenizer("the patient was discharged home", return_tensors="pt")
    with torch.no_grad():
        a = full.model(**tokens).logits
        b = small.model(**tokens).logits
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_a_site_of_lower_rank_trains_its_components_and_sends_the_rest_back(tmp_path, job):
    data = tmp_path / "site"
    shutil.copytree(REPO / "examples" / "site-a", data)
    site = SiteConfig(site_id="site-a", data_dir=str(data), epsilon_ceiling=8.0, delta=1e-5, lora_rank=2)
    rng = np.random.default_rng(1)
    base = adapter_arrays(load_lora_model(job.model, job.lora, seed=job.seed, device="cpu").model)
    global_adapter = {k: (v + rng.standard_normal(v.shape) * 0.01).astype(np.float32) for k, v in base.items()}

    outcome = train_round(site, job, global_adapter, server_round=1)

    assert outcome.metrics["lora-rank"] == 2
    assert changed_beyond(outcome.adapter, global_adapter, 2) == []
    assert any(not np.array_equal(outcome.adapter[k], global_adapter[k]) for k in global_adapter)


def test_a_bad_lora_rank_is_refused_with_its_key():
    with pytest.raises(ConfigError, match="lora-rank: a LoRA rank >= 1"):
        SiteConfig(site_id="s", data_dir="d", epsilon_ceiling=8.0, delta=1e-5, lora_rank=0)
    site = SiteConfig(site_id="s", data_dir="d", epsilon_ceiling=8.0, delta=1e-5, lora_rank=4)
    assert dataclasses.replace(site, lora_rank=None).lora_rank is None
