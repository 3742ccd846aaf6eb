"""The README's "any transformers causal LM", family by family: a tiny random Llama, Mistral,
Qwen2, GPT-2, GPT-NeoX, Phi and BERT-as-decoder, saved with save_pretrained beside the
embedded model's tokenizer, each runs one DP round of a real retraining cycle.

The cycle is the one ``fedretrain simulate`` runs (``server.cycle.run.run_retraining``), and
the two sites answer through the real ClientApp; only Flower's simulation engine is left
out: an in-process grid hands each message to the ClientApp (seconds, not the engine's ~20 s
start). The DP noise is seeded from the job (``privacy.reproducible_noise``), so each
family's figures are the same on every run; clipping at 0.01, about the size of a tiny
model's per-record gradients, keeps the noise of epsilon 4 from drowning the signal, so
every family's candidate improves and is published.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from pathlib import Path

import pytest
import transformers
from flwr.app import Context, Message, RecordDict
from safetensors.torch import load_file, save_file

from client.app import make_client_app
from fedretrain.config import compose_config, flatten, to_yaml, unflatten
from fedretrain.modeling.loading import load_tokenizer
from fedretrain.registry.base_model import base_model_identity
from fedretrain.registry.store import Registry
from server.app import bind_sites
from server.cycle.run import run_retraining
from server.sites.roster import Roster
from simulation.federation import FederationSites, build_federation

ATTENTION = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
GQA = {**ATTENTION, "num_key_value_heads": 1}
# family -> (config class, model class, sizes, LoRA targets from peft 0.21's table for its model_type).
# Heads: Llama, GPT-2 and BERT tie theirs to the embeddings; Mistral, Qwen2, GPT-NeoX and Phi do not.
FAMILIES = {
    "llama": (
        transformers.LlamaConfig,
        transformers.LlamaForCausalLM,
        {**GQA, "tie_word_embeddings": True},
        ["q_proj", "v_proj"],
    ),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM, GQA, ["q_proj", "v_proj"]),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, GQA, ["q_proj", "v_proj"]),
    "gpt2": (
        transformers.GPT2Config,
        transformers.GPT2LMHeadModel,
        {"n_embd": 32, "n_layer": 1, "n_head": 2},
        ["c_attn"],
    ),
    "gpt_neox": (transformers.GPTNeoXConfig, transformers.GPTNeoXForCausalLM, ATTENTION, ["query_key_value"]),
    "phi": (transformers.PhiConfig, transformers.PhiForCausalLM, ATTENTION, ["q_proj", "v_proj", "fc1", "fc2"]),
    "bert": (
        transformers.BertConfig,
        transformers.BertLMHeadModel,
        {**ATTENTION, "is_decoder": True},
        ["query", "value"],
    ),
}
SHRINK = [
    "rounds=1",
    "simulation.num_sites=2",
    "data.records_per_site=40",
    "data.validation_records=40",
    "model.max_length=64",
    "train.local_steps=3",
    "train.batch_size=8",
    "train.lr=0.05",
    "privacy.sample_rate=0.25",
    "privacy.max_grad_norm=0.01",
    "privacy.reproducible_noise=true",
    "simulation.site_smoke_eval=false",
    "gate.bootstrap_samples=100",
    # One round of a random model improves it by 0.001-0.04 nats: publish on any confident gain.
    "gate.margin=0",
    "gate.require_federated_confidence=false",
    "gate.site_tolerance=100",
]


class InlineGrid:
    """Flower's Grid as a cycle uses it, answering every message with ``app`` in this process.

    Node 100 + k is virtual site k (its ``partition-id``), as Flower's simulation engine numbers them.
    """

    def __init__(self, app, num_sites: int) -> None:
        self.app = app
        self.sites = {100 + k: k for k in range(num_sites)}
        self.sent = 0

    def get_node_ids(self) -> list[int]:
        return list(self.sites)

    def send_and_receive(self, messages, *, timeout=None) -> list[Message]:
        replies = []
        for msg in messages:
            self.sent += 1
            node = msg.metadata.dst_node_id
            msg.metadata.__dict__["_message_id"] = f"m{self.sent}"
            context = Context(
                run_id=1,
                node_id=node,
                node_config={"partition-id": self.sites[node]},
                state=RecordDict(),
                run_config={},
            )
            reply = self.app(msg, context)
            reply.metadata.__dict__["_src_node_id"] = node
            replies.append(reply)
        return replies


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("embedded")


@pytest.fixture(autouse=True)
def propagating_logs(monkeypatch):
    # `cli.main.main` (run by other test files) turns propagation off on "fedretrain".
    monkeypatch.setattr(logging.getLogger("fedretrain"), "propagate", True)


def save_family(family: str, directory: Path, tokenizer) -> Path:
    config_cls, model_cls, sizes, _ = FAMILIES[family]
    special = {k: getattr(tokenizer, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    config = config_cls(vocab_size=len(tokenizer), **special, **sizes)
    transformers.set_seed(0)
    model_cls(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def one_round(model_dir: Path, root: Path, overrides: list[str] = ()) -> dict:
    """One retraining cycle of two sites on ``model_dir``; its summary."""
    cfg = compose_config(["model=hf", f"model.name_or_path={model_dir}", f"output_dir={root}", *SHRINK, *overrides])
    fed = build_federation(cfg, root / "sites")
    registry = dataclasses.replace(cfg.registry, root=str(fed.registry_root), signing_key=str(fed.signing_key))
    cfg = dataclasses.replace(cfg, registry=registry)
    run_dir = root / "run"
    run_dir.mkdir()
    app = make_client_app(FederationSites(fed.root, run_dir / "roster"))
    grid = bind_sites(InlineGrid(app, cfg.simulation.num_sites), Roster.from_directory(run_dir / "roster"))
    yaml = to_yaml(unflatten(flatten(cfg)))
    return run_retraining(grid, cfg, run_dir, config_yaml=yaml, validation_path=str(fed.validation_path))


@pytest.mark.usefixtures("instruction_identity", "keep_global_random_state")
@pytest.mark.parametrize("family", FAMILIES)
def test_one_dp_round_on_a_tiny_model_of_each_family(family, tokenizer, tmp_path, caplog):
    # Prepare
    model_dir = save_family(family, tmp_path / family, tokenizer)

    # Execute
    with caplog.at_level(logging.INFO, logger="fedretrain"):
        summary = one_round(model_dir, tmp_path)

    # Assert: both sites trained under DP and were charged for it ...
    targets = FAMILIES[family][3]
    assert [s["rounds_participated"] for s in summary["sites"].values()] == [1, 1]
    assert all(
        0 < s["epsilon"] <= s["epsilon_ceiling"] and s["noise_multiplier"] > 0 for s in summary["sites"].values()
    )
    assert math.isfinite(summary["candidate_loss"]) and summary["candidate_loss"] < summary["baseline_loss"]
    # ... the targets were chosen from the architecture and printed at start-up ...
    assert f"LoRA targets of {model_dir}: {', '.join(targets)} (peft's defaults for model_type" in caplog.text
    # ... and the published version records them and the base model, which both sites then installed.
    assert summary["gate"]["decision"] == "publish" and set(summary["publication"]["installed"]) == set(
        summary["sites"]
    )
    manifest = Registry(Path(summary["registry"])).bundle(1).manifest
    assert manifest["lora"]["target_modules"] == targets
    assert manifest["base_model"] == base_model_identity(str(model_dir), model_dir)


@pytest.mark.usefixtures("instruction_identity", "keep_global_random_state")
def test_a_bert_without_its_lm_head_transform_runs_once_opted_in_and_its_seed_is_in_the_identity(tokenizer, tmp_path):
    # Prepare: the user report's checkpoint: transformers would draw the 4 missing transform
    # tensors at random, differently in every process.
    model_dir = save_family("bert", tmp_path / "bert", tokenizer)
    weights = model_dir / "model.safetensors"
    save_file({k: v for k, v in load_file(weights).items() if "transform" not in k}, weights, metadata={"format": "pt"})

    # Execute
    summary = one_round(model_dir, tmp_path, ["model.init_missing_seed=5"])

    # Assert: the sites installed what the coordinator published: the same model, seed included.
    assert summary["gate"]["decision"] == "publish" and set(summary["publication"]["installed"]) == set(
        summary["sites"]
    )
    identity = Registry(Path(summary["registry"])).bundle(1).manifest["base_model"]
    assert identity == base_model_identity(str(model_dir), model_dir, init_missing_seed=5)
    assert identity["init_missing_seed"] == 5
    assert identity["sha256"] != base_model_identity(str(model_dir), model_dir)["sha256"]
    # ... and a site generates with the version it installed: the manifest carries the seed.
    from client.install.generate import generate
    from fedretrain.config import site_config_from_node_config

    site_json = json.loads((tmp_path / "sites" / "site-00" / "site.json").read_text())
    site = site_config_from_node_config(site_json, simulation=True)
    key = Path(str(site.coordinator_key))
    result = generate(site.model_store_path, "Patient presents with", coordinator_key=key, max_new_tokens=4)
    assert result.version == 1 and result.text.startswith("Patient presents with")
