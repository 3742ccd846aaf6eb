"""Client-level DP at the coordinator: Flower's server-side DP wrappers, and their epsilon.

The sites' DP-SGD (client/round/) protects each of their records against the coordinator.
This adds what protects a whole site's contribution against whoever sees the published
versions (McMahan et al. 2018): each accepted update is clipped to a norm around the global
adapter, and the aggregate gets Gaussian noise. Flower's wrappers do both
(``DifferentialPrivacyServerSideFixedClipping``, ``...AdaptiveClipping``, Andrew et al.
2021); they sit between the reply checks and the algorithm, so they see only accepted
replies. Their noise on the mean is ``noise_multiplier * clipping_norm / n`` for the ``n``
they are told are sampled; a round aggregates at least ``quorum`` replies, so ``n = quorum``
keeps the noise at least as large as one site's clipped update needs.

Accounting: one Gaussian release per round on the sampled sites, no amplification by
sampling (the sites are not sampled at random from a larger population), composed over
the cycle's rounds with opacus' RDP accountant (``fedretrain.privacy.accounting``). With
adaptive clipping the noise multiplier given covers both releases (the update and the
clipped count), as Flower splits it.
"""

from __future__ import annotations

from collections.abc import Callable

from flwr.serverapp.strategy import (
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    Strategy,
)

from fedretrain.config.schema import CentralDPConfig
from fedretrain.privacy.accounting import epsilon_for_history


def central_dp_wrapper(cfg: CentralDPConfig, num_sampled: int) -> Callable[[Strategy], Strategy] | None:
    """What wraps the algorithm for ``cfg`` (None when ``clipping`` is off)."""
    if cfg.clipping == "off":
        return None
    if cfg.clipping == "fixed":
        return lambda algorithm: DifferentialPrivacyServerSideFixedClipping(
            algorithm, cfg.noise_multiplier, cfg.clipping_norm, num_sampled
        )
    count_stddev = cfg.clipped_count_stddev
    if count_stddev is None:  # Flower's num_sampled / 20 needs hundreds of sites for sigma ~ 1
        count_stddev = max(num_sampled / 20, cfg.noise_multiplier)
    return lambda algorithm: DifferentialPrivacyServerSideAdaptiveClipping(
        algorithm,
        cfg.noise_multiplier,
        num_sampled,
        initial_clipping_norm=cfg.clipping_norm,
        target_clipped_quantile=cfg.target_clipped_quantile,
        clip_norm_lr=cfg.clip_norm_lr,
        clipped_count_stddev=count_stddev,
    )


def central_epsilon(cfg: CentralDPConfig, rounds: int) -> float | None:
    """The coordinator's epsilon at ``cfg.delta`` for ``rounds`` rounds of one cycle (None: off)."""
    if cfg.clipping == "off":
        return None
    return epsilon_for_history([(cfg.noise_multiplier, 1.0, rounds)], cfg.delta, "rdp")
