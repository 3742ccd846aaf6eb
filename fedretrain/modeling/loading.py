"""The one path by which the coordinator and every site load a base model.

``model.name_or_path`` is ``"embedded"`` (the built-in model, built on first
use), a local ``save_pretrained`` directory, or a hub id already in the local
Hugging Face cache. fedretrain never downloads at run time: sites usually
have no hub access, and a download inside each of many workers would be slow
and racy. Everything is resolved to a local directory first and then loaded
with ``from_pretrained(..., local_files_only=True)``, so a missing model fails
in well under a second with a message that says how to fix it.

The order of operations matters for DP training: load, move to the device,
freeze, *then* attach LoRA. If the model is moved after ``get_peft_model``,
Opacus' hooks and the LoRA tensors drift apart and the adapter silently never
updates (opacus#820).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import torch
from huggingface_hub import snapshot_download
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from fedretrain.errors import ModelLoadError
from fedretrain.modeling.embedded import EMBEDDED_NAME, embedded_model_dir, quiet_progress_bars
from fedretrain.modeling.targets import targets_transposed

logger = logging.getLogger("fedretrain")

DEVICE_CHOICES = ("auto", "cpu", "cuda")
DTYPE_CHOICES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# What from_pretrained raises for a missing, partial or unreadable model (hub errors are OSErrors
# or ValueErrors; ImportError when the model needs an optional package that is not installed).
_LOAD_ERRORS = (OSError, ValueError, ImportError)
_SHOWN = 8  # parameter names an error lists before "and N more"


def select_device(preference: str = "auto") -> torch.device:
    """Map a device preference ("auto", "cpu", "cuda") to a ``torch.device``.

    "auto" is the current CUDA device when one is available, else the CPU.

    Raises
    ------
    ValueError
        ``preference`` is not one of ``DEVICE_CHOICES``.
    ModelLoadError
        "cuda" was asked for but this torch build sees no CUDA device.
    """
    if preference not in DEVICE_CHOICES:
        raise ValueError(f"device must be one of {', '.join(DEVICE_CHOICES)}; got {preference!r}")
    if preference == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        # An explicit index, so comparisons with a parameter's device ("cuda:0") hold.
        return torch.device("cuda", torch.cuda.current_device())
    if preference == "cuda":
        raise ModelLoadError(
            f"device 'cuda' was requested but no CUDA device is available (torch {torch.__version__}, "
            f"CUDA build {torch.version.cuda}); use device=cpu or device=auto"
        )
    return torch.device("cpu")


def select_dtype(device: torch.device, preference: str = "auto") -> torch.dtype:
    """Map a dtype preference ("auto", "float32", "bfloat16") to a ``torch.dtype``.

    "auto" is bfloat16 on a CUDA device that supports it and float32
    otherwise (bfloat16 matmuls on CPU are slow and gain nothing here).
    """
    if preference == "auto":
        use_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if use_bf16 else torch.float32
    if preference not in DTYPE_CHOICES:
        raise ValueError(f"dtype must be one of auto, {', '.join(DTYPE_CHOICES)}; got {preference!r}")
    return DTYPE_CHOICES[preference]


def resolve_model_path(name_or_path: str, cache_dir: Path | None = None) -> str:
    """Turn ``model.name_or_path`` into a local directory to load from.

    Parameters
    ----------
    name_or_path : str
        ``"embedded"`` (takes precedence over a directory of that name), a
        local directory, or a hub id present in the local Hugging Face cache.
    cache_dir : Path | None
        fedretrain's cache for the embedded model (not the Hugging Face cache).

    Raises
    ------
    ModelLoadError
        A path that does not exist, or a hub id that is not in the local cache.
    """
    if name_or_path == EMBEDDED_NAME:
        return str(embedded_model_dir(cache_dir))
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return str(path)
    if name_or_path.startswith(("/", ".", "~")) or name_or_path.count("/") > 1:
        raise ModelLoadError(
            f"model directory {name_or_path!r} does not exist; set model.name_or_path to a directory written by "
            f"save_pretrained (or to '{EMBEDDED_NAME}' for the built-in model)"
        )
    try:
        return snapshot_download(repo_id=name_or_path, local_files_only=True)
    except _LOAD_ERRORS as err:
        raise ModelLoadError(_not_available(name_or_path, err)) from err


def _not_available(name_or_path: str, err: BaseException) -> str:
    return (
        f"model {name_or_path!r} is neither a local directory nor in the local Hugging Face cache, and "
        f"fedretrain does not download at run time ({type(err).__name__}). On a machine with hub access run "
        f"`hf download {name_or_path} --local-dir DIR` (older clients: `huggingface-cli download`), copy DIR "
        f"here and set model.name_or_path=DIR; or use model.name_or_path={EMBEDDED_NAME} for the built-in model"
    )


def load_tokenizer(name_or_path: str, cache_dir: Path | None = None) -> PreTrainedTokenizerBase:
    """Load the tokenizer for ``name_or_path``; give it a pad token (eos) if it has none.

    Raises
    ------
    ModelLoadError
        The model cannot be found, or its directory holds no usable tokenizer.
    """
    path = resolve_model_path(name_or_path, cache_dir)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except _LOAD_ERRORS as err:
        raise ModelLoadError(
            f"cannot load a tokenizer for model.name_or_path={name_or_path!r} from {path}: {err}"
        ) from err
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelLoadError(f"the tokenizer of {name_or_path!r} has neither a pad nor an eos token")
        # Padded positions are masked out of the loss, so reusing eos is harmless.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base_model(
    name_or_path: str,
    device: torch.device,
    dtype: torch.dtype,
    cache_dir: Path | None = None,
    *,
    init_missing_seed: int | None = None,
) -> PreTrainedModel:
    """Load a causal LM, move it to ``device``, switch to eval mode and freeze it.

    A checkpoint that lacks some of the model's parameters (a BERT saved without its
    LM-head transform, a Llama saved without its untied ``lm_head``) is refused:
    transformers would initialise them at random, differently in every process, so
    the coordinator and each site would score a different model. With
    ``init_missing_seed`` they are initialised from that seed instead, the same
    values in every process (the seed is then part of the base model's identity,
    see ``fedretrain.registry.base_model``). A tied head is not missing.

    Returns
    -------
    PreTrainedModel
        Every parameter on ``device`` in ``dtype`` with ``requires_grad=False``;
        ready for ``attach_lora``.

    Raises
    ------
    ModelLoadError
        The model cannot be found, its directory is not a loadable causal LM, or it
        lacks parameters and ``init_missing_seed`` is None.
    """
    path = resolve_model_path(name_or_path, cache_dir)
    try:
        # Missing parameters are drawn from torch's global generator while loading: seeded
        # here, on the CPU (the load happens there), and the caller's state put back after.
        with quiet_progress_bars(), torch.random.fork_rng(devices=[]):
            if init_missing_seed is not None:
                torch.manual_seed(init_missing_seed)
            loaded = AutoModelForCausalLM.from_pretrained(
                path, dtype=dtype, local_files_only=True, output_loading_info=True
            )
    except _LOAD_ERRORS as err:
        raise ModelLoadError(
            f"cannot load a causal LM for model.name_or_path={name_or_path!r} from {path}: {err}"
        ) from err
    model, info = cast(tuple[PreTrainedModel, dict[str, Any]], loaded)
    _check_complete(name_or_path, path, type(model).__name__, info, init_missing_seed)
    model.to(device)  # type: ignore[arg-type]  # transformers' typing of .to() rejects a torch.device
    model.eval()
    model.requires_grad_(False)
    logger.info(
        "Loaded base model %s (%d parameters, %s, %s)",
        name_or_path,
        count_parameters(model)[1],
        device,
        str(dtype).removeprefix("torch."),
    )
    return model


def _check_complete(name_or_path: str, path: str, arch: str, info: dict[str, Any], seed: int | None) -> None:
    """Refuse a load that initialised parameters at random, unless a seed made them deterministic."""
    fresh = sorted({*info.get("missing_keys", ()), *(_key(k) for k in info.get("mismatched_keys", ()))})
    if not fresh:
        return
    shown = ", ".join(fresh[:_SHOWN]) + (f" and {len(fresh) - _SHOWN} more" if len(fresh) > _SHOWN else "")
    if seed is None:
        raise ModelLoadError(
            f"model.name_or_path={name_or_path!r}: the checkpoint in {path} lacks {len(fresh)} parameter(s) of "
            f"{arch} that transformers would initialise at random, differently in every process: "
            f"{shown}. Fix: point model.name_or_path at a complete checkpoint of a causal LM, or set "
            f"model.init_missing_seed=<int> to initialise them from that seed, the same in every process (the "
            f"seed becomes part of the base model's identity)"
        )
    logger.warning(
        "Base model %s: %d parameter(s) missing from the checkpoint, initialised from model.init_missing_seed=%d: %s",
        name_or_path,
        len(fresh),
        seed,
        shown,
    )


def _key(entry: Any) -> str:
    # transformers reports a mismatched key as (name, checkpoint shape, model shape).
    return str(entry[0] if isinstance(entry, tuple) else entry)


def attach_lora(
    model: PreTrainedModel,
    *,
    r: int,
    alpha: float,
    dropout: float,
    target_modules: Sequence[str],
    seed: int,
) -> PeftModel:
    """Wrap ``model`` with fresh LoRA adapters; only they are trainable.

    Call it with the model already on its final device (opacus#820). The
    adapter init is seeded: the coordinator and every site get bit-identical
    initial adapters from the same ``seed``. The caller's global RNG state is
    left as it was.

    ``target_modules`` are taken as given: ``load_lora_model`` resolves and checks them
    first (``fedretrain.modeling.targets.resolve_target_modules``).

    Raises
    ------
    ModelLoadError
        The model's parameters span several devices, or peft matches no module to
        ``target_modules``.
    """
    _single_device(model, "before attaching LoRA")
    targets = tuple(target_modules)
    config = LoraConfig(
        task_type="CAUSAL_LM",
        r=r,
        # A site's lower rank scales alpha by r_k / r (fedretrain/lora_ranks.py), so it may not be
        # whole: peft types it int but only divides it by r (scaling = lora_alpha / r).
        lora_alpha=alpha,  # type: ignore[arg-type]
        lora_dropout=dropout,
        target_modules=list(targets),
        # GPT-2's Conv1D stores its weight transposed; saying so spares peft's warning in every worker.
        fan_in_fan_out=targets_transposed(model, targets),
        bias="none",
    )
    # peft initialises the adapter on the CPU RNG before moving it to the base layer's device,
    # so the same seed gives the same adapter on CPU and GPU.
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        # peft 0.21 calls a transformers 5 method that warns of its own deprecation in every
        # worker; nothing an operator can act on.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        torch.manual_seed(seed)
        try:
            peft_model = get_peft_model(model, config)
        except ValueError as err:
            raise ModelLoadError(f"cannot attach LoRA to target modules {list(targets)}: {err}") from err
    _single_device(peft_model, "after attaching LoRA")
    stray = [name for name, p in peft_model.named_parameters() if p.requires_grad and "lora_" not in name]
    if stray:
        raise ModelLoadError(f"non-LoRA parameters are trainable after attach_lora: {stray[:3]}")
    return peft_model


def _single_device(model: torch.nn.Module, when: str) -> torch.device:
    devices = sorted({str(p.device) for p in model.parameters()})
    if len(devices) != 1:
        raise ModelLoadError(
            f"the model's parameters must all be on one device {when} (opacus#820: a model moved after "
            f"get_peft_model never updates its LoRA weights); found {devices}"
        )
    return torch.device(devices[0])


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """Return ``(trainable, total)`` parameter counts; tied weights count once."""
    params = list(model.parameters())  # nn.Module.parameters() already de-duplicates shared tensors
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def model_nbytes(model: torch.nn.Module) -> int:
    """Bytes held by all of ``model``'s parameters (tied weights once), for size reports."""
    return sum(p.numel() * p.element_size() for p in model.parameters())
