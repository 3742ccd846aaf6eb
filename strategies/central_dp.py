"""Client-level DP at the coordinator: Flower's server-side DP wrappers, and their epsilon.

The sites' DP-SGD (client/round/) protects each of their records against the coordinator.
This adds what protects a whole site's contribution against whoever sees the published
versions (McMahan et al. 2018): each accepted update is clipped to a norm around the global
adapter, and the aggregate gets Gaussian noise. Flower's wrappers do both
(``DifferentialPrivacyServerSideFixedClipping``, ``...AdaptiveClipping``, Andrew et al.
2021); they sit between the reply checks and the algorithm, so they see only accepted
replies. Their noise on the mean is ``noise_multiplier * clipping_norm / n`` for the ``n``
they are told are sampled. FedAvg divides by the number of accepted replies ``m``, at least
the quorum ``q``: adding or removing one site moves that mean by up to ``2 C / (m + 1) <= 2 C / q``
(the bounded-denominator estimator, McMahan et al. 2018), so they are told ``n = q / 2``.
Only a plain mean has that sensitivity: the config allows central DP with ``fedavg`` and
``fedprox`` alone (a server optimiser or a robust selection would need its own analysis).

Accounting: one Gaussian release per round, no amplification by sampling (the sites are
not sampled at random from a larger population), composed over the cycle's rounds with
opacus' RDP accountant (``fedretrain.privacy.accounting``). Adaptive clipping also releases
the count of clipped updates: Flower splits ``noise_multiplier`` between the two as if that
count's sensitivity were 1/2, but counts in {0, 1} (sensitivity 1); the epsilon reported
uses the multiplier the two releases really have together. Flower 1.41 also sizes the
round's noise by the norm it adapts to next, not the one it clipped with;
:class:`_AdaptiveClipping` keeps the norm until the round's noise is added.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import (
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    Strategy,
)
from flwr.supercore.differential_privacy import compute_adaptive_noise_params

from fedretrain.config.schema import CentralDPConfig
from fedretrain.privacy.accounting import epsilon_for_history


class _AdaptiveClipping(DifferentialPrivacyServerSideAdaptiveClipping):
    """Flower's server-side adaptive clipping, with the round's noise sized to the norm it clipped with."""

    _pending: float | None = None

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        self._pending = None
        out = super().aggregate_train(server_round, replies)
        if self._pending is not None:  # after the noise: the next round clips with the new norm
            super()._geometric_update(self._pending)
        return out

    def _geometric_update(self, clipped_fraction: float) -> None:
        self._pending = clipped_fraction


def central_dp_wrapper(cfg: CentralDPConfig, quorum: int) -> Callable[[Strategy], Strategy] | None:
    """What wraps the algorithm for ``cfg`` (None when ``clipping`` is off); see the module docstring."""
    if cfg.clipping == "off":
        return None
    sensitivity_count = quorum / 2  # noise sigma * C / (q / 2): the mean's sensitivity 2 C / q
    if cfg.clipping == "fixed":
        return lambda algorithm: DifferentialPrivacyServerSideFixedClipping(
            algorithm,
            cfg.noise_multiplier,
            cfg.clipping_norm,
            sensitivity_count,  # type: ignore[arg-type]  # Flower only divides by it
        )
    return lambda algorithm: _AdaptiveClipping(
        algorithm,
        cfg.noise_multiplier,
        sensitivity_count,  # type: ignore[arg-type]
        initial_clipping_norm=cfg.clipping_norm,
        target_clipped_quantile=cfg.target_clipped_quantile,
        clip_norm_lr=cfg.clip_norm_lr,
        clipped_count_stddev=count_stddev(cfg, quorum),
    )


def count_stddev(cfg: CentralDPConfig, quorum: int) -> float:
    """Adaptive clipping's noise on the count of clipped updates (Flower's ``num_sampled / 20`` needs
    hundreds of sites for a noise multiplier near 1)."""
    return cfg.clipped_count_stddev if cfg.clipped_count_stddev is not None else max(quorum / 20, cfg.noise_multiplier)


def effective_noise_multiplier(cfg: CentralDPConfig, quorum: int) -> float:
    """The noise multiplier of a round's releases together: the update's alone when clipping is fixed;
    with adaptive clipping ``(sigma_update^-2 + sigma_count^-2)^-1/2``, the count's sensitivity being 1."""
    if cfg.clipping != "adaptive":
        return cfg.noise_multiplier
    sigma_count, sigma_update = compute_adaptive_noise_params(
        cfg.noise_multiplier, quorum / 2, count_stddev(cfg, quorum)
    )
    return float((sigma_update**-2 + sigma_count**-2) ** -0.5)


def central_epsilon(cfg: CentralDPConfig, rounds: int, quorum: int) -> float | None:
    """The coordinator's epsilon at ``cfg.delta`` for ``rounds`` rounds of one cycle (None: off)."""
    if cfg.clipping == "off":
        return None
    return epsilon_for_history([(effective_noise_multiplier(cfg, quorum), 1.0, rounds)], cfg.delta, "rdp")
