"""Flower's strategies behind the reply checks (strategies/checked.py), on hand-made replies.

Every adapter here holds one value v in all four entries, so a squared distance between two
adapters is 4 (v - w)^2 and each expected result is worked out by hand in the comments.
"""

from __future__ import annotations

from unittest.mock import Mock

import numpy as np
import pytest
import yaml
from flwr.app import ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from test_aggregation import SPEC, _instruction, train_metrics

from fedretrain.arrays import AdapterSpec, from_array_record, record_digest, to_array_record
from fedretrain.config import compose_config, conf_dir
from fedretrain.config.declared import strategy_declarations
from fedretrain.config.schema import CentralDPConfig
from fedretrain.errors import ConfigError, QuorumLost
from strategies import STRATEGIES, CheckedStrategy, build_strategy, strategy_options
from strategies.central_dp import central_dp_wrapper, central_epsilon, effective_noise_multiplier

HONEST = {"site-a": 1.0, "site-b": 2.0, "site-c": 2.5, "site-d": 4.0}

pytestmark = pytest.mark.usefixtures("instruction_identity", "propagating_logs")


def filled(v: float) -> dict[str, np.ndarray]:
    return {"lora_A": np.full((1, 2), v, np.float32), "lora_B": np.full((2, 1), v, np.float32)}


def value_of(arrays) -> float:
    """The one value an aggregate holds (every entry is the same)."""
    out = from_array_record(arrays)
    values = np.concatenate([out["lora_A"].ravel(), out["lora_B"].ravel()])
    assert np.allclose(values, values[0], rtol=1e-6), values
    return float(values[0])


def start_round(strategy: CheckedStrategy, server_round: int = 1, v: float = 0.0) -> str:
    """configure_train to every node with a global adapter of v; the digest replies must echo."""
    grid = Mock(spec=Grid)
    grid.get_node_ids.return_value = list(range(1, 10))
    arrays = to_array_record(filled(v))
    list(strategy.configure_train(server_round, arrays, ConfigRecord(), grid))
    return record_digest(arrays)


def reply(node_id: int, site_id: str, v: float, server_round: int, global_hash: str) -> Message:
    content = RecordDict(
        {
            "arrays": to_array_record(filled(v)),
            "metrics": MetricRecord(train_metrics()),
            "site": ConfigRecord({"site-id": site_id, "server-round": server_round, "global-hash": global_hash}),
        }
    )
    return Message(content, reply_to=_instruction(node_id, MessageType.TRAIN))


def replies(values: dict[str, float], server_round: int, global_hash: str) -> list[Message]:
    return [reply(n, site, v, server_round, global_hash) for n, (site, v) in enumerate(values.items(), start=1)]


def aggregate(name: str, values: dict[str, float], **kwargs) -> float:
    """One round of ``name`` (no norm bound, no magnitude bound) over ``values``, from a global adapter of 0."""
    options = kwargs.pop("options", None)
    strategy = build_strategy(name, options=options, spec=SPEC, max_update_norm_ratio=None, **kwargs)
    tag = start_round(strategy)
    arrays, metrics = strategy.aggregate_train(1, replies(values, 1, tag))
    assert metrics["accepted-replies"] == len(values)
    return value_of(arrays)


# --- the registry, the config and the per-strategy files agree ---------------------


