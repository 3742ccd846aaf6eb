"""The one loading path: devices, dtypes, local directories, offline failures, and LoRA attachment."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from fedretrain.errors import ModelLoadError
from fedretrain.modeling import loading
from fedretrain.modeling.loading import (
    attach_lora,
    count_parameters,
    load_base_model,
    load_tokenizer,
    model_nbytes,
    resolve_model_path,
    select_device,
    select_dtype,
)

CPU = torch.device("cpu")
# Tiny Llama: vocab V=64, hidden H=32, MLP I=64, L=2 layers, 4 heads of 8 (no grouped KV), tied embeddings.
V, H, I, L = 64, 32, 64, 2  # noqa: E741 (the usual names of these sizes)


def _tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=V,
        hidden_size=H,
        intermediate_size=I,
        num_hidden_layers=L,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        tie_word_embeddings=True,
        bos_token_id=2,
        eos_token_id=1,
        pad_token_id=None,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture
def tiny_dir(tmp_path) -> Path:
    # A save_pretrained directory like a user's own model: weights plus a tokenizer with no pad token.
    directory = tmp_path / "tiny-llama"
    _tiny_llama().save_pretrained(directory)
    vocab = {"<unk>": 0, "</s>": 1, "<s>": 2, "hello": 3, "world": 4}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", eos_token="</s>", bos_token="<s>"
    ).save_pretrained(directory)
    return directory


def test_select_device_on_a_cpu_machine(monkeypatch):
    # Prepare
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)

    # Execute / Assert
    assert select_device("cpu") == CPU
    assert select_device("auto") == CPU
    with pytest.raises(ModelLoadError, match="cuda"):
        select_device("cuda")
    with pytest.raises(ValueError, match="auto, cpu, cuda"):
        select_device("tpu")


def test_select_dtype(monkeypatch):
    # Prepare: select_dtype only asks torch whether the GPU supports bf16, so a CUDA device
    # object is enough to test the CUDA branch on a CPU machine.
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)

    # Execute / Assert
    assert select_dtype(CPU) == torch.float32
    assert select_dtype(torch.device("cuda", 0)) == torch.bfloat16
    assert select_dtype(CPU, "bfloat16") == torch.bfloat16
    assert select_dtype(torch.device("cuda", 0), "float32") == torch.float32
    with pytest.raises(ValueError, match="float16"):
        select_dtype(CPU, "float16")


def test_resolve_model_path(tiny_dir, tmp_path, monkeypatch):
    # Prepare: "embedded" goes to the embedded builder (replaced here, so nothing is built).
    monkeypatch.setattr(loading, "embedded_model_dir", lambda cache_dir: Path(cache_dir) / "built")

    # Execute / Assert
    assert resolve_model_path(str(tiny_dir)) == str(tiny_dir)
    assert resolve_model_path("embedded", tmp_path) == str(tmp_path / "built")
    with pytest.raises(ModelLoadError, match="does not exist"):
        resolve_model_path(str(tmp_path / "missing"))


def test_loads_a_local_directory_on_the_device_frozen_in_eval_mode(tiny_dir):
    # Execute
    model = load_base_model(str(tiny_dir), CPU, torch.bfloat16)
    tokenizer = load_tokenizer(str(tiny_dir))

    # Assert
    assert isinstance(model, LlamaForCausalLM) and not model.training
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert {p.device for p in model.parameters()} == {CPU}
    assert count_parameters(model)[0] == 0
    assert tokenizer.pad_token == tokenizer.eos_token == "</s>"  # it had none; eos stands in


@pytest.mark.timeout(60)
@pytest.mark.parametrize("load", [load_tokenizer, lambda name: load_base_model(name, CPU, torch.float32)])
def test_a_model_that_is_not_here_fails_fast_with_the_fix(load, monkeypatch):
    # Prepare
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()

    # Execute
    with pytest.raises(ModelLoadError) as caught:
        load("no-such-org/no-such-model")

    # Assert: names the id and says how to get it here, without waiting on the network.
    message = str(caught.value)
    assert "no-such-org/no-such-model" in message and "model.name_or_path" in message
    assert "download" in message
    assert time.perf_counter() - started < 10


@pytest.mark.timeout(120)
def test_hub_ids_come_from_the_local_hf_cache_and_never_from_the_network(tiny_dir, tmp_path):
    # Prepare: a Hugging Face cache holding "test-org/tiny-llama" the way `hf download` leaves it.
    # huggingface_hub reads HF_HUB_CACHE / HF_HUB_OFFLINE when imported, hence a fresh process,
    # here *without* HF_HUB_OFFLINE: loading must not try the network even when allowed to.
    snapshot = tmp_path / "hub" / "models--test-org--tiny-llama" / "snapshots" / ("0" * 40)
    shutil.copytree(tiny_dir, snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    code = (
        "import torch; from fedretrain.modeling.loading import load_base_model; from fedretrain.errors import "
        "ModelLoadError\n"
        "print(type(load_base_model('test-org/tiny-llama', torch.device('cpu'), torch.float32)).__name__)\n"
        "try: load_base_model('no-such-org/no-such-model', torch.device('cpu'), torch.float32)\n"
        "except ModelLoadError: print('ModelLoadError')"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env["HF_HUB_CACHE"] = str(tmp_path / "hub")
    # The "hub" is a listener on 127.0.0.1 that counts the connections it is offered.
    hub = socket.create_server(("127.0.0.1", 0))
    hub.settimeout(0.2)
    env["HF_ENDPOINT"] = f"http://127.0.0.1:{hub.getsockname()[1]}"
    connections: list[object] = []
    done = threading.Event()

    def listen() -> None:
        while not done.is_set():
            try:
                conn, _ = hub.accept()
            except TimeoutError:
                continue
            connections.append(conn)
            conn.close()

    listener = threading.Thread(target=listen, daemon=True)
    listener.start()

    # Execute
    try:
        result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    finally:
        done.set()
        listener.join()
        hub.close()

    # Assert: both ids resolved (or failed) from the local cache without one connection to the hub.
    assert result.stdout.split() == ["LlamaForCausalLM", "ModelLoadError"], result.stderr[-2000:]
    assert connections == []


def test_a_directory_without_a_model_is_a_model_load_error(tmp_path):
    # Prepare
    (tmp_path / "empty").mkdir()

    # Execute / Assert
    with pytest.raises(ModelLoadError, match="empty"):
        load_base_model(str(tmp_path / "empty"), CPU, torch.float32)


def test_attach_lora_trains_only_the_adapter_and_starts_as_a_no_op():
    # Prepare
    model = _tiny_llama().requires_grad_(False)
    ids = torch.tensor([[2, 3, 4, 5]])
    with torch.no_grad():
        before = model(ids).logits

    # Execute
    peft_model = attach_lora(model, r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"], seed=0)

    # Assert: per layer q and v each get A (4 x 32) and B (32 x 4): 2 * 256 = 512, times 2 layers.
    trainable = [name for name, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_A" in name or "lora_B" in name for name in trainable)
    assert count_parameters(peft_model)[0] == L * 2 * (4 * H + H * 4)
    with torch.no_grad():
        assert torch.equal(peft_model(ids).logits, before)  # lora_B starts at zero


def _lora_a(seed: int) -> list[torch.Tensor]:
    peft_model = attach_lora(_tiny_llama(), r=4, alpha=8, dropout=0.0, target_modules=("q_proj",), seed=seed)
    return [p.detach().clone() for name, p in peft_model.named_parameters() if "lora_A" in name]


def test_same_seed_gives_bit_identical_adapters():
    # Execute
    first, again, other = _lora_a(7), _lora_a(7), _lora_a(8)

    # Assert: one lora_A per layer, equal bit for bit under one seed, different under another.
    assert len(first) == L
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not any(torch.equal(a, b) for a, b in zip(first, other, strict=True))


def test_attach_lora_leaves_the_callers_rng_state_alone():
    # Prepare
    model = _tiny_llama()
    state = torch.get_rng_state()

    # Execute
    attach_lora(model, r=4, alpha=8, dropout=0.0, target_modules=["q_proj"], seed=123)

    # Assert
    assert torch.equal(torch.get_rng_state(), state)


def test_attach_lora_refuses_a_model_spread_over_two_devices():
    # Prepare: the "meta" device stands in for a second accelerator on a CPU-only machine.
    model = _tiny_llama()
    model.model.norm.to("meta")

    # Execute / Assert
    with pytest.raises(ModelLoadError, match="one device"):
        attach_lora(model, r=4, alpha=8, dropout=0.0, target_modules=["q_proj"], seed=0)


def test_attach_lora_names_target_modules_that_do_not_exist():
    # Execute / Assert
    with pytest.raises(ModelLoadError, match="no_such_proj"):
        attach_lora(_tiny_llama(), r=4, alpha=8, dropout=0.0, target_modules=["no_such_proj"], seed=0)


def test_parameter_counts_and_bytes_count_tied_weights_once():
    # Prepare: embeddings V*H (shared with lm_head) + per layer 4 attention H*H, 3 MLP H*I, 2 norms H,
    # + the final norm H.
    expected = V * H + L * (4 * H * H + 3 * H * I + 2 * H) + H
    model = _tiny_llama()

    # Execute / Assert
    assert count_parameters(model) == (expected, expected)
    assert model_nbytes(model) == 4 * expected
    assert model_nbytes(model.to(torch.bfloat16)) == 2 * expected
