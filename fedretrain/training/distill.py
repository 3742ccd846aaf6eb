"""Knowledge distillation of a published version into a smaller student.

The teacher is the base model with the version's adapter merged into it (peft's
``merge_and_unload`` on a copy). The student is the same architecture with fewer decoder
layers, taken evenly from the teacher's (DistilBERT's initialisation, Sanh et al. 2019: the
embeddings, final norm and head are copied too), then trained on every weight to match the
teacher's next-token distribution (Hinton et al. 2015)::

    loss = alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * CE(student, text)

over the predictions that count (``fedretrain.training.evaluate.token_losses``: a real context
token and a real target). Any ``transformers`` causal LM whose config has ``num_hidden_layers``
and one ``ModuleList`` of that many decoder layers works (Llama, Mistral, Qwen, GPT-2, ...).
"""

from __future__ import annotations

import copy
import hashlib
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from peft import PeftModel
from torch import nn
from torch.utils.data import TensorDataset


@dataclass(frozen=True)
class DistillResult:
    losses: tuple[float, ...]  # the training loss of each step
    seconds: float
    layers: tuple[int, ...]  # the teacher's layers the student started from


def merged_teacher(model: PeftModel) -> nn.Module:
    """A standalone copy of ``model`` with its active adapter merged into the base weights."""
    teacher = copy.deepcopy(model).merge_and_unload()
    return teacher.eval()


def decoder_layers(model: nn.Module) -> str:
    """The dotted name of the model's ``ModuleList`` of ``config.num_hidden_layers`` decoder layers."""
    count = getattr(model.config, "num_hidden_layers", None)
    if not isinstance(count, int):
        raise ValueError(f"{type(model).__name__}: its config has no num_hidden_layers; cannot pick layers")
    found = [name for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) == count]
    if len(found) != 1:
        raise ValueError(
            f"{type(model).__name__}: expected one ModuleList of {count} decoder layers, found {found or 'none'}"
        )
    return found[0]


def student_layers(teacher_layers: int, layers: int | None) -> tuple[int, ...]:
    """Which teacher layers the student keeps: ``layers`` of them (default half), evenly spaced from
    the first to the last (the one that feeds the final norm and head); one layer: the first."""
    keep = max(1, teacher_layers // 2) if layers is None else layers
    if not 1 <= keep < teacher_layers:
        raise ValueError(f"distill.layers: a student needs 1 to {teacher_layers - 1} layers, got {keep}")
    if keep == 1:
        return (0,)
    return tuple(round(i * (teacher_layers - 1) / (keep - 1)) for i in range(keep))


def build_student(teacher: nn.Module, layers: int | None) -> tuple[nn.Module, tuple[int, ...]]:
    """A float32 student with fewer decoder layers, initialised from the teacher's weights."""
    prefix = decoder_layers(teacher)
    teacher_config: Any = teacher.config
    keep = student_layers(teacher_config.num_hidden_layers, layers)
    config = copy.deepcopy(teacher_config)
    config.num_hidden_layers = len(keep)
    if isinstance(getattr(config, "layer_types", None), list):  # per-layer attention kinds (newer families)
        config.layer_types = [config.layer_types[i] for i in keep]
    student = type(teacher)(config).to(dtype=torch.float32)
    renumber = {old: new for new, old in enumerate(keep)}
    state = {}
    for name, tensor in teacher.state_dict().items():
        if name.startswith(prefix + "."):
            index, rest = name[len(prefix) + 1 :].split(".", 1)
            if int(index) not in renumber:
                continue
            name = f"{prefix}.{renumber[int(index)]}.{rest}"
        state[name] = tensor.detach().to(torch.float32).clone()
    student.load_state_dict(state, strict=True)
    return student, keep


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    temperature: float,
    alpha: float,
) -> torch.Tensor:
    """The module docstring's loss, averaged over the counted predictions of the batch."""
    counted = ((attention_mask[:, :-1] != 0) & (attention_mask[:, 1:] != 0)).float()  # [B, T-1]
    s = student_logits[:, :-1].float()
    t = teacher_logits[:, :-1].float()
    kl = F.kl_div(
        F.log_softmax(s / temperature, dim=-1),
        F.log_softmax(t / temperature, dim=-1),
        reduction="none",
        log_target=True,
    ).sum(-1)  # [B, T-1]
    ce = F.cross_entropy(s.reshape(-1, s.shape[-1]), input_ids[:, 1:].reshape(-1), reduction="none").view_as(kl)
    total = counted.sum().clamp(min=1.0)
    return alpha * temperature**2 * (kl * counted).sum() / total + (1 - alpha) * (ce * counted).sum() / total


def distill(
    teacher: nn.Module,
    student: nn.Module,
    dataset: TensorDataset,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    temperature: float,
    alpha: float,
    seed: int,
) -> list[float]:
    """Train ``student`` on ``dataset`` towards ``teacher``; the loss of each step.

    Batches are drawn without replacement within each pass over the data (seeded);
    AdamW with a linear warm-up over the first 10% of steps, then cosine decay to a tenth.
    """
    if len(dataset) == 0:
        raise ValueError("cannot distil on an empty dataset")
    device = next(student.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 10)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    order: list[int] = []
    losses: list[float] = []
    teacher.eval()
    student.train()
    for _ in range(steps):
        if len(order) < batch_size:
            order += torch.randperm(len(dataset), generator=generator).tolist()
        batch, order = order[:batch_size], order[batch_size:]
        input_ids, attention_mask = (t[batch].to(device) for t in dataset.tensors)
        with torch.no_grad():
            teacher_logits = teacher(input_ids=input_ids, attention_mask=attention_mask).logits
        logits = student(input_ids=input_ids, attention_mask=attention_mask).logits
        loss = distillation_loss(logits, teacher_logits, input_ids, attention_mask, temperature, alpha)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(float(loss.detach()))
    student.eval()
    return losses


def tokens_per_second(
    models: dict[str, nn.Module], dataset: TensorDataset, *, batch_size: int, reps: int
) -> dict[str, float]:
    """Forward-pass throughput of each model on the same batches, the models taking turns.

    Tokens are the real (unpadded) tokens of the records; each model's best pass of ``reps``
    counts (the least disturbed on a shared machine).
    """
    counts = int(dataset.tensors[1].sum())
    best = {name: math.inf for name in models}
    for _ in range(reps):
        for name, model in models.items():
            device = next(model.parameters()).device
            started = time.perf_counter()
            with torch.inference_mode():
                for start in range(0, len(dataset), batch_size):
                    ids, mask = (t[start : start + batch_size].to(device) for t in dataset.tensors)
                    model(input_ids=ids, attention_mask=mask)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            best[name] = min(best[name], time.perf_counter() - started)
    return {name: counts / seconds for name, seconds in best.items()}


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def pick_held_out(texts: Sequence[str], share: float) -> list[bool]:
    """Which records are held out (True): by a hash of the text, so the split never depends on order."""
    return [int.from_bytes(hashlib.sha256(t.encode()).digest()[:8], "big") / 2**64 < share for t in texts]
