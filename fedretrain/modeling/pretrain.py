"""Tokenizer training and deterministic CPU pretraining for the embedded model.

Used only by ``fedretrain.modeling.embedded`` when it builds the model; kept
apart so the cache logic there reads on its own.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

if TYPE_CHECKING:
    from fedretrain.modeling.embedded import Recipe


def train_tokenizer(
    documents: Sequence[str], vocab_size: int, special_tokens: Sequence[str], max_length: int
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on ``documents``.

    ``special_tokens`` are pad, bos, eos, unk, in that order, and get ids
    0..3. Encoding prepends bos (as Llama tokenizers do); eos is not added.
    Byte-level BPE can spell any text, so unk is never produced in practice.
    """
    pad, bos, eos, unk = special_tokens
    tokenizer = Tokenizer(models.BPE(unk_token=unk))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(documents, trainer=trainer)
    bos_id = tokenizer.token_to_id(bos)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=bos,
        eos_token=eos,
        pad_token=pad,
        unk_token=unk,
        model_max_length=max_length,
    )


def pretrain(
    documents: Sequence[str], tokenizer: PreTrainedTokenizerFast, recipe: Recipe
) -> tuple[LlamaForCausalLM, float]:
    """Pretrain a small Llama on ``documents``, deterministically, on CPU.

    Returns
    -------
    tuple[LlamaForCausalLM, float]
        The model (float32, CPU, eval mode) and the mean training loss over
        the last 10 steps.
    """
    with _deterministic_cpu(recipe.num_threads), torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        blocks = _pack(documents, tokenizer, recipe.block_size)  # (num_blocks, block_size)
        model = LlamaForCausalLM(_llama_config(tokenizer, recipe))
        losses = _train(model, blocks, recipe)
    model.eval()
    tail = losses[-10:]
    return model, sum(tail) / len(tail)


def _llama_config(tokenizer: PreTrainedTokenizerFast, recipe: Recipe) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=recipe.hidden_size,
        intermediate_size=recipe.intermediate_size,
        num_hidden_layers=recipe.num_hidden_layers,
        num_attention_heads=recipe.num_attention_heads,
        num_key_value_heads=recipe.num_attention_heads,
        max_position_embeddings=recipe.max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _pack(documents: Sequence[str], tokenizer: PreTrainedTokenizerFast, block_size: int) -> torch.Tensor:
    # nanoGPT-style packing: one token stream "<s> doc </s> <s> doc </s> ...", cut into equal
    # blocks (the ragged tail is dropped), so every position of every batch carries a target.
    stream: list[int] = []
    for ids in tokenizer(list(documents), verbose=False)["input_ids"]:  # long documents are fine here
        stream.extend(ids)  # the post-processor already put bos in front
        stream.append(tokenizer.eos_token_id)
    num_blocks = len(stream) // block_size
    return torch.tensor(stream[: num_blocks * block_size], dtype=torch.long).view(num_blocks, block_size)


def _lr_factor(step: int, recipe: Recipe) -> float:
    # Linear warmup, then cosine decay from 1 to min_lr_ratio.
    if step < recipe.warmup_steps:
        return (step + 1) / recipe.warmup_steps
    progress = (step - recipe.warmup_steps) / max(1, recipe.steps - recipe.warmup_steps)
    return recipe.min_lr_ratio + (1 - recipe.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def _train(model: LlamaForCausalLM, blocks: torch.Tensor, recipe: Recipe) -> list[float]:
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=recipe.peak_lr, betas=recipe.betas, weight_decay=recipe.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(step, recipe))
    order = torch.Generator().manual_seed(recipe.seed)
    batches = _batches(blocks.shape[0], recipe.batch_size, order)
    model.train()
    losses = []
    for _ in range(recipe.steps):
        batch = blocks[next(batches)]  # (batch_size, block_size); labels are shifted inside the model
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def _batches(num_blocks: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    # Epochs of seeded permutations; a partial batch at an epoch's end is skipped.
    while True:
        permutation = torch.randperm(num_blocks, generator=generator)
        for start in range(0, num_blocks - batch_size + 1, batch_size):
            yield permutation[start : start + batch_size]


@contextmanager
def _deterministic_cpu(num_threads: int) -> Iterator[None]:
    # Float sums depend on how work is split across threads, so the thread count is fixed;
    # the caller's settings come back afterwards.
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.set_num_threads(max(1, min(num_threads, os.cpu_count() or 1)))
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
        torch.set_num_threads(threads)
