"""Turn validated records into the tensors training and evaluation take."""

from __future__ import annotations

from collections.abc import Sequence

from torch.utils.data import TensorDataset


def encode_texts(tokenizer, texts: Sequence[str], max_length: int) -> TensorDataset:
    """Tokenize ``texts`` (each ending with EOS) into ``(input_ids, attention_mask)`` [N, T].

    T is the longest record after truncation to ``max_length``, not ``max_length`` itself:
    padding every note to the maximum wastes most of the compute on short notes.
    One row is one record: the privacy unit of DP-SGD.
    """
    if not texts:
        raise ValueError("encode_texts needs at least one text")
    eos = tokenizer.eos_token or ""
    batch = tokenizer(
        [t + eos for t in texts],
        truncation=True,
        max_length=max_length,
        padding="longest",
        return_tensors="pt",
        add_special_tokens=True,
    )
    input_ids = batch["input_ids"].long()  # [N, T]
    attention_mask = batch["attention_mask"].long()  # [N, T], 0 on padding
    return TensorDataset(input_ids, attention_mask)


def count_tokens(dataset: TensorDataset) -> int:
    """Real (non-padding) tokens in a dataset from ``encode_texts``."""
    return int(dataset.tensors[1].sum())
