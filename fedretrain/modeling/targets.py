"""Which modules of a base model get LoRA adapters.

``lora.target_modules: null`` (the default) lets the architecture choose: peft's own
defaults for the model's ``config.model_type`` (``q_proj, v_proj`` for Llama, ``c_attn``
for GPT-2, ``query, value`` for BERT, ...), and for a model type peft has no defaults
for, every linear layer inside the attention blocks. An explicit list is used as given,
but every name in it must match a module: peft alone would refuse a list that matches
nothing without saying what the model has, and would silently skip a misspelt name
next to a correct one.

Names match the way peft matches a list: a module's dotted name equals the target or
ends with ``"." + target``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from torch import nn
from transformers.pytorch_utils import Conv1D

from fedretrain.errors import ModelLoadError

# GPT-2 and its relatives keep their projections in transformers' Conv1D (a transposed Linear).
LINEAR_TYPES = (nn.Linear, Conv1D)
_ATTENTION_MARKS = ("attn", "attention")


@dataclass(frozen=True)
class LoraTargets:
    """The resolved ``target_modules`` and where they came from (for the start-up line)."""

    modules: tuple[str, ...]
    source: str


def resolve_target_modules(model: nn.Module, requested: Sequence[str] | None, where: str = "the model") -> LoraTargets:
    """The LoRA targets for ``model``: ``requested`` checked, or chosen from the architecture.

    Parameters
    ----------
    model : nn.Module
        The base model (before LoRA is attached).
    requested : Sequence[str] | None
        ``lora.target_modules``; None chooses from the architecture.
    where : str
        What to call the model in an error (its ``model.name_or_path``).

    Raises
    ------
    ModelLoadError
        A requested name matches no module, or the architecture offers nothing to target;
        the message lists the model's linear module names.
    """
    names = [name for name, _ in model.named_modules() if name]
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if requested is not None:
        unmatched = [t for t in requested if not any(_matches(name, t) for name in names)]
        if unmatched:
            raise ModelLoadError(
                f"lora.target_modules {unmatched} match no module of {where} (model_type {model_type!r}); its "
                f"linear modules are: {', '.join(linear_module_names(model))}. Set lora.target_modules to some of "
                f"them, or to null to let fedretrain choose from the architecture"
            )
        return LoraTargets(tuple(requested), "lora.target_modules as configured")
    defaults = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(str(model_type), [])
    chosen = tuple(t for t in defaults if any(_matches(name, t) for name in names))
    if chosen:
        return LoraTargets(chosen, f"peft's defaults for model_type {model_type!r}")
    attention = attention_linear_targets(model)
    if not attention:
        raise ModelLoadError(
            f"cannot choose LoRA targets for {where}: peft has no defaults for model_type {model_type!r} and no "
            f"linear layer sits inside a module named like an attention block; set lora.target_modules to some "
            f"of its linear modules: {', '.join(linear_module_names(model))}"
        )
    return LoraTargets(attention, f"the attention blocks' linear layers (peft has no defaults for {model_type!r})")


def linear_module_names(model: nn.Module) -> list[str]:
    """The distinct last names of ``model``'s linear layers, in model order (``q_proj``, ``c_attn``, ...)."""
    leaves = [name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, LINEAR_TYPES)]
    return list(dict.fromkeys(leaves))


def attention_linear_targets(model: nn.Module) -> tuple[str, ...]:
    """Targets for every linear layer inside an attention block, and for nothing else.

    A layer's last name is enough when no linear layer of that name sits outside an
    attention block (``q_proj``); otherwise its name from the attention block on
    (BERT's ``attention.output.dense``, not every ``dense``).
    """
    linear = [name for name, module in model.named_modules() if isinstance(module, LINEAR_TYPES)]
    inside = {name: _attention_suffix(name) for name in linear}
    outside_leaves = {name.rsplit(".", 1)[-1] for name, suffix in inside.items() if suffix is None}
    targets = []
    for name, suffix in inside.items():
        if suffix is not None:
            leaf = name.rsplit(".", 1)[-1]
            targets.append(suffix if leaf in outside_leaves else leaf)
    return tuple(dict.fromkeys(targets))


def targets_transposed(model: nn.Module, targets: Sequence[str]) -> bool:
    """True when the targets are transformers ``Conv1D`` layers (peft's ``fan_in_fan_out``)."""
    return any(
        isinstance(module, Conv1D) and any(_matches(name, t) for t in targets) for name, module in model.named_modules()
    )


def _attention_suffix(name: str) -> str | None:
    """``name`` from its first attention-block component on (None: not inside one)."""
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):  # the layer itself is not the block it sits in
        if any(mark in part.lower() for mark in _ATTENTION_MARKS):
            return ".".join(parts[i:])
    return None


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith(f".{target}")
