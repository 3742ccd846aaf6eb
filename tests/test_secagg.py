"""Secure aggregation: the masks (fedretrain/secagg.py), the site's mod (client/secagg.py) and the
coordinator's protocol (server/cycle/secagg.py), run through the round loop.

The sites here are Flower ClientApps in this process, each with the secure-aggregation mod
around a train function that adds a known update to the global adapter; each keeps its
Context between messages as a SuperNode does. Flower's simulation engine runs the same
protocol with real training in tests/test_secagg_e2e.py.
"""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.secagg import MASKED_RECORD, secure_aggregation_mod
from fedretrain.arrays import AdapterSpec, from_array_record, to_array_record
from fedretrain.config.schema import SecureAggregationConfig
from fedretrain.errors import ConfigError, QuorumLost
from fedretrain.secagg import (
    RECORD_KEY_CONFIGS,
    SECURE_STAGE,
    Key,
    Stage,
    mask,
    mask_stream,
    quantize_update,
    unmasked_mean,
)
from server.cycle.rounds import RoundPolicy, run_rounds
from server.cycle.secagg import _share_counts
from strategies import FedAvgLoRA
from strategies.validation import TRAIN_METRICS

SPEC = AdapterSpec(entries=(("lora_A", (2, 3), "float32"), ("lora_B", (3, 2), "float32")))
SITE_METRICS = dict(zip(TRAIN_METRICS, (1.0, 8.0, 1e-5, 1.1, 0.05, 5), strict=True))
# The quantisation step at the defaults: 2 x 1.0 / 2**22.
STEP = 2.0 / 2**22

pytestmark = pytest.mark.usefixtures("instruction_identity", "propagating_logs")


# ---- the arithmetic, by hand ----


def test_the_mask_stream_is_the_seeds_own_uniform_and_in_range():
    a = mask_stream(b"seed-1", 2**32, [(2, 3), (4,)])
    assert [x.shape for x in a] == [(2, 3), (4,)]
    assert all(np.array_equal(x, y) for x, y in zip(a, mask_stream(b"seed-1", 2**32, [(2, 3), (4,)]), strict=True))
    assert not np.array_equal(a[0], mask_stream(b"seed-2", 2**32, [(2, 3)])[0])
    big = mask_stream(b"x", 2**8, [(100_000,)])[0]
    assert big.min() >= 0 and big.max() <= 255
    # Uniform over 256 values: each about 100000 / 256 = 390.6 times (+-5 sigma is about +-98).
    counts = np.bincount(big, minlength=256)
    assert np.all(np.abs(counts - 390.6) < 100)
    with pytest.raises(ValueError, match="power of two"):
        mask_stream(b"x", 1000, [(1,)])


def test_quantised_values_of_two_sites_dequantise_to_their_mean():
    # c = 1, T = 4 levels: x -> (x + 1) * 4 / 2, so 0 -> 2 and 0.5 -> 3 exactly (no rounding).
    q0, clipped0 = quantize_update([np.array([0.0, 0.5])], 1.0, 4)
    q1, clipped1 = quantize_update([np.array([0.5, 3.0])], 1.0, 4)  # 3.0 is clipped to 1 -> 4
    assert q0[0].tolist() == [2, 3] and q1[0].tolist() == [3, 4]
    assert (clipped0, clipped1) == (0, 1)
    # The sum [5, 7] dequantises to 5 * 2/4 - 1 = 1.5 and 2.5; minus (2 - 1) * c = 0.5 and 1.5; / 2.
    (mean,) = unmasked_mean([q0[0] + q1[0]], 2, 1.0, 4)
    assert mean.tolist() == [0.25, 0.75]


def test_pairwise_masks_cancel_and_private_masks_come_off_with_their_seeds():
    quantized = {1: [np.array([10, 20])], 2: [np.array([30, 40])], 3: [np.array([50, 60])]}
    pair = {frozenset({1, 2}): b"k12", frozenset({1, 3}): b"k13", frozenset({2, 3}): b"k23"}
    seeds = {1: b"s1", 2: b"s2", 3: b"s3"}
    masked = {
        n: mask(q, 2**32, seeds[n], {m: pair[frozenset({n, m})] for m in quantized if m != n}, n)
        for n, q in quantized.items()
    }
    assert all(m[0].dtype == np.uint32 for m in masked.values())
    assert not np.array_equal(masked[1][0], quantized[1][0])  # a masked vector hides its values
    total = sum(m[0].astype(np.int64) for m in masked.values())
    total -= sum(mask_stream(seeds[n], 2**32, [(2,)])[0] for n in seeds)
    assert np.mod(total, 2**32).tolist() == [90, 120]


