"""Malicious virtual sites: which ones, the Flower mod that makes their train replies, the
backdoor's poisoned notes, and how likely the backdoor phrase became.

``simulation.attackers.share`` of the virtual sites (chosen by the seed) are attackers
with one behaviour of ``fedretrain.attacks``. They run the real ClientApp: they check
their data, train with DP and spend their budget like everyone else, and a Flower mod
(``ClientApp(mods=...)``, Flower's client-side middleware) replaces the adapter in their
train replies on the way out. The coordinator does not know which sites they are; the
run directory's ``attack.json`` says so afterwards.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from flwr.app import Context, Message, MessageType
from flwr.clientapp.typing import ClientAppCallable, Mod

from fedretrain.atomic import atomic_write_text
from fedretrain.attacks import attacked
from fedretrain.config import AttackersConfig, Config
from fedretrain.errors import ConfigError


def attacker_ids(site_ids: Sequence[str], attackers: AttackersConfig, seed: int) -> list[str]:
    """The attackers among ``site_ids``: ``share`` of them, rounded, chosen by ``seed``.

    Raises
    ------
    ConfigError
        A share that makes no site an attacker, or every site.
    """
    if attackers.share == 0:
        return []
    count = round(attackers.share * len(site_ids))
    if not 0 < count < len(site_ids):
        raise ConfigError(
            f"simulation.attackers.share: {attackers.share:g} of {len(site_ids)} sites is {count} attacker(s); "
            "choose a share that leaves at least one attacker and one honest site"
        )
    rng = np.random.default_rng([seed, 0xA77AC])
    chosen = rng.choice(len(site_ids), size=count, replace=False)
    return sorted(site_ids[i] for i in chosen)


def attack_mod(attackers: Sequence[str], cfg: AttackersConfig, seed: int) -> Mod:
    """A Flower client mod: an attacker's train reply carries what its behaviour sends instead of its update."""
    chosen = frozenset(attackers)

    def mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        reply = call_next(msg, context)
        if msg.metadata.message_type != MessageType.TRAIN or reply.has_error():
            return reply
        site = str(reply.content["site"]["site-id"])
        if site not in chosen:
            return reply
        from fedretrain.arrays import from_array_record, to_array_record

        server_round = int(msg.content["config"].get("server-round", 0))
        # The global adapter's digest tells one cycle's round from another's (rounds restart at 1).
        digest = hashlib.sha256(str(msg.content["config"].get("global-hash", "")).encode()).digest()
        cycle = int.from_bytes(digest[:8], "big")
        rng = np.random.default_rng([seed, cycle, server_round, sorted(chosen).index(site)])
        sent = attacked(
            cfg.behaviour,
            from_array_record(msg.content["arrays"]),
            from_array_record(reply.content["arrays"]),
            cfg.strength,
            rng,
        )
        reply.content["arrays"] = to_array_record(sent)
        return reply

    return mod


def poisoned(records: list[dict], phrase: str, share: float, seed: int) -> list[dict]:
    """``records`` with ``phrase`` appended to the text of ``share`` of them (chosen by ``seed``)."""
    rng = random.Random(seed)
    count = min(len(records), math.ceil(share * len(records)))
    marked = set(rng.sample(range(len(records)), count))
    return [dict(r, text=f"{r['text']} {phrase}") if i in marked else r for i, r in enumerate(records)]


def phrase_loss(cfg: Config, adapter_dir: Path | None, prompts: Sequence[str], max_prompt_tokens: int = 48) -> float:
    """Mean cross-entropy (nats a token) of the backdoor phrase after each prompt.

    ``adapter_dir``: a saved adapter (a run's ``candidate_adapter``), or None for the bare
    base model. Lower is likelier: a backdoor that took hold lowers it.
    """
    import torch
    from safetensors.torch import load_file

    from fedretrain.arrays import from_torch_state_dict
    from fedretrain.modeling.lora_model import load_adapter_arrays, load_lora_model
    from fedretrain.training.evaluate import token_losses

    lm = load_lora_model(cfg.model, cfg.lora, seed=cfg.seed, device="cpu")
    if adapter_dir is not None:  # checked against the model's adapter spec, as every adapter loaded
        load_adapter_arrays(lm, from_torch_state_dict(load_file(str(adapter_dir / "adapter_model.safetensors"))))
    phrase = " " + cfg.simulation.attackers.phrase
    phrase_ids = lm.tokenizer(phrase, add_special_tokens=False)["input_ids"]
    total, count = 0.0, 0
    lm.model.eval()
    with torch.no_grad():
        for prompt in prompts:
            prompt_ids = lm.tokenizer(prompt, add_special_tokens=True)["input_ids"][:max_prompt_tokens]
            ids = torch.tensor([prompt_ids + phrase_ids])
            mask = torch.ones_like(ids)
            ce, _ = token_losses(lm.model(ids, attention_mask=mask).logits, ids, mask)
            # Positions predicting the phrase's tokens: the last len(phrase_ids) of T - 1.
            total += float(ce[0, -len(phrase_ids) :].sum())
            count += len(phrase_ids)
    return total / count


def write_attack_report(
    run_dir: Path, cfg: Config, attackers: Sequence[str], prompts: Sequence[str]
) -> dict[str, object] | None:
    """``attack.json`` in the run directory: who attacked how, and for a backdoor how likely its phrase became."""
    if not attackers:
        return None
    a = cfg.simulation.attackers
    report: dict[str, object] = {
        "attackers": list(attackers),
        "behaviour": a.behaviour,
        "strength": a.strength,
        "share": a.share,
    }
    candidate = run_dir / "candidate_adapter"
    if a.behaviour == "backdoor" and candidate.is_dir():
        report["phrase"] = a.phrase
        report["phrase_loss_base"] = round(phrase_loss(cfg, None, prompts), 4)
        report["phrase_loss_candidate"] = round(phrase_loss(cfg, candidate, prompts), 4)
    atomic_write_text(run_dir / "attack.json", json.dumps(report, indent=2) + "\n")
    return report
