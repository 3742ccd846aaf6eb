"""What a malicious site sends instead of its honest update: the behaviours a simulation can give its attackers.

Each behaviour maps the global adapter ``G`` a round started from and the site's honest
update ``U`` (its adapter after local training) to the adapter it sends, with a
``strength`` whose default is the behaviour's own:

- ``sign_flip``: ``G - s (U - G)``, the update turned against the training direction
  (s = 1; Blanchard et al. 2017 use large s);
- ``scale``: ``G + s (U - G)``, one site trying to outweigh the others (s = 10; "model
  replacement", Bagdasaryan et al. 2020);
- ``noise``: ``G + s * rms(U - G) * N(0, 1)``, noise as large as the update (s = 1);
- ``free_ride``: ``G`` plus noise of ``s`` times the update's rms (s = 0: the old adapter
  itself), a site that takes the model without training;
- ``backdoor``: the honest update, trained on notes that carry a phrase (the simulation
  writes the phrase into a share ``s`` of the site's training notes, s = 1).

The simulation applies them (simulation/attacks.py); the strategies never see which
sites they are.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

Arrays = Mapping[str, np.ndarray]


def _rms(diff: Mapping[str, np.ndarray]) -> float:
    total = sum(float(np.square(d, dtype=np.float64).sum()) for d in diff.values())
    count = sum(d.size for d in diff.values())
    return math.sqrt(total / max(count, 1))


def _sign_flip(g: Arrays, u: Arrays, s: float, rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {k: g[k] - s * (u[k] - g[k]) for k in g}


def _scale(g: Arrays, u: Arrays, s: float, rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {k: g[k] + s * (u[k] - g[k]) for k in g}


def _noise(g: Arrays, u: Arrays, s: float, rng: np.random.Generator) -> dict[str, np.ndarray]:
    std = s * _rms({k: u[k] - g[k] for k in g})
    return {k: g[k] + rng.normal(0.0, std, size=g[k].shape) for k in g}


def _free_ride(g: Arrays, u: Arrays, s: float, rng: np.random.Generator) -> dict[str, np.ndarray]:
    if s == 0:
        return {k: np.array(g[k]) for k in g}
    return _noise(g, u, s, rng)


def _backdoor(g: Arrays, u: Arrays, s: float, rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {k: np.array(u[k]) for k in u}  # the poison is in its training notes


@dataclass(frozen=True)
class Attack:
    """A behaviour: how the sent adapter is made, and the strength it takes by default."""

    apply: Callable[[Arrays, Arrays, float, np.random.Generator], dict[str, np.ndarray]]
    default_strength: float


ATTACKS: dict[str, Attack] = {
    "sign_flip": Attack(_sign_flip, 1.0),
    "scale": Attack(_scale, 10.0),
    "noise": Attack(_noise, 1.0),
    "free_ride": Attack(_free_ride, 0.0),
    "backdoor": Attack(_backdoor, 1.0),
}


def attacked(
    behaviour: str, global_adapter: Arrays, update: Arrays, strength: float | None, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """The adapter an attacker with ``behaviour`` sends, in the update's dtypes."""
    attack = ATTACKS[behaviour]
    s = attack.default_strength if strength is None else strength
    sent = attack.apply(global_adapter, update, s, rng)
    return {k: np.asarray(v, dtype=update[k].dtype) for k, v in sent.items()}
