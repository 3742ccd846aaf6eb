"""Next-token loss: its one definition, shared by training, and dataset evaluation.

A dataset is a ``TensorDataset`` of ``(input_ids [N, T] long, attention_mask
[N, T] long)``; padding positions have mask 0. Position ``t`` predicts token
``t + 1``. A prediction counts when both its context token and its target are
real, so neither right nor left padding ever enters a loss.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from peft import PeftModel
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


@dataclass(frozen=True)
class LossStats:
    """Loss of a model over a dataset.

    Attributes
    ----------
    loss
        Token-weighted mean cross-entropy (nats) over every counted prediction
        (``nan`` if none counts).
    tokens
        Number of counted predictions.
    examples
        Number of records.
    example_losses
        Mean cross-entropy of each record, in dataset order (0.0 for a record
        with no counted prediction), for paired statistics.
    example_tokens
        Counted predictions of each record, in dataset order: with
        ``example_losses`` they rebuild ``loss`` for any resample of records.
    """

    loss: float
    tokens: int
    examples: int
    example_losses: tuple[float, ...]
    example_tokens: tuple[int, ...] = ()

    @property
    def perplexity(self) -> float:
        """``exp(loss)``; ``inf`` where that overflows a float."""
        return math.exp(self.loss) if self.loss < 700.0 else math.inf


def token_losses(
    logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of every next-token prediction and which ones count.

    Parameters
    ----------
    logits
        ``[B, T, V]`` model output.
    input_ids, attention_mask
        ``[B, T]`` long.

    Returns
    -------
    tuple of torch.Tensor
        ``ce`` ``[B, T-1]`` float32, zero where not counted, and ``counted``
        ``[B, T-1]`` bool.
    """
    batch, length, vocab = logits.shape
    targets = input_ids[:, 1:]  # [B, T-1]
    counted = (attention_mask[:, :-1] != 0) & (attention_mask[:, 1:] != 0)  # [B, T-1]
    # float32 softmax: half-precision logits lose too much in log-sum-exp.
    ce = F.cross_entropy(logits[:, :-1].float().reshape(-1, vocab), targets.reshape(-1), reduction="none").view(
        batch, length - 1
    )
    return ce * counted, counted


def record_losses(logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of each record over its counted predictions, ``[B]``.

    The privacy unit is one record, so each record's loss depends on that
    record alone (unlike a loss normalised by the batch's token count). A
    record with no counted prediction has loss 0.0 and no gradient.
    """
    return _per_record_mean(*token_losses(logits, input_ids, attention_mask))


def _per_record_mean(ce: torch.Tensor, counted: torch.Tensor) -> torch.Tensor:
    # [B, T-1] -> [B]; clamp so a record without predictions gives 0, not 0/0.
    return ce.sum(dim=1) / counted.sum(dim=1).clamp(min=1)


class RecordLoss(nn.Module):
    """DP-SGD batch loss: the mean over records of each record's mean next-token CE.

    Called as ``loss(logits [B, T, V], input_ids [B, T], attention_mask [B, T])``.
    With ``reduction = "none"`` (what opacus' ghost clipping sets while it
    measures per-record norms) it returns the per-record losses ``[B]``.
    """

    def __init__(self) -> None:
        super().__init__()
        self.reduction = "mean"

    def forward(self, logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        losses = record_losses(logits, input_ids, attention_mask)  # [B]
        return losses if self.reduction == "none" else losses.mean()


def evaluate_loss(
    model: PeftModel, dataset: TensorDataset, *, batch_size: int = 32, use_adapter: bool = True
) -> LossStats:
    """Loss of ``model`` over every record of ``dataset``, without gradients.

    Parameters
    ----------
    model
        A peft ``PeftModel`` (causal LM) on its device.
    dataset
        ``(input_ids, attention_mask)`` as described in the module docstring.
    batch_size
        Records per forward pass; changes speed only, not the result.
    use_adapter
        ``False`` evaluates the bare base model through
        ``model.disable_adapter()``: the baseline when nothing is published.

    Returns
    -------
    LossStats
        The model's training mode is restored afterwards.

    Raises
    ------
    ValueError
        On an empty dataset or a batch size below 1.
    """
    if len(dataset) == 0:
        raise ValueError("cannot evaluate on an empty dataset")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    adapter_off = model.disable_adapter() if not use_adapter else nullcontext()
    total_ce, total_tokens, per_record, per_record_tokens = 0.0, 0, [], []
    try:
        with adapter_off, torch.inference_mode():
            for input_ids, attention_mask in DataLoader(dataset, batch_size=batch_size):
                input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
                logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
                ce, counted = token_losses(logits, input_ids, attention_mask)  # [B, T-1]
                total_ce += float(ce.sum(dtype=torch.float64))
                total_tokens += int(counted.sum())
                per_record += _per_record_mean(ce, counted).tolist()
                per_record_tokens += counted.sum(dim=1).tolist()
    finally:
        model.train(was_training)
    return LossStats(
        loss=total_ce / total_tokens if total_tokens else math.nan,
        tokens=total_tokens,
        examples=len(per_record),
        example_losses=tuple(per_record),
        example_tokens=tuple(int(t) for t in per_record_tokens),
    )
