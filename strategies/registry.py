"""Strategy names -> algorithms, so a config names one and never branches on it.

Every algorithm is a Flower Message-API strategy (``fedavg`` is Flower's with a faster
average, strategies/fedavg.py); :func:`build_strategy` puts it behind the reply checks
(strategies/checked.py). An algorithm's own options (FedProx's ``proximal_mu``, Krum's
``num_malicious_nodes``, ...) are the keyword arguments its class adds to FedAvg's, read
from its signature: ``conf/strategy/<name>.yaml`` lists them with their defaults, and
tests/test_strategies.py checks the two agree.
"""

from __future__ import annotations

import inspect
from typing import Any

from flwr.serverapp.strategy import (
    Bulyan,
    FedAdagrad,
    FedAdam,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    MultiKrum,
    Strategy,
)
from flwr.serverapp.strategy import FedAvg as FlowerFedAvg

from strategies.checked import CheckedStrategy
from strategies.fedavg import FedAvg

STRATEGIES: dict[str, type[FlowerFedAvg]] = {
    "fedavg": FedAvg,
    "fedprox": FedProx,
    "fedavgm": FedAvgM,
    "fedadam": FedAdam,
    "fedyogi": FedYogi,
    "fedadagrad": FedAdagrad,
    "fedmedian": FedMedian,
    "fedtrimmedavg": FedTrimmedAvg,
    "krum": Krum,
    "multikrum": MultiKrum,
    "bulyan": Bulyan,
}

# FedAvg's own arguments: the coordinator sets them from strategy.* (sampling), or the
# checks fix them (weights, record keys, metric aggregation).
_COMMON = frozenset(inspect.signature(FlowerFedAvg.__init__).parameters) - {"self"}


def strategy_options(name: str) -> dict[str, int | float | bool | str]:
    """The options algorithm ``name`` adds to FedAvg's, with their defaults (scalars only)."""
    params = inspect.signature(STRATEGIES[name].__init__).parameters
    return {
        key: p.default
        for key, p in params.items()
        if key not in _COMMON and key != "self" and isinstance(p.default, int | float | bool | str)
    }


def build_strategy(
    name: str,
    *,
    options: dict[str, Any] | None = None,
    fraction_train: float = 1.0,
    fraction_evaluate: float = 1.0,
    min_train_nodes: int = 2,
    min_evaluate_nodes: int = 2,
    min_available_nodes: int = 2,
    wrap: Any = None,
    **checks: Any,
) -> CheckedStrategy:
    """Algorithm ``name`` with ``options``, behind the reply checks ``checks``.

    Parameters
    ----------
    name : str
        A key of :data:`STRATEGIES`.
    options : dict | None
        The algorithm's own options (:func:`strategy_options`); others are refused.
    fraction_train, fraction_evaluate, min_train_nodes, min_evaluate_nodes, min_available_nodes
        Sampling, as in Flower's FedAvg.
    wrap : Callable[[Strategy], Strategy] | None
        Wraps the algorithm before the checks do (Flower's DP wrappers).
    **checks
        :class:`~strategies.checked.CheckedStrategy`'s keyword arguments (``spec``, ...).

    Raises
    ------
    ValueError
        ``name`` is not registered, or an option is not the algorithm's; the message
        lists the valid ones.
    """
    try:
        cls = STRATEGIES[name]
    except KeyError:
        raise ValueError(f"unknown strategy {name!r}; valid names: {', '.join(sorted(STRATEGIES))}") from None
    valid = strategy_options(name)
    unknown = sorted(set(options or {}) - set(valid))
    if unknown:
        raise ValueError(
            f"strategy {name!r} has no option {', '.join(unknown)}; its options: {', '.join(valid) or 'none'}"
        )
    algorithm: Strategy = cls(
        fraction_train=fraction_train,
        fraction_evaluate=fraction_evaluate,
        min_train_nodes=min_train_nodes,
        min_evaluate_nodes=min_evaluate_nodes,
        min_available_nodes=min_available_nodes,
        **(options or {}),
    )
    return CheckedStrategy(algorithm if wrap is None else wrap(algorithm), **checks)
