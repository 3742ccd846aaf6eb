"""The Gaussian mechanism for the scalars a site sends: counts, sums, sums of squares.

A release is a few statistics of the site's records, each with a bound on how much
one record can move it (its sensitivity ``Delta_k``, for adding or removing one
record). Each is sent with Gaussian noise of standard deviation
``z * sqrt(K) * Delta_k`` for ``K`` statistics. Divided by their sensitivities the
statistics form a vector that one record moves by at most ``sqrt(K)`` in L2 norm,
and the noise on it has standard deviation ``z * sqrt(K)``: the release is the
Gaussian mechanism with noise multiplier ``z``, whose Renyi DP is ``alpha / (2 z^2)``
at every order. That is exactly opacus' history entry ``(z, 1.0, 1)`` (sampling rate
1, one step), so the site's ledger composes releases and DP-SGD rounds in one
accountant (:mod:`fedretrain.privacy.ledger`).

The noise comes from the operating system's CSPRNG, drawn at the site at every
release: nothing the coordinator sends can steer or repeat it.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

# One release: opacus' history entry for a Gaussian mechanism of noise multiplier z.
RELEASE_SAMPLE_RATE = 1.0
RELEASE_STEPS = 1


@dataclass(frozen=True)
class Release:
    """Noised statistics and the standard deviation of each one's noise (public: it
    depends on the site's settings only, so the coordinator can weigh the figures)."""

    values: dict[str, float]
    stds: dict[str, float]
    noise_multiplier: float


def gaussian_release(
    statistics: Mapping[str, float],
    sensitivities: Mapping[str, float],
    noise_multiplier: float,
    rng: np.random.Generator | None = None,
) -> Release:
    """Noise ``statistics`` with the Gaussian mechanism of ``noise_multiplier`` (see the module docstring).

    Parameters
    ----------
    statistics, sensitivities
        The same keys; each sensitivity > 0 bounds how far adding or removing one
        record moves that statistic.
    noise_multiplier
        ``z`` > 0. The ledger records the release as ``(z, 1.0, 1)``.
    rng
        Only tests pass one; a site draws a fresh generator from the OS at every release.

    Raises
    ------
    ValueError
        On mismatched keys, a sensitivity <= 0 or a noise multiplier <= 0.
    """
    if set(statistics) != set(sensitivities):
        raise ValueError(f"statistics {sorted(statistics)} and sensitivities {sorted(sensitivities)} differ")
    if not (noise_multiplier > 0 and math.isfinite(noise_multiplier)):
        raise ValueError(f"noise_multiplier must be finite and > 0, got {noise_multiplier}")
    if any(not (d > 0 and math.isfinite(d)) for d in sensitivities.values()):
        raise ValueError(f"every sensitivity must be finite and > 0, got {dict(sensitivities)}")
    rng = rng if rng is not None else np.random.default_rng(secrets.randbits(128))
    scale = noise_multiplier * math.sqrt(len(statistics))
    stds = {key: scale * float(sensitivities[key]) for key in statistics}
    values = {key: float(value) + float(rng.normal(0.0, stds[key])) for key, value in statistics.items()}
    return Release(values=values, stds=stds, noise_multiplier=float(noise_multiplier))
