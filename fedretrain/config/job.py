"""What a coordinator asks its sites to do in one run: model, LoRA, training and DP settings.

It travels in every train/evaluate message as a flat ConfigRecord and is parsed at the
site by the same walker as the Hydra config, so a malformed job fails with the key named.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from fedretrain.config.parse import build, flatten, unflatten
from fedretrain.config.schema import Config, LoraSettings, ModelConfig, PrivacyConfig, TrainConfig
from fedretrain.errors import ConfigError


@dataclass(frozen=True)
class Job:
    run_id: str
    seed: int
    rounds: int
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    train: TrainConfig = field(default_factory=TrainConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    # Whether the coordinator runs this job's train rounds under secure aggregation (what
    # it says; a site that requires it checks each train message itself, client/secagg.py).
    secure_aggregation: bool = False

    def __post_init__(self) -> None:
        if not self.run_id:
            raise ConfigError("run_id: must not be empty")
        if self.rounds < 1:
            raise ConfigError(f"rounds: must be >= 1, got {self.rounds}")

    @classmethod
    def from_config(cls, cfg: Config, run_id: str) -> Job:
        return cls(
            run_id=run_id,
            seed=cfg.seed,
            rounds=cfg.rounds,
            model=cfg.model,
            lora=cfg.lora,
            train=cfg.train,
            privacy=cfg.privacy,
            secure_aggregation=cfg.strategy.secure_aggregation.enabled,
        )

    def to_flat(self) -> dict[str, Any]:
        """Flat ``{"train.lr": 0.01, ...}``: the values a Flower ConfigRecord can carry."""
        return flatten(self)

    @classmethod
    def from_flat(cls, flat: Mapping[str, Any]) -> Job:
        return build(cls, unflatten(flat), "job")
