"""Server-side Flower strategies behind the reply checks: which replies count and how they are aggregated."""

from strategies.checked import CheckedStrategy, RejectedReply, RoundLog
from strategies.fedavg import FedAvg, FedAvgLoRA
from strategies.registry import STRATEGIES, build_strategy, strategy_options

__all__ = [
    "STRATEGIES",
    "CheckedStrategy",
    "FedAvg",
    "FedAvgLoRA",
    "RejectedReply",
    "RoundLog",
    "build_strategy",
    "strategy_options",
]
