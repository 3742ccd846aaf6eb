"""Local training of a site's LoRA parameters, with DP-SGD (opacus) or without.

One call of :func:`train_lora` is one round at one site. Under DP, batches are
Poisson samples and every step clips each record's gradient and adds noise.
Opacus starts a fresh accountant at every ``make_private``, so the engine's is
thrown away; the ledger records ``(noise_multiplier, sample_rate, steps)`` from
:class:`TrainResult`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from opacus import PrivacyEngine
from opacus.data_loader import DPDataLoader
from opacus.grad_sample.gsm_base import AbstractGradSampleModule
from opacus.optimizers import DPOptimizer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedretrain.errors import TrainingError
from fedretrain.training.evaluate import RecordLoss
from fedretrain.training.params import (  # noqa: F401 - re-exported: the training API
    GRAD_SAMPLE_MODES,
    OPTIMIZERS,
    DPParams,
    TrainParams,
    TrainResult,
    poisson_sample_rate,
)


def train_lora(
    model: nn.Module,
    dataset: TensorDataset,
    params: TrainParams,
    dp: DPParams,
    *,
    seed: int,
    num_threads: int | None = None,
) -> TrainResult:
    """Train the LoRA parameters of ``model`` in place for one round.

    Parameters
    ----------
    model
        A peft ``PeftModel`` (causal LM), already on its device, whose only
        trainable parameters are the LoRA ones. It comes back unwrapped, with
        no opacus hooks or ``grad_sample`` attributes, in its original
        train/eval mode.
    dataset
        ``(input_ids [N, T] long, attention_mask [N, T] long)``; padding has mask 0.
    params, dp
        Training and DP settings.
    seed
        Seeds batch sampling, DP noise (unless ``dp.secure_mode``) and dropout.
        The global torch RNG state is restored afterwards.
    num_threads
        If given, ``torch.set_num_threads`` for this call only.

    Raises
    ------
    TrainingError
        If no LoRA weight changed (opacus#820) or one became non-finite.
    ValueError
        If trainable parameters are missing or not all LoRA, or the dataset is empty.
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named or any("lora_" not in n for n, _ in named):
        others = [n for n, _ in named if "lora_" not in n][:3]
        raise ValueError(f"expected only LoRA weights to be trainable; found {others or 'none'}")
    trainable = [p for _, p in named]
    if len(dataset) == 0:
        raise ValueError("cannot train on an empty dataset")
    before = [p.detach().clone() for p in trainable]
    data_seed, noise_seed, torch_seed = np.random.SeedSequence(seed).generate_state(3).tolist()
    was_training = model.training
    try:
        with _thread_limit(num_threads), _forked_rng(trainable[0].device, torch_seed):
            optimizer = OPTIMIZERS[params.optimizer](trainable, params.lr)
            local = _proximal_term(params.proximal_mu, trainable, before)
            if dp.enabled:
                run = _train_private(model, optimizer, dataset, params, dp, data_seed, noise_seed, local)
            else:
                run = _train_plain(model, optimizer, dataset, params, data_seed, local)
    finally:
        model.train(was_training)
    delta = _lora_max_abs_delta(trainable, before)
    return TrainResult(
        steps=run.steps,
        num_examples=run.num_examples,
        mean_loss=run.loss_sum / run.num_examples if run.num_examples else math.nan,
        sample_rate=run.sample_rate,
        noise_multiplier=dp.noise_multiplier if dp.enabled else 0.0,
        lora_max_abs_delta=delta,
    )


@dataclass
class _Run:
    steps: int = 0
    num_examples: int = 0
    loss_sum: float = 0.0  # sum over processed records of their loss
    sample_rate: float = 0.0


def _train_plain(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    dataset: TensorDataset,
    params: TrainParams,
    data_seed: int,
    local: Callable[[], None] | None = None,
) -> _Run:
    # Fixed-size shuffled batches; a dataset smaller than a batch is one batch.
    batch_size = min(params.batch_size, len(dataset))
    generator = torch.Generator().manual_seed(data_seed)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True, generator=generator)
    run = _Run(sample_rate=batch_size / len(dataset))
    _run_steps(model, optimizer, loader, RecordLoss(), params.local_steps, run, local)
    return run


