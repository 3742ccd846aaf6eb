"""Use what the site received: the base model plus the site's current adapter, generating text.

The adapter is loaded with peft's own ``PeftModel.from_pretrained`` from the installed
version's directory (``adapter_model.safetensors`` + ``adapter_config.json``). Before
that, the stored version is verified again (signature against the pinned key, file
hashes, the base model's hash): files at rest can change too.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel

from client.install.model_store import ModelStore
from fedretrain.errors import VerificationError
from fedretrain.modeling.loading import load_base_model, load_tokenizer, resolve_model_path, select_device, select_dtype
from fedretrain.registry.base_model import base_model_identity
from fedretrain.registry.bundle import VersionBundle, verify_bundle
from fedretrain.registry.signing import load_public_key


@dataclass(frozen=True)
class Generation:
    text: str  # the prompt followed by the generated continuation
    version: int  # the installed version that produced it
    new_tokens: int


@dataclass(frozen=True)
class InstalledModel:
    """The base model with the site's current adapter, loaded and verified, ready to generate."""

    model: PeftModel
    tokenizer: Any
    version: int
    device: torch.device


def load_installed(store_dir: Path, *, coordinator_key: Path | None = None, device: str = "auto") -> InstalledModel:
    """The site's current version on its base model, verified again first when ``coordinator_key`` is given.

    Raises
    ------
    VerificationError
        Nothing is installed, or the stored version fails its checks.
    """
    store = ModelStore(store_dir)
    version = store.state().current
    if version is None:
        raise VerificationError("store", f"{store_dir}: no version is installed at this site yet")
    version_dir = store.version_dir(version)
    bundle = VersionBundle.from_dir(version_dir)
    name = bundle.manifest["base_model"]["name"]
    # The seed that built the parameters the base checkpoint lacks, when the version was trained so.
    init_seed = bundle.manifest["base_model"].get("init_missing_seed")
    model_dir = Path(resolve_model_path(name))
    if coordinator_key is not None:
        # Expiry guards installation (a frozen coordinator cannot keep a site on an old
        # version); a version installed while valid stays usable until the next one.
        verify_bundle(
            bundle,
            load_public_key(coordinator_key),
            now=datetime.now(UTC),
            check_expiry=False,
            base_model_sha256=base_model_identity(name, model_dir, init_seed)["sha256"],
        )
    dev = select_device(device)
    tokenizer = load_tokenizer(name)
    base = load_base_model(name, dev, select_dtype(dev, "auto"), init_missing_seed=init_seed)
    model = PeftModel.from_pretrained(base, str(version_dir), is_trainable=False).eval()
    return InstalledModel(model=model, tokenizer=tokenizer, version=version, device=dev)


def complete(
    installed: InstalledModel, prompt: str, *, max_new_tokens: int = 40, temperature: float = 0.0, seed: int = 0
) -> Generation:
    """``prompt`` continued by ``installed``: greedy at ``temperature`` 0, else sampled, seeded by ``seed``."""
    tokenizer = installed.tokenizer
    inputs = tokenizer(prompt, return_tensors="pt").to(installed.device)
    torch.manual_seed(seed)
    with torch.inference_mode():
        out = installed.model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=temperature > 0,
            temperature=temperature if temperature > 0 else None,
            top_p=None,
            top_k=None,
            pad_token_id=tokenizer.pad_token_id,
        )
    new = out[0, inputs["input_ids"].shape[1] :]
    text = prompt + str(tokenizer.decode(new, skip_special_tokens=True))
    return Generation(text=text, version=installed.version, new_tokens=int(new.numel()))


def generate(
    store_dir: Path,
    prompt: str,
    *,
    coordinator_key: Path | None = None,
    max_new_tokens: int = 40,
    temperature: float = 0.0,
    seed: int = 0,
    device: str = "auto",
) -> Generation:
    """Generate a continuation of ``prompt`` with the site's current version (:func:`load_installed`,
    then :func:`complete`).

    Raises
    ------
    VerificationError
        Nothing is installed, or the stored version fails its checks.
    """
    installed = load_installed(store_dir, coordinator_key=coordinator_key, device=device)
    return complete(installed, prompt, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