def test_share_counts_follow_flowers_rule():
    cfg = SecureAggregationConfig(enabled=True)
    assert _share_counts(cfg, 2) == (2, 2)
    assert _share_counts(cfg, 4) == (4, 3)  # raised to a majority
    assert _share_counts(SecureAggregationConfig(num_shares=0.5), 10) == (5, 3)  # 5 shares: odd
    assert _share_counts(SecureAggregationConfig(num_shares=0.4, reconstruction_threshold=0.8), 10) == (5, 4)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"num_shares": 0.0}, "num_shares: must be in"),
        ({"modulus_range": 3 * 2**20}, "power of two"),
        ({"modulus_range": 2**40}, "up to 2\\*\\*32"),
        ({"modulus_range": 2**20, "quantization_range": 2**22}, "must exceed"),
        ({"clipping_range": -1.0}, "clipping_range"),
    ],
)
def test_bad_settings_are_refused_with_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        SecureAggregationConfig(enabled=True, **override)


def test_the_config_refuses_what_cannot_see_the_updates():
    from fedretrain.config import compose_config

    base = ["strategy.secure_aggregation.enabled=true"]
    with pytest.raises(ConfigError, match="max_update_norm_ratio: must be null"):
        compose_config(base)
    with pytest.raises(ConfigError, match="only a plain mean"):
        compose_config([*base, "strategy=fedmedian", "strategy.max_update_norm_ratio=null"])
    with pytest.raises(ConfigError, match="central_dp.clipping: must be off"):
        compose_config([*base, "strategy.max_update_norm_ratio=null", "strategy.central_dp.clipping=fixed"])
    cfg = compose_config([*base, "strategy.max_update_norm_ratio=null", "strategy=fedprox"])
    assert cfg.strategy.secure_aggregation.enabled and cfg.strategy.name == "fedprox"


# ---- the protocol, through the round loop ----


def update_of(node: int) -> float:
    """What node ``node`` adds to every adapter value (a different update per site)."""
    return 0.001 * (node % 7 + 1)


class Sites:
    """Flower's Grid as ``run_rounds`` uses it, answered by one ClientApp with the mod, per node.

    ``drop[stage]``: nodes that do not answer that stage (silent); ``fail_training``: nodes
    whose train function fails (an error reply, as a site out of budget sends);
    ``tamper``: nodes whose masked update is replaced by one of the wrong dtype.
    """

    def __init__(self, nodes, *, drop=None, fail_training=(), tamper=(), tamper_unmask=None) -> None:
        self.nodes = list(nodes)
        self.drop = drop or {}
        self.fail_training = set(fail_training)
        self.tamper = set(tamper)
        self.tamper_unmask = tamper_unmask or {}  # node -> f(owners, shares) -> (owners, shares)
        self.contexts = {
            n: Context(run_id=1, node_id=n, node_config={}, state=RecordDict(), run_config={}) for n in self.nodes
        }
        self.sent = 0
        self.unmask_requests: dict[int, tuple[list[int], list[int]]] = {}
        self.plain_updates_seen = 0
        self.app = ClientApp(mods=[secure_aggregation_mod])

        @self.app.train()
        def train(msg: Message, context: Context) -> Message:
            node = context.node_id
            if node in self.fail_training:
                return Message(Error(code=4102, reason="PrivacyBudgetExceeded: no budget left"), reply_to=msg)
            assert RECORD_KEY_CONFIGS not in msg.content.config_records  # the handler gets a plain train message
            assert SECURE_STAGE in msg.content.config_records  # marked by the site's own mod
            config = msg.content["config"]
            arrays = from_array_record(msg.content["arrays"])
            trained = {k: v + np.float32(update_of(node)) for k, v in arrays.items()}
            site = ConfigRecord(
                {
                    "site-id": f"site-{node}",
                    "server-round": config["server-round"],
                    "global-hash": config["global-hash"],
                }
            )
            content = RecordDict(
                {"arrays": to_array_record(trained), "metrics": MetricRecord(dict(SITE_METRICS)), "site": site}
            )
            return Message(content, reply_to=msg)

        @self.app.evaluate()
        def evaluate(msg: Message, context: Context) -> Message:  # the sites' scores are not under test here
            return Message(Error(code=4109, reason="EvaluationRefused: not in this test"), reply_to=msg)

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for msg in messages:
            self.sent += 1
            msg.metadata.__dict__["_message_id"] = f"m{self.sent}"
            node = msg.metadata.dst_node_id
            configs = msg.content.config_records.get(RECORD_KEY_CONFIGS)
            stage = configs[Key.STAGE] if configs is not None else None
            if stage == Stage.UNMASK:
                self.unmask_requests[node] = (
                    list(configs[Key.ACTIVE_NODE_ID_LIST]),
                    list(configs[Key.DEAD_NODE_ID_LIST]),
                )
            if node in self.drop.get(stage, ()):
                continue
            reply = self.app(msg, self.contexts[node])
            reply.metadata.__dict__["_src_node_id"] = node
            if reply.has_content() and "arrays" in reply.content.array_records:
                self.plain_updates_seen += 1
            if node in self.tamper_unmask and stage == Stage.UNMASK and not reply.has_error():
                config = reply.content.config_records[RECORD_KEY_CONFIGS]
                owners, shares = self.tamper_unmask[node](list(config[Key.NODE_ID_LIST]), list(config[Key.SHARE_LIST]))
                config[Key.NODE_ID_LIST], config[Key.SHARE_LIST] = owners, shares
            if node in self.tamper and reply.has_content() and MASKED_RECORD in reply.content.array_records:
                masked = from_array_record(reply.content[MASKED_RECORD])
                reply.content[MASKED_RECORD] = to_array_record({k: v.astype(np.int64) for k, v in masked.items()})
            replies.append(reply)
        return replies


