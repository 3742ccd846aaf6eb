"""Strategy names -> classes, so configs name a strategy and never branch on it."""

from __future__ import annotations

from typing import Any

from strategies.fedavg_lora import FedAvgLoRA

STRATEGIES: dict[str, type[FedAvgLoRA]] = {"fedavg": FedAvgLoRA}


def build_strategy(name: str, **kwargs: Any) -> FedAvgLoRA:
    """Instantiate the strategy registered as ``name`` with ``kwargs``.

    Raises
    ------
    ValueError
        ``name`` is not registered; the message lists the valid names.
    """
    try:
        cls = STRATEGIES[name]
    except KeyError:
        raise ValueError(f"unknown strategy {name!r}; valid names: {', '.join(sorted(STRATEGIES))}") from None
    return cls(**kwargs)