def test_every_strategy_has_its_config_file_with_its_algorithms_options():
    declared = strategy_declarations()
    assert set(declared) == set(STRATEGIES)
    for name, options in declared.items():
        assert set(options) == set(strategy_options(name)), name
        assert yaml.safe_load((conf_dir() / "strategy" / f"{name}.yaml").read_text())["name"] == name
        cfg = compose_config([f"strategy={name}"])
        assert cfg.strategy.name == name and cfg.strategy.options == options
        # The common settings come from fedavg.yaml, for every strategy (Bulyan needs 3 replies).
        assert cfg.strategy.quorum == (3 if name == "bulyan" else 2) and cfg.strategy.max_update_norm_ratio == 3.0


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["strategy.name=krums"], "strategy.name: unknown strategy 'krums'; valid names (conf/strategy/): bulyan, "),
        (["strategy=krums"], "strategy: no option 'krums'; choose one of bulyan, fedadagrad, "),
        (["strategy=krum", "+strategy.options.beta=0.1"], "strategy.options.beta: not an option of strategy 'krum'"),
        (
            ["strategy=krum", "strategy.options.num_malicious_nodes=0.5"],
            "strategy.options.num_malicious_nodes: expected int",
        ),
        (["strategy=fedprox", "strategy.options.proximal_mu=true"], "strategy.options.proximal_mu: expected float"),
    ],
)
def test_a_bad_strategy_is_refused_when_the_config_is_parsed(overrides, message):
    # Parsed before anything loads: no model, no Flower run.
    with pytest.raises(ConfigError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
        compose_config(overrides)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["strategy=bulyan", "strategy.options.num_malicious_nodes=1"], "strategy.quorum: bulyan with "),
        (["strategy=multikrum", "strategy.options.num_nodes_to_select=0"], "strategy.options.num_nodes_to_select"),
        (["strategy=fedtrimmedavg", "strategy.options.beta=0.5"], "strategy.options.beta: must be in"),
        (["strategy=fedprox", "strategy.options.proximal_mu=2000.0"], "strategy.options.proximal_mu: must be in"),
        (
            ["strategy=krum", "strategy.central_dp.clipping=fixed", "strategy.max_update_norm_ratio=null"],
            "strategy.central_dp.clipping: the coordinator's epsilon holds for a plain mean",
        ),
        (["strategy.central_dp.clipping=fixed"], "strategy.max_update_norm_ratio: must be null with central_dp"),
        (["simulation.attackers.strength=-1"], "simulation.attackers.strength: must be a finite number >= 0"),
    ],
)
def test_options_an_algorithm_cannot_run_with_are_refused_before_any_site_trains(overrides, message):
    # Parsed before anything loads: no model, no Flower run.
    with pytest.raises(ConfigError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
        compose_config(overrides)


# --- each algorithm's aggregate, by hand ---------------------------------------------


def test_fedavg_averages_every_accepted_site_equally():
    # (1 + 2 + 2.5 + 4 + 100) / 5 = 21.9: an attacker at 100 drags the mean.
    assert aggregate("fedavg", {**HONEST, "site-z": 100.0}) == pytest.approx(21.9)


def test_the_norm_bound_scales_the_outlier_before_any_algorithm():
    # Distances from the global 0: 2v (four entries of v); median 2 * 2.5 = 5, limit 3 * 5 = 15,
    # so 100 is scaled to 7.5: (1 + 2 + 2.5 + 4 + 7.5) / 5 = 3.4. The same for FedMedian: 2.5.
    for name, expected in (("fedavg", 3.4), ("fedmedian", 2.5)):
        strategy = build_strategy(name, spec=SPEC, max_update_norm_ratio=3.0)
        tag = start_round(strategy)
        arrays, _ = strategy.aggregate_train(1, replies({**HONEST, "site-z": 100.0}, 1, tag))
        assert value_of(arrays) == pytest.approx(expected)
        assert strategy.round_log[1].bounded["site-z"]["factor"] == pytest.approx(0.075)


def test_robust_aggregators_ignore_one_attacker():
    values = {**HONEST, "site-z": 100.0}
    # Median of 1, 2, 2.5, 4, 100.
    assert aggregate("fedmedian", values) == pytest.approx(2.5)
    # beta 0.2 of 5 cuts one value at each end: (2 + 2.5 + 4) / 3.
    assert aggregate("fedtrimmedavg", values, options={"beta": 0.2}) == pytest.approx(8.5 / 3)
    # Krum, f = 1: each scores the squared distances (x4) to its n - f - 2 = 2 nearest:
    # 1 -> (1 + 2.25) 4 = 13; 2 -> (0.25 + 1) 4 = 5; 2.5 -> (0.25 + 2.25) 4 = 10; 4 -> (2.25 + 4) 4 = 25.
    assert aggregate("krum", values, options={"num_malicious_nodes": 1}) == pytest.approx(2.0)
    # Multi-Krum keeps the 2 best (2 and 2.5) and averages them.
    assert aggregate("multikrum", values, options={"num_malicious_nodes": 1, "num_nodes_to_select": 2}) == (
        pytest.approx(2.25)
    )


def test_bulyan_selects_then_trims_and_needs_four_f_plus_three_replies():
    # f = 1, n = 7: Multi-Krum keeps theta = n - 2f = 5 by the score over n - f - 2 = 4 nearest
    # (x4): 1 -> 13.5, 2 -> 4.5, 2.5 -> 3.75, 3 -> 2.5, 3.5 -> 3.75, 4 -> 7.5, 100 -> huge; so
    # 2, 2.5, 3, 3.5, 4. Their median is 3; the beta = theta - 2f = 3 nearest it (3, 2.5, 3.5) average 3.
    values = {"s1": 1.0, "s2": 2.0, "s3": 2.5, "s4": 3.0, "s5": 3.5, "s6": 4.0, "sz": 100.0}
    assert aggregate("bulyan", values, options={"num_malicious_nodes": 1}) == pytest.approx(3.0)

    # With 5 replies Bulyan aggregates nothing: the round is lost, not averaged some other way.
    strategy = build_strategy("bulyan", options={"num_malicious_nodes": 1}, spec=SPEC)
    tag = start_round(strategy)
    with pytest.raises(QuorumLost, match=r"^round 1: Bulyan aggregated nothing from 4 accepted replies"):
        strategy.aggregate_train(1, replies(HONEST, 1, tag))


def test_fedadam_takes_one_adaptive_server_step():
    # Global 0, the average 2.375 = delta; m = 0.1 delta = 0.2375, v = 0.01 delta^2, sqrt(v) = 0.2375;
    # eta_norm = 0.1 sqrt(1 - 0.99^2) / (1 - 0.9^2) = 0.0742460; step = eta_norm 0.2375 / (0.2375 + 0.001).
    expected = 0.1 * np.sqrt(1 - 0.99**2) / (1 - 0.9**2) * 0.2375 / 0.2385
    assert aggregate("fedadam", HONEST) == pytest.approx(expected, rel=1e-5)
    assert expected == pytest.approx(0.0739347, rel=1e-5)


def test_fedprox_sends_its_proximal_term_to_the_sites():
    strategy = build_strategy("fedprox", options={"proximal_mu": 0.25}, spec=SPEC)
    grid = Mock(spec=Grid)
    grid.get_node_ids.return_value = [3, 4]
    messages = list(strategy.configure_train(1, to_array_record(filled(0.0)), ConfigRecord(), grid))
    assert [m.content["config"]["proximal-mu"] for m in messages] == [0.25, 0.25]
    assert all("global-hash" in m.content["config"] for m in messages)


# --- what the checks do for every algorithm ------------------------------------------


def test_a_bad_reply_never_reaches_the_algorithm():
    # A NaN adapter and a reply echoing another round are left out; the median is of 1, 2, 2.5, 4.
    strategy = build_strategy("fedmedian", spec=SPEC, max_update_norm_ratio=None)
    tag = start_round(strategy)
    bad = [reply(8, "site-x", float("nan"), 1, tag), reply(9, "site-y", 50.0, 2, tag)]
    arrays, metrics = strategy.aggregate_train(1, replies(HONEST, 1, tag) + bad)
    assert value_of(arrays) == pytest.approx(2.25)
    assert (metrics["accepted-replies"], metrics["rejected-replies"]) == (4, 2)
    assert sorted(r.site_id for r in strategy.round_log[1].rejected) == ["site-x", "site-y"]


def test_the_replies_as_received_are_left_as_they_were():
    # FedTrimmedAvg pops each tensor from the record it is handed; the site's reply keeps its own.
    strategy = build_strategy("fedtrimmedavg", spec=SPEC, max_update_norm_ratio=None)
    tag = start_round(strategy)
    received = replies(HONEST, 1, tag)
    strategy.aggregate_train(1, received)
    assert all(sorted(msg.content["arrays"].keys()) == ["lora_A", "lora_B"] for msg in received)


def test_an_algorithm_that_returns_another_adapter_is_an_error():
    class Broken(type(STRATEGIES["fedavg"]())):
        def aggregate_train(self, server_round, replies):
            return to_array_record({"lora_A": np.zeros((1, 2), np.float32)}), None

    strategy = CheckedStrategy(Broken(), spec=SPEC, max_update_norm_ratio=None)
    tag = start_round(strategy)
    with pytest.raises(Exception, match=r"round 1: Broken's aggregate: adapter keys differ: missing \['lora_B'\]"):
        strategy.aggregate_train(1, replies(HONEST, 1, tag))


@pytest.mark.parametrize(
    ("name", "state"),
    [
        ("fedadam", ["m_t.lora_A", "m_t.lora_B", "v_t.lora_A", "v_t.lora_B"]),
        ("fedavgm", ["momentum_vector.0", "momentum_vector.1"]),
    ],
)
def test_a_resumed_server_optimiser_keeps_its_state(name, state):
    # Two rounds uninterrupted, against round 1, a checkpoint, a new strategy, round 2.
    def round_of(strategy, server_round, start):
        tag = start_round(strategy, server_round, start)
        arrays, _ = strategy.aggregate_train(server_round, replies(HONEST, server_round, tag))
        return value_of(arrays)

    options = {"server_momentum": 0.9} if name == "fedavgm" else None
    steady = build_strategy(name, options=options, spec=SPEC)
    first = round_of(steady, 1, 0.0)
    state_json, tensors = steady.state_dict()
    second = round_of(steady, 2, first)

    resumed = build_strategy(name, options=options, spec=SPEC)
    resumed.load_state_dict(state_json, tensors)
    assert sorted(tensors) == state
    assert round_of(resumed, 2, first) == second
    fresh = build_strategy(name, options=options, spec=SPEC)
    assert round_of(fresh, 2, first) != pytest.approx(second)  # without the moments it would differ


# --- client-level DP at the coordinator (strategies/central_dp.py) --------------------


def test_fixed_clipping_clips_each_update_to_the_norm_before_the_algorithm():
    # Global 0; updates of 1 and 2 in four entries have norms 2 and 4; clipped to norm 1 both
    # become 0.5 everywhere, and their mean is 0.5. The noise (sigma 1e-9) is nothing here.
    wrap = central_dp_wrapper(CentralDPConfig(clipping="fixed", noise_multiplier=1e-9, clipping_norm=1.0), 2)
    strategy = build_strategy("fedavg", spec=SPEC, max_update_norm_ratio=None, wrap=wrap)
    tag = start_round(strategy)
    arrays, _ = strategy.aggregate_train(1, replies({"site-a": 1.0, "site-b": 2.0}, 1, tag))
    assert value_of(arrays) == pytest.approx(0.5, abs=1e-6)
    assert isinstance(strategy.algorithm, STRATEGIES["fedavg"])


def test_the_noise_on_the_aggregate_is_sigma_times_the_norm_over_the_quorum(monkeypatch):
    # sigma 2, norm 1, quorum 4: the mean's sensitivity is 2 C / q, so std 2 x 1 / (4 / 2) = 1 on every value
    # (both updates 1e-4 from the global 0).
    spec = AdapterSpec(entries=(("lora_A", (1, 20_000), "float32"), ("lora_B", (20_000, 1), "float32")))
    wrap = central_dp_wrapper(CentralDPConfig(clipping="fixed", noise_multiplier=2.0, clipping_norm=1.0), 4)
    strategy = build_strategy("fedavg", spec=spec, max_update_norm_ratio=None, wrap=wrap)
    zeros = {"lora_A": np.zeros((1, 20_000), np.float32), "lora_B": np.zeros((20_000, 1), np.float32)}
    grid = Mock(spec=Grid)
    grid.get_node_ids.return_value = [1, 2]
    global_arrays = to_array_record(zeros)
    list(strategy.configure_train(1, global_arrays, ConfigRecord(), grid))
    tag = record_digest(global_arrays)
    sent = []
    for node, site in ((1, "site-a"), (2, "site-b")):
        content = RecordDict(
            {
                "arrays": to_array_record({k: v + np.float32(1e-4) for k, v in zeros.items()}),
                "metrics": MetricRecord(train_metrics()),
                "site": ConfigRecord({"site-id": site, "server-round": 1, "global-hash": tag}),
            }
        )
        sent.append(Message(content, reply_to=_instruction(node, MessageType.TRAIN)))
    np.random.seed(0)
    arrays, _ = strategy.aggregate_train(1, sent)
    values = np.concatenate([v.ravel() for v in from_array_record(arrays).values()])
    assert abs(values.std() - 1.0) < 0.02 and abs(values.mean()) < 0.02


def test_adaptive_clipping_keeps_its_norm_across_a_resume():
    wrap = central_dp_wrapper(CentralDPConfig(clipping="adaptive", clipping_norm=0.3), 2)
    strategy = build_strategy("fedavg", spec=SPEC, wrap=wrap)
    tag = start_round(strategy)
    strategy.aggregate_train(1, replies({"site-a": 1.0, "site-b": 2.0}, 1, tag))
    state, tensors = strategy.state_dict()
    moved = strategy.strategy.clipping_norm
    assert moved != 0.3 and state["server"] == {"clipping_norm": moved}

    resumed = build_strategy("fedavg", spec=SPEC, wrap=wrap)
    resumed.load_state_dict(state, tensors)
    assert resumed.strategy.clipping_norm == moved


def test_the_coordinators_epsilon_is_opacus_rdp_of_one_release_a_round():
    # sigma 1.1, 3 rounds, no amplification (sample rate 1): opacus' accountant called directly.
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    accountant.history = [(1.1, 1.0, 3)]
    cfg = CentralDPConfig(clipping="fixed", noise_multiplier=1.1, delta=1e-5)
    assert central_epsilon(cfg, 3, 2) == pytest.approx(accountant.get_epsilon(delta=1e-5))
    assert central_epsilon(CentralDPConfig(), 3, 2) is None
    assert central_epsilon(cfg, 6, 2) > central_epsilon(cfg, 3, 2)
    # Adaptive, sigma 1 and a count noise of 1: Flower gives the update 1.1547 (as if the count's
    # sensitivity were 1/2); the two releases together have (1.1547^-2 + 1^-2)^-1/2 = 0.7559.
    adaptive = CentralDPConfig(clipping="adaptive", noise_multiplier=1.0)
    assert effective_noise_multiplier(adaptive, 2) == pytest.approx((0.75 + 1.0) ** -0.5)
    accountant = RDPAccountant()
    accountant.history = [((0.75 + 1.0) ** -0.5, 1.0, 3)]
    assert central_epsilon(adaptive, 3, 2) == pytest.approx(accountant.get_epsilon(delta=1e-5))


def test_adaptive_clipping_noises_a_round_by_the_norm_it_clipped_with(monkeypatch):
    # Flower 1.41 adapts the norm before it adds the round's noise; here the noise uses the old one.
    wrap = central_dp_wrapper(CentralDPConfig(clipping="adaptive", clipping_norm=0.3), 2)
    strategy = build_strategy("fedavg", spec=SPEC, max_update_norm_ratio=None, wrap=wrap)
    seen = []
    monkeypatch.setattr(
        "flwr.serverapp.strategy.dp_adaptive_clipping.compute_stdv", lambda z, c, n: seen.append(c) or 0.0
    )
    tag = start_round(strategy)
    strategy.aggregate_train(1, replies({"site-a": 1.0, "site-b": 2.0}, 1, tag))
    assert seen == [0.3] and strategy.strategy.clipping_norm != 0.3


def test_a_reply_that_sends_the_global_adapter_back_is_left_out():
    # A free-rider returns what it was sent (global 0 here); DP noise makes an honest update differ.
    strategy = build_strategy("fedavg", spec=SPEC, max_update_norm_ratio=None)
    tag = start_round(strategy)
    arrays, metrics = strategy.aggregate_train(1, replies({"site-a": 1.0, "site-b": 2.0, "site-z": 0.0}, 1, tag))
    assert value_of(arrays) == pytest.approx(1.5) and metrics["rejected-replies"] == 1
    (rejected,) = strategy.round_log[1].rejected
    assert rejected.site_id == "site-z" and "the global adapter unchanged" in rejected.reason


def test_ffa_lora_replies_must_send_lora_a_back_as_they_got_it():
    # lora_A frozen (lora.freeze_a): site-c changed it and is left out; the aggregate keeps the
    # global lora_A exactly and averages lora_B: (1 + 2) / 2.
    strategy = build_strategy("fedavg", spec=SPEC, max_update_norm_ratio=None, frozen=["lora_A"])
    grid = Mock(spec=Grid)
    grid.get_node_ids.return_value = [1, 2, 3]
    start = {"lora_A": np.full((1, 2), 0.25, np.float32), "lora_B": np.zeros((2, 1), np.float32)}
    sent_global = to_array_record(start)
    list(strategy.configure_train(1, sent_global, ConfigRecord(), grid))
    tag = record_digest(sent_global)

    def ffa_reply(node, site, a, b):
        content = RecordDict(
            {
                "arrays": to_array_record(
                    {"lora_A": np.full((1, 2), a, np.float32), "lora_B": np.full((2, 1), b, np.float32)}
                ),
                "metrics": MetricRecord(train_metrics()),
                "site": ConfigRecord({"site-id": site, "server-round": 1, "global-hash": tag}),
            }
        )
        return Message(content, reply_to=_instruction(node, MessageType.TRAIN))

    arrays, metrics = strategy.aggregate_train(
        1, [ffa_reply(1, "site-a", 0.25, 1.0), ffa_reply(2, "site-b", 0.25, 2.0), ffa_reply(3, "site-c", 0.5, 3.0)]
    )
    out = from_array_record(arrays)
    np.testing.assert_array_equal(out["lora_A"], start["lora_A"])
    np.testing.assert_allclose(out["lora_B"], 1.5)
    (rejected,) = strategy.round_log[1].rejected
    assert rejected.site_id == "site-c" and "1 frozen tensor(s) changed" in rejected.reason
