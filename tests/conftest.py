"""Shared fixtures. Tests build their own tiny models and data; nothing downloads."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# The embedded base model is built once per machine into the repo's .cache (ignored by
# git) and reused by every test and test run, instead of the user's ~/.cache.
os.environ.setdefault("FEDRETRAIN_CACHE", str(REPO / ".cache" / "fedretrain"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def tiny_adapter_dir(tmp_path_factory) -> Path:
    """A LoRA adapter (r=2 on q_proj, v_proj) on a tiny Llama, as peft's save_pretrained writes it."""
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    model = get_peft_model(
        transformers.LlamaForCausalLM(config), LoraConfig(r=2, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    )
    out = tmp_path_factory.mktemp("adapter")
    model.save_pretrained(out)
    return out


@pytest.fixture
def keep_global_random_state():
    """Tests that reseed and rewind the process's generators put them back afterwards."""
    import random

    import numpy as np
    import torch

    saved = random.getstate(), np.random.get_state(), torch.get_rng_state()
    yield
    random.setstate(saved[0])
    np.random.set_state(saved[1])
    torch.set_rng_state(saved[2])


@pytest.fixture
def instruction_identity(monkeypatch):
    """What Flower's ServerApp runtime sets before an instruction Message can be built."""
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", SUPERLINK_NODE_ID)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


@pytest.fixture
def cli_logging():
    """``main`` sets up the "fedretrain" logger for a terminal; put it back as it was."""
    logger = logging.getLogger("fedretrain")
    saved = list(logger.handlers), logger.propagate, logger.level
    yield
    logger.handlers[:] = saved[0]
    logger.propagate = saved[1]
    logger.setLevel(saved[2])


@pytest.fixture
def propagating_logs(monkeypatch):
    """Log records reach caplog: `cli.main.main` (run by other test files) turns propagation off on "fedretrain"."""
    monkeypatch.setattr(logging.getLogger("fedretrain"), "propagate", True)
