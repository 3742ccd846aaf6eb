"""Malicious sites in simulation: what each behaviour sends, who the attackers are, the mod that sends it.

Hand-worked: a global adapter G of 1 everywhere and an honest update U of 3 everywhere.
"""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Error, Message, MessageType, RecordDict
from test_aggregation import _instruction

from fedretrain.arrays import from_array_record, to_array_record
from fedretrain.attacks import ATTACKS, attacked
from fedretrain.config import AttackersConfig, compose_config
from fedretrain.errors import ConfigError
from simulation.attacks import attack_mod, attacker_ids, poisoned

G = {"a": np.full((2, 3), 1.0, np.float32)}
U = {"a": np.full((2, 3), 3.0, np.float32)}

pytestmark = pytest.mark.usefixtures("instruction_identity", "propagating_logs")


@pytest.mark.parametrize(
    ("behaviour", "strength", "expected"),
    [
        ("sign_flip", None, -1.0),  # 1 - (3 - 1)
        ("sign_flip", 4.0, -7.0),  # 1 - 4 (3 - 1)
        ("scale", None, 21.0),  # 1 + 10 (3 - 1)
        ("free_ride", None, 1.0),  # the global adapter itself
        ("backdoor", None, 3.0),  # its honest update (the poison is in its notes)
    ],
)
def test_each_behaviour_sends_what_it_says(behaviour, strength, expected):
    sent = attacked(behaviour, G, U, strength, np.random.default_rng(0))
    assert sent["a"].dtype == np.float32
    np.testing.assert_allclose(sent["a"], expected)


def test_noise_is_as_large_as_the_update():
    # rms(U - G) = 2, so the noise's std is 2 at strength 1 (and 1 at 0.5), around G.
    big_g, big_u = {"a": np.ones(40_000, np.float32)}, {"a": np.full(40_000, 3.0, np.float32)}
    for strength, std in ((None, 2.0), (0.5, 1.0)):
        sent = attacked("noise", big_g, big_u, strength, np.random.default_rng(1))["a"]
        assert abs(sent.mean() - 1.0) < 0.05 and abs(sent.std() - std) < 0.05


def test_attackers_are_a_share_of_the_sites_chosen_by_the_seed():
    sites = [f"site-{i:02d}" for i in range(10)]
    chosen = attacker_ids(sites, AttackersConfig(share=0.3), seed=0)
    assert len(chosen) == 3 and set(chosen) <= set(sites) and chosen == sorted(chosen)
    assert attacker_ids(sites, AttackersConfig(share=0.3), seed=0) == chosen
    assert attacker_ids(sites, AttackersConfig(share=0.0), seed=0) == []
    with pytest.raises(ConfigError, match=r"0.1 of 3 sites is 0 attacker\(s\)"):
        attacker_ids(sites[:3], AttackersConfig(share=0.1), seed=0)
    with pytest.raises(ConfigError, match=r"0.9 of 3 sites is 3 attacker\(s\)"):
        attacker_ids(sites[:3], AttackersConfig(share=0.9), seed=0)


def _train_reply(instruction: Message, site: str, arrays: dict[str, np.ndarray]) -> Message:
    content = RecordDict({"arrays": to_array_record(arrays), "site": ConfigRecord({"site-id": site})})
    return Message(content, reply_to=instruction)


def test_the_mod_changes_only_an_attackers_train_reply():
    mod = attack_mod(["site-b"], AttackersConfig(share=0.5, behaviour="sign_flip"), seed=0)
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    instruction = _instruction(2, MessageType.TRAIN)
    instruction.content = RecordDict(
        {"arrays": to_array_record(G), "config": ConfigRecord({"server-round": 1, "global-hash": "x"})}
    )

    sent = {
        site: from_array_record(mod(instruction, context, lambda m, c, s=site: _train_reply(m, s, U)).content["arrays"])
        for site in ("site-a", "site-b")
    }

    np.testing.assert_allclose(sent["site-a"]["a"], 3.0)  # honest: as trained
    np.testing.assert_allclose(sent["site-b"]["a"], -1.0)  # the attacker: 1 - (3 - 1)
    refused = mod(instruction, context, lambda m, c: Message(Error(code=4102, reason="budget"), reply_to=m))
    assert refused.has_error() and refused.error.code == 4102


def test_a_backdoor_writes_its_phrase_into_a_share_of_the_notes():
    records = [{"text": f"note {i}", "specialty": "x"} for i in range(8)]
    out = poisoned(records, "Call Dr. X.", 0.25, seed=3)
    marked = [r for r in out if r["text"].endswith(" Call Dr. X.")]
    assert len(marked) == 2 and all(r["specialty"] == "x" for r in out)
    assert [r["text"].removesuffix(" Call Dr. X.") for r in out] == [r["text"] for r in records]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["simulation.attackers.behaviour=flip"], "simulation.attackers.behaviour: must be one of sign_flip, scale"),
        (["simulation.attackers.share=1.0"], r"simulation.attackers.share: must be in \[0, 1\)"),
        (
            [
                "simulation.attackers.share=0.5",
                "simulation.attackers.behaviour=backdoor",
                "simulation.sites_dir=examples/sites",
            ],
            "simulation.attackers.behaviour: backdoor writes its phrase into generated training notes",
        ),
    ],
)
def test_bad_attacker_settings_are_refused_when_the_config_is_parsed(overrides, message):
    with pytest.raises(ConfigError, match="^" + message):
        compose_config(overrides)


def test_every_behaviour_has_a_default_strength():
    assert set(ATTACKS) == {"sign_flip", "scale", "noise", "free_ride", "backdoor"}
    assert all(np.isfinite(a.default_strength) for a in ATTACKS.values())