def one_round(sites: Sites, *, quorum: int = 2, settings: SecureAggregationConfig | None = None):
    strategy = FedAvgLoRA(spec=SPEC, max_update_norm_ratio=None, min_train_nodes=quorum, min_available_nodes=quorum)
    start = to_array_record({k: np.full(shape, 0.5, np.float32) for k, shape, _ in SPEC.entries})
    final = run_rounds(
        sites,
        strategy,
        start,
        first_round=1,
        num_rounds=1,
        policy=RoundPolicy(deadline_s=5.0, quorum=quorum, wait_for=len(sites.nodes)),
        train_config=ConfigRecord(),
        evaluate_config=ConfigRecord(),
        evaluate_fn=lambda r, a: None,
        on_round_end=lambda r, a: None,
        secure=settings or SecureAggregationConfig(enabled=True),
    )
    return from_array_record(final), strategy.round_log[1]


def assert_mean_of(arrays, nodes):
    expected = 0.5 + np.mean([update_of(n) for n in nodes])
    for value in arrays.values():
        assert value.dtype == np.float32
        np.testing.assert_allclose(value, expected, atol=STEP + 1e-7)


def test_the_coordinator_gets_the_mean_update_and_never_a_single_one():
    sites = Sites([11, 12, 13])

    arrays, entry = one_round(sites)

    # (0.005 + 0.006 + 0.007) / 3 on top of 0.5, to within one quantisation step.
    assert_mean_of(arrays, [11, 12, 13])
    assert sites.plain_updates_seen == 0  # no reply carried an adapter
    assert sorted(entry.accepted) == ["site-11", "site-12", "site-13"]
    figures = entry.secure
    assert figures["sampled"] == 3 and figures["summed"] == 3 and figures["dropped"] == []
    assert set(figures["seconds"]) >= {"setup", "share_keys", "collect_masked_vectors", "unmask"}
    assert entry.bytes_up == sum(b["up"] for b in figures["bytes"].values())
    # Every site was asked for the mask seeds of all three, and for no private key.
    assert all(sorted(active) == [11, 12, 13] and dead == [] for active, dead in sites.unmask_requests.values())


def test_a_site_that_fails_to_train_drops_out_and_its_pairwise_masks_are_removed():
    sites = Sites([11, 12, 13, 14], fail_training=[12])

    arrays, entry = one_round(sites)

    assert_mean_of(arrays, [11, 13, 14])
    assert entry.secure["summed"] == 3 and entry.secure["dropped"] == [{"node_id": 12, "site_id": None}]
    assert [r.node_id for r in entry.rejected] == [12]
    # Its private key was asked for, its mask seed never: no site's two secrets are both revealed.
    for active, dead in sites.unmask_requests.values():
        assert dead == [12] and 12 not in active


def test_a_site_silent_at_unmask_still_counts_its_masks_come_off_with_the_others_shares():
    sites = Sites([11, 12, 13], drop={Stage.UNMASK: {13}})

    arrays, entry = one_round(sites)

    assert_mean_of(arrays, [11, 12, 13])
    assert entry.secure["summed"] == 3


def test_a_malformed_masked_update_is_left_out_like_a_dropout():
    sites = Sites([11, 12, 13], tamper=[13])

    arrays, entry = one_round(sites)

    assert_mean_of(arrays, [11, 12])
    (rejected,) = entry.rejected
    assert rejected.node_id == 13 and "dtype int64, expected uint32" in rejected.reason