def _train_private(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    dataset: TensorDataset,
    params: TrainParams,
    dp: DPParams,
    data_seed: int,
    noise_seed: int,
    local: Callable[[], None] | None = None,
) -> _Run:
    generator = torch.Generator().manual_seed(data_seed)
    if dp.sample_rate is None:
        loader = DataLoader(dataset, batch_size=params.batch_size, generator=generator)
        expected = poisson_sample_rate(len(dataset), params.batch_size)
    else:
        # Poisson batches at the job's rate, whatever N: opacus would derive 1 / ceil(N / B).
        loader = DPDataLoader(dataset, sample_rate=dp.sample_rate, generator=generator)
        expected = dp.sample_rate
    noise_generator = None if dp.secure_mode else torch.Generator(_device(model))
    if noise_generator is not None:
        noise_generator.manual_seed(noise_seed)
    module, dp_optimizer, criterion, dp_loader = _make_private(
        model, optimizer, loader, dp, noise_generator=noise_generator
    )
    try:
        if dp.sample_rate is not None:
            # make_private reads 1 / len(loader) as the rate for its (discarded) accountant and
            # the mean's divisor; the divisor only scales the step, never the privacy.
            dp_optimizer.expected_batch_size = max(1.0, len(dataset) * dp.sample_rate)  # type: ignore[attr-defined]
        if not math.isclose(getattr(dp_loader, "sample_rate", math.nan), expected, rel_tol=1e-12):
            raise TrainingError(
                f"opacus samples at rate {getattr(dp_loader, 'sample_rate', None)}, expected {expected}; "
                "the ledger would record the wrong rate"
            )
        run = _Run(sample_rate=float(dp_loader.sample_rate))  # type: ignore[attr-defined]  # a DPDataLoader
        _run_steps(module, dp_optimizer, dp_loader, criterion, params.local_steps, run, local)
    finally:
        _release(module, model)
    return run


def _make_private(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: DataLoader,
    dp: DPParams,
    *,
    noise_generator: torch.Generator | None,
) -> tuple[nn.Module, torch.optim.Optimizer, Callable[..., torch.Tensor], DataLoader]:
    """Wrap with opacus; returns ``(module, optimizer, criterion, loader)`` to train with.

    The loader samples Poisson batches at ``1 / len(loader)``. Call the returned
    module (not ``model``) and undo with :func:`_release`.
    """
    try:
        with warnings.catch_warnings():
            # secure_mode is an explicit config choice; opacus would warn at every round.
            warnings.filterwarnings("ignore", message="Secure RNG turned off")
            # The engine's accountant is thrown away (the ledger is the source of truth).
            engine = PrivacyEngine(accountant="rdp", secure_mode=dp.secure_mode)
    except ImportError as exc:
        raise TrainingError("dp.secure_mode needs the torchcsprng package (not installed)") from exc
    wrapped = engine.make_private(
        module=model,
        optimizer=optimizer,
        criterion=RecordLoss(),
        data_loader=loader,
        noise_multiplier=dp.noise_multiplier,
        max_grad_norm=dp.max_grad_norm,
        # A DPDataLoader already samples Poisson batches at the job's rate.
        poisson_sampling=not isinstance(loader, DPDataLoader),
        grad_sample_mode=dp.grad_sample_mode,
        noise_generator=noise_generator,
    )
    if dp.grad_sample_mode == "ghost":
        # Ghost clipping runs two backward passes inside its criterion's backward().
        module, dp_optimizer, criterion, dp_loader = wrapped
    else:
        module, dp_optimizer, dp_loader = wrapped
        criterion = RecordLoss()
    return module, dp_optimizer, criterion, dp_loader


def _run_steps(
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: DataLoader,
    criterion: Callable[..., torch.Tensor],
    steps: int,
    run: _Run,
    local: Callable[[], None] | None = None,
) -> None:
    """Take optimizer steps until ``run.steps == steps``, re-iterating ``loader``.

    ``local`` adds a data-independent term to the gradients just before each update
    (:func:`_proximal_term`)."""
    module.train()
    device = _device(module)
    while run.steps < steps:
        for input_ids, attention_mask in loader:
            optimizer.zero_grad(set_to_none=True)
            if len(input_ids) == 0:
                _empty_batch_gradients(optimizer.params)  # type: ignore[attr-defined]
            else:
                input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
                # input_ids positional: opacus' "ew" wrapper takes the batch as first argument.
                logits = module(input_ids, attention_mask=attention_mask).logits  # [B, T, V]
                loss = criterion(logits, input_ids, attention_mask)
                with warnings.catch_warnings():
                    # Hooks on the first LoRA layer see inputs from frozen layers, which
                    # need no gradient; torch warns about that, opacus handles it.
                    warnings.filterwarnings("ignore", message="Full backward hook is firing")
                    loss.backward()
                run.loss_sum += loss.item() * len(input_ids)
                run.num_examples += len(input_ids)
            _step(optimizer, local)
            run.steps += 1
            if run.steps == steps:
                break


