"""Use what the site received: the base model plus the site's current adapter, generating text.

The adapter is loaded with peft's own ``PeftModel.from_pretrained`` from the installed
version's directory (``adapter_model.safetensors`` + ``adapter_config.json``). Before
that, the stored version is verified again (signature against the pinned key, file
hashes, the base model's hash): files at rest can change too.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel

from client.install.model_store import ModelStore
from client.install.trial import Trial, current_trial
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
    """The base model with the site's current adapter, loaded and verified, ready to generate.

    With ``trial``, the version on trial at this site (client/install/trial.py) is loaded
    beside it as peft's second adapter, :data:`TRIAL_ADAPTER`, on the same base weights.
    """

    model: Any  # a PeftModel; the student: a plain transformers causal LM
    tokenizer: Any
    version: int
    device: torch.device
    trial: Trial | None = None
    student: bool = False  # the smaller model distilled from the version (model-variant='student')
    fallback: str | None = None  # why a site of model-variant='student' answers with the full version


INSTALLED_ADAPTER, TRIAL_ADAPTER = "default", "trial"
log = logging.getLogger("fedretrain.client")


def load_installed(
    store_dir: Path,
    *,
    coordinator_key: Path | None = None,
    device: str = "auto",
    with_trial: bool = False,
    variant: str = "full",
) -> InstalledModel:
    """The site's current version on its base model, verified again first when ``coordinator_key`` is given;
    ``with_trial``: and the version on trial, if any, verified the same way. ``variant='student'``:
    the student distilled from the current version instead (client/install/student.py), verified
    with its teacher (the base model's tokenizer); never with a trial (a canary runs full versions).

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
    on_trial = current_trial(store) if with_trial else None
    if coordinator_key is not None:
        # Expiry guards installation (a frozen coordinator cannot keep a site on an old
        # version); a version installed while valid stays usable until the next one. The base
        # model's identity (a hash of its files) is computed once for both versions.
        key, sha256 = load_public_key(coordinator_key), base_model_identity(name, model_dir, init_seed)["sha256"]
        trial_bundles = [VersionBundle.from_dir(on_trial[1])] if on_trial is not None else []
        for checked in (bundle, *trial_bundles):
            verify_bundle(checked, key, now=datetime.now(UTC), check_expiry=False, base_model_sha256=sha256)
    dev = select_device(device)
    tokenizer = load_tokenizer(name)
    fallback = None
    if variant == "student":
        from client.install.student import checked_student, student_dir
        from fedretrain.registry.student import load_student

        if coordinator_key is None:
            raise VerificationError("student", "a student is loaded only verified: give the coordinator key")
        if student_dir(store, version).is_dir():  # a student that fails its checks is a failure, never skipped
            student = checked_student(store, version, key, now=datetime.now(UTC), check_expiry=False)
            model = load_student(student, device=dev, dtype=select_dtype(dev, "auto"))
            return InstalledModel(model=model, tokenizer=tokenizer, version=version, device=dev, student=True)
        # None came with this version (its gate refused it, or the coordinator does not distil): the
        # site answers with the full version rather than not at all, and says so.
        fallback = f"no student of version {version} is installed here; the full version answers"
        log.warning("%s: %s", store_dir, fallback)
    base = load_base_model(name, dev, select_dtype(dev, "auto"), init_missing_seed=init_seed)
    model = PeftModel.from_pretrained(base, str(version_dir), is_trainable=False).eval()
    if on_trial is not None:
        model.load_adapter(str(on_trial[1]), adapter_name=TRIAL_ADAPTER, is_trainable=False)
        model.set_adapter(INSTALLED_ADAPTER)
        model.eval()
    trial_info = on_trial[0] if on_trial is not None else None
    return InstalledModel(
        model=model, tokenizer=tokenizer, version=version, device=dev, trial=trial_info, fallback=fallback
    )


def complete(
    installed: InstalledModel,
    prompt: str,
    *,
    max_new_tokens: int = 40,
    temperature: float = 0.0,
    seed: int = 0,
    trial: bool = False,
) -> Generation:
    """``prompt`` continued by ``installed``: greedy at ``temperature`` 0, else sampled, seeded by ``seed``;
    ``trial``: by the version on trial (one caller at a time: the active adapter is switched)."""
    if trial and installed.trial is None:
        raise VerificationError("trial", "no version is on trial at this site")
    if not installed.student:
        installed.model.set_adapter(TRIAL_ADAPTER if trial else INSTALLED_ADAPTER)
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
    version = installed.trial.version if trial and installed.trial is not None else installed.version
    return Generation(text=text, version=version, new_tokens=int(new.numel()))


def generate(
    store_dir: Path,
    prompt: str,
    *,
    coordinator_key: Path | None = None,
    max_new_tokens: int = 40,
    temperature: float = 0.0,
    seed: int = 0,
    device: str = "auto",
    variant: str = "full",
) -> Generation:
    """Generate a continuation of ``prompt`` with the site's current version (:func:`load_installed`,
    then :func:`complete`).

    Raises
    ------
    VerificationError
        Nothing is installed, or the stored version fails its checks.
    """
    installed = load_installed(store_dir, coordinator_key=coordinator_key, device=device, variant=variant)
    return complete(installed, prompt, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