def test_too_many_dropouts_abort_the_round_before_anything_is_used():
    sites = Sites([11, 12, 13], drop={Stage.SHARE_KEYS: {12, 13}})

    with pytest.raises(QuorumLost, match="1 site\\(s\\) left after share keys, the quorum is 2"):
        one_round(sites)


def test_a_sum_that_is_not_a_valid_adapter_fails_the_round():
    from flwr.serverapp.exception import AggregationError

    # Each site's update is 0.001-0.007 beyond a clipping range of 1e-4: clipped to it (the
    # site logs so; it sends no count); with max_abs_value the sum is checked like any aggregate.
    sites = Sites([11, 12])
    arrays, entry = one_round(sites, settings=SecureAggregationConfig(enabled=True, clipping_range=1e-4))
    assert "secagg-clipped" not in entry.accepted["site-11"]
    np.testing.assert_allclose(arrays["lora_A"], 0.5 + 1e-4, atol=1e-9)
    # The modulus is the smallest power of two above the largest sum, 2 x 2**22 (each quantised value <= 2**22).
    assert entry.secure["modulus"] == 2**24

    strategy = FedAvgLoRA(spec=SPEC, max_update_norm_ratio=None, max_abs_value=0.1)
    strategy.configure_train(
        1, to_array_record({k: np.zeros(s, np.float32) for k, s, _ in SPEC.entries}), ConfigRecord(), Sites([1, 2])
    )
    with pytest.raises(AggregationError, match="securely aggregated adapter of 2 sites"):
        strategy.aggregate_masked(1, {k: np.full(s, 0.2) for k, s, _ in SPEC.entries}, {1, 2})


def test_ring_neighbourhoods_with_a_dropout_still_give_the_mean():
    # 6 sites, each secret shared among 3 (itself and one neighbour on either side), threshold 2.
    sites = Sites([11, 12, 13, 14, 15, 16], fail_training=[14])

    arrays, entry = one_round(sites, settings=SecureAggregationConfig(enabled=True, num_shares=0.5))

    assert (entry.secure["num-shares"], entry.secure["threshold"]) == (3, 2)
    assert_mean_of(arrays, [11, 12, 13, 15, 16])
    # Only 14's two neighbours were asked for its private key; nobody for its mask seed.
    asked_for_14 = [node for node, (_, dead) in sites.unmask_requests.items() if 14 in dead]
    assert len(asked_for_14) == 2
    assert all(14 not in active for active, _ in sites.unmask_requests.values())


def test_a_malformed_unmask_reply_drops_its_site_and_the_others_shares_suffice():
    sites = Sites([11, 12, 13], tamper_unmask={13: lambda owners, shares: (owners + owners[:1], shares + shares[:1])})

    arrays, entry = one_round(sites)

    assert_mean_of(arrays, [11, 12, 13])  # 13's vector is in the sum; its seed rebuilt from 11 and 12


def test_a_corrupted_share_ends_the_round_with_a_reason_not_a_crash():
    garbage = {n: (lambda owners, shares: (owners, [b"\x00" * len(s) for s in shares])) for n in (12, 13)}
    sites = Sites([11, 12, 13], tamper_unmask=garbage)

    with pytest.raises(QuorumLost, match="do not combine|not the one it announced"):
        one_round(sites)


def test_a_site_refuses_settings_that_would_let_the_coordinator_unmask_it():
    app = ClientApp(mods=[secure_aggregation_mod])
    context = Context(run_id=1, node_id=5, node_config={}, state=RecordDict(), run_config={})

    @app.train()
    def train(msg: Message, context: Context) -> Message:  # never reached: setup is the mod's
        raise AssertionError("the setup stage reached the train function")

    def setup(shares: int, threshold: int) -> Message:
        config = {
            Key.STAGE: Stage.SETUP,
            Key.SAMPLE_NUMBER: 4,
            Key.SHARE_NUMBER: shares,
            Key.THRESHOLD: threshold,
            Key.CLIPPING_RANGE: 1.0,
            Key.TARGET_RANGE: 2**22,
            Key.MOD_RANGE: 2**32,
            Key.MAX_WEIGHT: 1.0,
        }
        return Message(RecordDict({RECORD_KEY_CONFIGS: ConfigRecord(config)}), dst_node_id=5, message_type="train")

    for shares, threshold in ((1, 1), (4, 2), (4, 1)):
        reply = app(setup(shares, threshold), context)
        assert reply.has_error() and "a threshold above half of them" in reply.error.reason, (shares, threshold)
    assert not app(setup(4, 3), context).has_error()
