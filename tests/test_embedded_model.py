"""The embedded base model: built once into a fresh cache, deterministic, reused, and actually pretrained.

The module's model is the one every test uses, from the shared cache (``FEDRETRAIN_CACHE``,
set by conftest: built at most once per machine, about 25 s). The build itself is tested at a
few pretraining steps: from two processes at once into an empty cache, matching byte for byte
a build made in another directory and process.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM

from fedretrain.errors import ModelLoadError
from fedretrain.modeling.embedded import (
    EMBEDDED_NAME,
    RECIPE,
    RECIPE_FILE,
    WEIGHTS_FILE,
    _cache_key,
    corpus_text,
    default_cache_dir,
    embedded_model_dir,
)
from fedretrain.modeling.loading import load_base_model, load_tokenizer
from simulation.notes import general_corpus, validation_notes


@pytest.fixture(scope="module")
def cache() -> Path:
    cache_dir = default_cache_dir()
    embedded_model_dir(cache_dir)
    return cache_dir


@pytest.fixture(scope="module")
def built(cache) -> Path:
    return embedded_model_dir(cache)


@pytest.fixture(scope="module")
def loaded(cache):
    cpu = torch.device("cpu")
    return load_tokenizer(EMBEDDED_NAME, cache), load_base_model(EMBEDDED_NAME, cpu, torch.float32, cache)


def _mean_loss(model, tokenizer, texts: list[str]) -> float:
    # Mean next-token loss over real (unpadded) positions.
    batch = tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=128)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    with torch.no_grad():
        return model(**batch, labels=labels).loss.item()


def test_default_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    # Execute / Assert
    monkeypatch.setenv("FEDRETRAIN_CACHE", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("FEDRETRAIN_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "fedretrain"


def test_build_leaves_a_complete_save_pretrained_directory(cache, built):
    # Prepare
    corpus_sha = hashlib.sha256(corpus_text().encode("utf-8")).hexdigest()

    # Execute
    record = json.loads((built / RECIPE_FILE).read_text())

    # Assert: everything from_pretrained needs, plus the recipe, and nothing half-built beside it.
    for name in ("config.json", WEIGHTS_FILE, "tokenizer.json", "tokenizer_config.json", RECIPE_FILE):
        assert (built / name).is_file(), name
    assert built.parent == cache and built.name == f"{EMBEDDED_NAME}-{_cache_key(RECIPE, corpus_sha)}"
    assert not list(cache.glob(f".{built.name}.*.tmp"))
    assert record["recipe"]["steps"] == RECIPE.steps and record["corpus_sha256"] == corpus_sha
    assert record["weights_sha256"] == hashlib.sha256((built / WEIGHTS_FILE).read_bytes()).hexdigest()
    assert record["build_seconds"] > 0


def test_changing_the_recipe_or_the_corpus_changes_the_directory():
    # Execute
    base = _cache_key(RECIPE, "a" * 64)

    # Assert
    assert _cache_key(replace(RECIPE, steps=RECIPE.steps + 1), "a" * 64) != base
    assert _cache_key(RECIPE, "b" * 64) != base


def test_second_call_reuses_the_built_model(cache, built):
    # Prepare
    recipe = built / RECIPE_FILE
    before = (recipe.stat().st_mtime_ns, recipe.read_text())

    # Execute
    again = embedded_model_dir(cache)

    # Assert
    assert again == built
    assert (recipe.stat().st_mtime_ns, recipe.read_text()) == before


def test_loads_back_as_a_frozen_tied_llama_with_its_tokenizer(loaded):
    # Prepare
    tokenizer, model = loaded
    text = "Ünïcode ✓, 42 mg at 7:30."

    # Execute
    ids = tokenizer(text)["input_ids"]

    # Assert
    assert isinstance(model, LlamaForCausalLM) and not model.training
    assert not any(p.requires_grad for p in model.parameters())
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.config.vocab_size == len(tokenizer)
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token, tokenizer.unk_token) == (
        "<s>",
        "</s>",
        "<pad>",
        "<unk>",
    )
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == text  # byte-level BPE is lossless


def test_pretrained_model_has_learned_general_text_and_not_notes(loaded):
    # Prepare: held-out general documents (another seed of the same generator) and clinical notes.
    tokenizer, model = loaded
    general = general_corpus(seed=1)[:48]
    notes = [r["text"] for r in validation_notes(48, seed=0)]

    # Execute
    general_loss = _mean_loss(model, tokenizer, general)
    notes_loss = _mean_loss(model, tokenizer, notes)

    # Assert: a uniform guess costs ln(vocab) ~ 7.6 nats; pretraining must get general text far
    # below that, while notes (headers, shorthand, doses it never saw) stay clearly harder.
    assert general_loss < 0.5 * math.log(len(tokenizer))
    assert notes_loss > general_loss + 1.0


def test_a_corrupted_cached_model_is_reported_not_loaded(built, tmp_path):
    # Prepare: a copy of the built model whose weights file was altered afterwards.
    copy = tmp_path / "cache" / built.name
    shutil.copytree(built, copy)
    with open(copy / WEIGHTS_FILE, "ab") as handle:
        handle.write(b"\0")

    # Execute / Assert
    with pytest.raises(ModelLoadError, match="checksum"):
        embedded_model_dir(tmp_path / "cache")


# The build itself, at a few pretraining steps (the same code as RECIPE's 200, in seconds).
SMALL = replace(RECIPE, steps=6, warmup_steps=2)


def test_two_processes_building_at_once_build_once_and_match_a_build_elsewhere(tmp_path):
    # Prepare: two fresh processes race for the same empty cache; this process builds the same
    # recipe into a cache of its own.
    code = (
        "import logging, sys; from dataclasses import replace; from pathlib import Path; "
        "logging.basicConfig(level=logging.INFO); "
        "from fedretrain.modeling.embedded import RECIPE, embedded_model_dir; "
        f"print(embedded_model_dir(Path(sys.argv[1]), replace(RECIPE, steps={SMALL.steps}, "
        f"warmup_steps={SMALL.warmup_steps})))"
    )
    cache = tmp_path / "race"
    elsewhere = embedded_model_dir(tmp_path / "elsewhere", SMALL)

    # Execute
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(cache)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    results = [proc.communicate(timeout=600) for proc in procs]

    # Assert: one build, one complete directory, no temporary leftovers, and the same weights as
    # the build made in another directory and process (the build is deterministic).
    assert [proc.returncode for proc in procs] == [0, 0], [err[-2000:] for _, err in results]
    assert {out.strip() for out, _ in results} == {str(cache / elsewhere.name)}
    assert sum(err.count("Building the embedded base model") for _, err in results) == 1
    assert sorted(p.name for p in cache.iterdir() if not p.name.endswith(".lock")) == [elsewhere.name]
    built = cache / elsewhere.name
    assert sorted(p.name for p in built.iterdir()) == sorted(p.name for p in elsewhere.iterdir())
    record = json.loads((built / RECIPE_FILE).read_text())
    assert record["recipe"]["steps"] == SMALL.steps
    assert record["weights_sha256"] == json.loads((elsewhere / RECIPE_FILE).read_text())["weights_sha256"]
