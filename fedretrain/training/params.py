"""What a round of local training takes and gives back: settings and result, as plain data."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from torch import nn


# The optimizers and per-sample gradient modes a job may name: the one list of each, which
# the config validates against too. torch is imported only when an optimizer is built, so
# composing a config does not load it.
def _adamw(params: list[nn.Parameter], lr: float) -> torch.optim.Optimizer:
    import torch

    # No weight decay: it would pull LoRA weights toward 0 even without data.
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.0)


def _sgd(params: list[nn.Parameter], lr: float) -> torch.optim.Optimizer:
    import torch

    return torch.optim.SGD(params, lr=lr)


OPTIMIZERS: Mapping[str, Callable[[list[nn.Parameter], float], torch.optim.Optimizer]] = {
    "adamw": _adamw,
    "sgd": _sgd,
}
# opacus' per-sample gradient back-ends; all give the same clipped gradient for LoRA.
GRAD_SAMPLE_MODES = ("hooks", "functorch", "ew", "ghost")


# FedProx's mu a site accepts: a larger one pins the update to the global adapter anyway;
# beyond it is a typo (the config refuses it, and so does a site sent one).
MAX_PROXIMAL_MU = 1000.0


@dataclass(frozen=True)
class TrainParams:
    """How a site trains in one round.

    ``batch_size`` is the expected (Poisson) batch size under DP and the fixed
    batch size without DP. ``proximal_mu`` > 0 adds FedProx's proximal term
    ``mu/2 ||w - w_global||^2`` to the local objective (Li et al. 2020), ``w_global``
    being the adapter the round started from.
    """

    local_steps: int
    batch_size: int
    lr: float
    optimizer: str = "adamw"
    proximal_mu: float = 0.0

    def __post_init__(self) -> None:
        if self.local_steps < 1:
            raise ValueError(f"local_steps must be >= 1, got {self.local_steps}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not (self.lr >= 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be finite and >= 0, got {self.lr}")
        _check_choice("optimizer", self.optimizer, OPTIMIZERS)
        if not 0 <= self.proximal_mu <= MAX_PROXIMAL_MU:
            raise ValueError(f"proximal_mu must be in [0, {MAX_PROXIMAL_MU:g}], got {self.proximal_mu}")


@dataclass(frozen=True)
class DPParams:
    """DP-SGD settings; ignored except for validation when ``enabled`` is False.

    ``secure_mode`` uses a cryptographically secure RNG for sampling and noise
    (needs the ``torchcsprng`` package); the ``seed`` of :func:`train_lora` then
    no longer determines the noise.
    """

    enabled: bool
    noise_multiplier: float
    max_grad_norm: float
    grad_sample_mode: str = "hooks"
    secure_mode: bool = False
    # Poisson rate q, fixed by the job whatever the data (None: opacus' 1 / ceil(N / B)). A
    # rate derived from N makes sigma and epsilon functions of N, and a site reports both.
    sample_rate: float | None = None

    def __post_init__(self) -> None:
        if not (self.noise_multiplier >= 0 and math.isfinite(self.noise_multiplier)):
            raise ValueError(f"noise_multiplier must be finite, >= 0; got {self.noise_multiplier}")
        if not (self.max_grad_norm > 0 and math.isfinite(self.max_grad_norm)):
            raise ValueError(f"max_grad_norm must be finite and > 0, got {self.max_grad_norm}")
        _check_choice("grad_sample_mode", self.grad_sample_mode, GRAD_SAMPLE_MODES)
        if self.sample_rate is not None and not (0 < self.sample_rate <= 1):
            raise ValueError(f"sample_rate must be in (0, 1], got {self.sample_rate}")


@dataclass(frozen=True)
class TrainResult:
    """What one round of local training did; under DP, what the ledger must record."""

    steps: int  # optimizer steps taken, empty Poisson batches included
    num_examples: int  # records actually processed (sum of batch sizes)
    mean_loss: float  # mean loss per processed record, before each update (nan if none)
    sample_rate: float  # DP: the Poisson rate used (poisson_sample_rate); else batch / N
    noise_multiplier: float  # sigma of the DP noise; 0.0 when DP is off
    lora_max_abs_delta: float  # largest |change| of any LoRA weight over the round


def poisson_sample_rate(num_examples: int, batch_size: int) -> float:
    """Poisson sampling rate DP training uses: ``1 / ceil(N / B)``, as opacus derives it.

    Equal to ``B / N`` when ``B`` divides ``N``, a little below otherwise. Check
    the budget before a round with this rate so that check and record agree.
    """
    if num_examples < 1 or batch_size < 1:
        raise ValueError(f"need num_examples, batch_size >= 1; got {num_examples}, {batch_size}")
    return 1.0 / math.ceil(num_examples / batch_size)


def _check_choice(key: str, value: str, valid: Mapping[str, object] | tuple[str, ...]) -> None:
    if value not in valid:
        raise ValueError(f"{key} must be one of {', '.join(sorted(valid))}; got {value!r}")