def _proximal_term(mu: float, params: list[nn.Parameter], anchors: list[torch.Tensor]) -> Callable[[], None] | None:
    """FedProx's term ``mu/2 ||w - w_0||^2``: adds its gradient ``mu (w - w_0)`` to each parameter's.

    None for ``mu == 0``. The term depends on no record, so under DP its gradient is added
    to the private gradient after opacus clipped and noised it (:func:`_step`): it neither
    passes through the per-record clipping (which would bias it and the clip) nor costs any
    privacy (post-processing of a DP release plus public values).
    """
    if mu == 0:
        return None

    def add() -> None:
        with torch.no_grad():
            for p, anchor in zip(params, anchors, strict=True):
                if p.grad is not None:
                    p.grad.add_(p.detach() - anchor, alpha=mu)

    return add


def _step(optimizer: torch.optim.Optimizer, local: Callable[[], None] | None) -> None:
    """One update; ``local``'s gradient joins the (private, if DP) gradient just before it."""
    if local is None:
        optimizer.step()
    elif isinstance(optimizer, DPOptimizer):
        # What DPOptimizer.step does, with the term added between the private gradient
        # (clipped, noised, scaled into p.grad by pre_step) and the update.
        if optimizer.pre_step():
            local()
            optimizer.original_optimizer.step()
    else:
        local()
        optimizer.step()


def _empty_batch_gradients(params: list[nn.Parameter]) -> None:
    # A Poisson batch can be empty. HF models cannot run a forward pass on zero
    # rows, yet the step must still happen (and be noised) for the accounting to
    # hold. So we hand opacus what a forward/backward over zero records yields:
    # per-record gradients of shape [0, *p.shape] (hooks, functorch, ew) and a
    # zero clipped sum in p.grad (ghost clipping reads p.grad).
    for p in params:
        p.grad_sample = p.new_zeros((0, *p.shape))  # type: ignore[attr-defined]  # opacus reads it
        p.grad = torch.zeros_like(p)


def _release(module: nn.Module, model: nn.Module) -> None:
    """Undo :func:`_make_private`: hooks, wrapper, and what opacus left on the model."""
    if isinstance(module, AbstractGradSampleModule):
        module.to_standard_module()  # removes hooks, grad_sample, _forward_counter, ...
    # opacus' cleanup leaves DPOptimizer's summed_grad on parameters and the hooks'
    # (by now empty) activation lists on layers; drop both and the last gradients.
    for p in model.parameters():
        if hasattr(p, "summed_grad"):
            del p.summed_grad
        p.grad = None
    for layer in model.modules():
        if hasattr(layer, "activations"):
            del layer.activations


def _lora_max_abs_delta(trainable: list[nn.Parameter], before: list[torch.Tensor]) -> float:
    with torch.no_grad():
        if not all(bool(torch.isfinite(p).all()) for p in trainable):
            raise TrainingError("LoRA weights became non-finite during training")
        delta = max(float((p - b).abs().max()) for p, b in zip(trainable, before, strict=True))
    if delta == 0.0:
        raise TrainingError(
            f"LoRA weights did not change during training (opacus#820?): max |delta| = 0.0 "
            f"over {len(trainable)} tensors. Check lr > 0 and that the model was on its "
            "device before get_peft_model and make_private."
        )
    return delta


@contextmanager
def _forked_rng(device: torch.device, seed: int) -> Iterator[None]:
    # Dropout draws from the global torch RNG: seed it for this call only and
    # give the caller its RNG state back afterwards.
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


@contextmanager
def _thread_limit(num_threads: int | None) -> Iterator[None]:
    if num_threads is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _device(model: nn.Module) -> torch.device:
    return next(p for p in model.parameters() if p.requires_grad).device
