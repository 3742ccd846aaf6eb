"""Base model + LoRA adapter, assembled the same way at the coordinator and at every site.

Both sides build the adapter from the same seed, so their initial adapters are
bit-identical, and both load and read adapter tensors through these two functions.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from peft import PeftModel, get_peft_model_state_dict, set_peft_model_state_dict
from transformers import PreTrainedTokenizerBase

from fedretrain.arrays import AdapterSpec, check_adapter, from_torch_state_dict, to_torch_state_dict
from fedretrain.config.schema import LoraSettings, ModelConfig
from fedretrain.modeling.loading import (
    attach_lora,
    load_base_model,
    load_tokenizer,
    model_nbytes,
    select_device,
    select_dtype,
)
from fedretrain.modeling.targets import resolve_target_modules

logger = logging.getLogger("fedretrain")


@dataclass
class LoraModel:
    tokenizer: PreTrainedTokenizerBase
    model: PeftModel  # on `device`
    device: torch.device
    spec: AdapterSpec  # keys, shapes and dtypes every adapter update must match
    base_nbytes: int  # bytes of the full base model's parameters
    target_modules: tuple[str, ...]  # the LoRA targets as resolved for this architecture


def load_lora_model(
    model_cfg: ModelConfig,
    lora: LoraSettings,
    *,
    seed: int,
    device: str = "auto",
    cache_dir: Path | None = None,
    rank: int | None = None,
) -> LoraModel:
    """Load the base model on its device, then attach LoRA (in that order: opacus#820).

    ``rank`` below ``lora.r``: a site's lower-rank LoRA (fedretrain/lora_ranks.py), with
    ``alpha`` scaled by ``rank / lora.r`` so that peft's scale ``alpha / r`` is the job's.

    ``lora.target_modules`` None chooses the targets from the architecture
    (``fedretrain.modeling.targets``); the targets used are logged and kept in
    ``LoraModel.target_modules``, which a published manifest records.
    """
    dev = select_device(device)
    dtype = select_dtype(dev, model_cfg.dtype)
    name = model_cfg.name_or_path
    tokenizer = load_tokenizer(name, cache_dir=cache_dir)
    base = load_base_model(name, dev, dtype, cache_dir=cache_dir, init_missing_seed=model_cfg.init_missing_seed)
    base_nbytes = model_nbytes(base)
    targets = resolve_target_modules(base, lora.target_modules, where=f"model.name_or_path={name!r}")
    logger.info("LoRA targets of %s: %s (%s)", name, ", ".join(targets.modules), targets.source)
    r = lora.r if rank is None else min(rank, lora.r)
    model = attach_lora(
        base, r=r, alpha=lora.alpha * r / lora.r, dropout=lora.dropout, target_modules=targets.modules, seed=seed
    )
    if lora.freeze_a:  # FFA-LoRA: A keeps the seeded initialisation every site and the coordinator share
        for param_name, param in model.named_parameters():
            if "lora_A" in param_name:
                param.requires_grad_(False)
    spec = AdapterSpec.from_state_dict(adapter_arrays(model))
    return LoraModel(
        tokenizer=tokenizer,
        model=model,
        device=dev,
        spec=spec,
        base_nbytes=base_nbytes,
        target_modules=targets.modules,
    )


def adapter_arrays(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """The adapter's tensors as float32 numpy arrays (what goes on the wire)."""
    return from_torch_state_dict(get_peft_model_state_dict(model))


def load_adapter_arrays(lm: LoraModel, arrays: dict[str, np.ndarray]) -> None:
    """Check ``arrays`` against the model's adapter spec, then load them into the model."""
    check_adapter(arrays, lm.spec)
    state = {k: v.to(lm.device) for k, v in to_torch_state_dict(arrays).items()}
    result = set_peft_model_state_dict(lm.model, state)
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        # check_adapter already matched the keys; this would be a peft naming change.
        raise RuntimeError(f"peft did not accept adapter keys: {unexpected[:3]}")
