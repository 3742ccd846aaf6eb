"""What fedretrain checks about a user's base model: which modules get LoRA, and that every
parameter came from the checkpoint (or, opted in, from a recorded seed).

Models are tiny random instances built with transformers' config classes; a checkpoint
that lacks parameters is made by deleting them from a real ``model.safetensors``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from fedretrain.config import Job, compose_config
from fedretrain.errors import ModelLoadError
from fedretrain.modeling.loading import load_base_model
from fedretrain.modeling.targets import attention_linear_targets, linear_module_names, resolve_target_modules

CPU = torch.device("cpu")
SIZES = {"vocab_size": 64, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2}


def _bert() -> transformers.BertLMHeadModel:
    return transformers.BertLMHeadModel(transformers.BertConfig(**SIZES, is_decoder=True))


def _llama(tie: bool) -> transformers.LlamaForCausalLM:
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**SIZES, tie_word_embeddings=tie))


def _save_without(model: transformers.PreTrainedModel, directory: Path, dropped: str) -> Path:
    """``model`` saved, then every tensor whose name contains ``dropped`` deleted from its file."""
    model.save_pretrained(directory)
    weights = directory / "model.safetensors"
    kept = {k: v for k, v in load_file(weights).items() if dropped not in k}
    save_file(kept, weights, metadata={"format": "pt"})
    return directory


# --- LoRA targets ------------------------------------------------------------------------


def test_the_default_targets_are_peft_s_own_for_the_model_type():
    # Execute
    llama = resolve_target_modules(_llama(tie=True), None)
    bert = resolve_target_modules(_bert(), None)

    # Assert: peft 0.21's table has llama -> q_proj, v_proj and bert -> query, value.
    assert llama.modules == ("q_proj", "v_proj") and "llama" in llama.source
    assert bert.modules == ("query", "value") and "bert" in bert.source


def test_a_model_type_peft_does_not_know_gets_every_linear_layer_of_its_attention_blocks():
    # Prepare: Granite (a Llama relative) has no entry in peft 0.21's table.
    granite = transformers.GraniteForCausalLM(transformers.GraniteConfig(**SIZES))

    # Execute
    targets = resolve_target_modules(granite, None)

    # Assert: the four projections of self_attn; none of the MLP's gate/up/down, nor lm_head.
    assert targets.modules == ("q_proj", "k_proj", "v_proj", "o_proj")
    assert "attention blocks" in targets.source


def test_an_attention_layer_whose_name_is_also_used_outside_attention_is_named_from_its_block():
    # Execute: BERT's attention output is "dense", and so are its MLP's and its head's.
    targets = attention_linear_targets(_bert())

    # Assert
    assert targets == ("query", "key", "value", "attention.output.dense")


def test_an_explicit_choice_that_matches_nothing_lists_the_model_s_linear_modules():
    # Execute: the user report: a BERT checkpoint with the Llama default.
    with pytest.raises(ModelLoadError) as caught:
        resolve_target_modules(_bert(), ("q_proj", "v_proj"), where="model.name_or_path='/m/bert'")

    # Assert
    message = str(caught.value)
    assert "['q_proj', 'v_proj']" in message and "/m/bert" in message and "'bert'" in message
    assert "query, key, value, dense, decoder" in message
    assert "null" in message  # the fix: choose some of them, or let the architecture choose


def test_one_misspelt_name_next_to_a_good_one_is_refused_too():
    with pytest.raises(ModelLoadError, match=r"\['v_prj'\]"):
        resolve_target_modules(_llama(tie=True), ("q_proj", "v_prj"))


def test_linear_module_names_include_gpt2_s_conv1d_layers():
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=64, n_embd=16, n_layer=1, n_head=2))
    assert linear_module_names(gpt2) == ["c_attn", "c_proj", "c_fc", "lm_head"]


def test_null_target_modules_is_the_default_and_survives_the_job_s_trip_to_a_site():
    # Prepare
    cfg = compose_config([])

    # Execute: a job travels as a flat ConfigRecord, which cannot carry None.
    job = Job.from_flat(Job.from_config(cfg, run_id="r").to_flat())

    # Assert
    assert cfg.lora.target_modules is None and job.lora.target_modules is None
    assert cfg.model.init_missing_seed is None and job.model.init_missing_seed is None
    assert compose_config(["lora.target_modules=[query]"]).lora.target_modules == ("query",)
    assert cfg.lora.to_manifest(("q_proj", "v_proj"))["target_modules"] == ["q_proj", "v_proj"]


# --- parameters a checkpoint lacks --------------------------------------------------------


def test_a_bert_without_its_lm_head_transform_is_refused_naming_the_parameters_and_the_fix(tmp_path):
    # Prepare: the user report's checkpoint.
    path = _save_without(_bert(), tmp_path / "bert", "transform")

    # Execute
    with pytest.raises(ModelLoadError) as caught:
        load_base_model(str(path), CPU, torch.float32)

    # Assert: dense and LayerNorm, weight and bias each: 4 names, all listed, sorted.
    message = str(caught.value)
    assert str(path) in message and "BertLMHeadModel" in message and "lacks 4 parameter(s)" in message
    assert "cls.predictions.transform.LayerNorm.bias, cls.predictions.transform.LayerNorm.weight, " in message
    assert "model.init_missing_seed=<int>" in message


def test_a_long_list_of_missing_parameters_shows_the_first_eight_and_a_count(tmp_path):
    # Prepare: layer 1 of the Llama has 9 tensors (4 attention, 3 MLP, 2 norms).
    path = _save_without(_llama(tie=True), tmp_path / "llama", "layers.1.")

    # Execute / Assert
    with pytest.raises(ModelLoadError, match=r"lacks 9 parameter\(s\).* and 1 more\."):
        load_base_model(str(path), CPU, torch.float32)


def test_a_tied_head_is_not_missing_and_an_absent_untied_head_is(tmp_path):
    # Prepare: checkpoints of the base model alone (no lm_head), tied and untied.
    config = {"tie_word_embeddings": True, **SIZES}
    transformers.LlamaModel(transformers.LlamaConfig(**config)).save_pretrained(tmp_path / "tied")
    config["tie_word_embeddings"] = False
    transformers.LlamaModel(transformers.LlamaConfig(**config)).save_pretrained(tmp_path / "untied")

    # Execute
    tied = load_base_model(str(tmp_path / "tied"), CPU, torch.float32)
    with pytest.raises(ModelLoadError, match=r"lacks 1 parameter\(s\) of LlamaForCausalLM .*: lm_head.weight\."):
        load_base_model(str(tmp_path / "untied"), CPU, torch.float32)

    # Assert
    assert tied.lm_head.weight is tied.model.embed_tokens.weight


@pytest.mark.usefixtures("keep_global_random_state")
def test_an_opted_in_seed_initialises_missing_parameters_the_same_way_every_time(tmp_path):
    # Prepare
    path = str(_save_without(_bert(), tmp_path / "bert", "transform"))

    def transform(seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        model = load_base_model(path, CPU, dtype, init_missing_seed=seed)
        return model.cls.predictions.transform.dense.weight.detach()

    # Execute
    first, again, other = transform(7), transform(7), transform(8)
    torch.manual_seed(123)  # whatever the caller's generator holds does not matter
    caller = torch.get_rng_state()
    third, bf16 = transform(7), transform(7, torch.bfloat16)

    # Assert: equal bit for bit under one seed, different under another; a bf16 process (a GPU
    # coordinator) gets the same values rounded; the caller's generator is left alone.
    assert torch.equal(first, again) and torch.equal(first, third) and not torch.equal(first, other)
    assert torch.equal(bf16, first.to(torch.bfloat16))
    assert torch.equal(torch.get_rng_state(), caller)
