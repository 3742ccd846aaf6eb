"""Server-side Flower strategies: which replies count and how they are averaged."""

from strategies.fedavg_lora import FedAvgLoRA
from strategies.registry import STRATEGIES, build_strategy

__all__ = ["STRATEGIES", "FedAvgLoRA", "build_strategy"]
