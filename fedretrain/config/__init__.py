"""Typed, frozen, validated configuration (Hydra composes, this package parses once)."""

from fedretrain.config.compose import compose_config, compose_raw, conf_dir, overrides_from_run_config, to_yaml
from fedretrain.config.job import Job
from fedretrain.config.parse import build, flatten, unflatten
from fedretrain.config.schema import (
    AttackersConfig,
    Config,
    DataConfig,
    GateConfig,
    LoraSettings,
    ModelConfig,
    MonitorConfig,
    PrivacyConfig,
    PublishConfig,
    RegistryConfig,
    ScenarioConfig,
    SimulationConfig,
    StrategyConfig,
    TrackingConfig,
    TrainConfig,
    TriggerConfig,
)
from fedretrain.config.site import SiteConfig, site_config_from_node_config

__all__ = [
    "Config",
    "DataConfig",
    "GateConfig",
    "Job",
    "LoraSettings",
    "ModelConfig",
    "MonitorConfig",
    "PrivacyConfig",
    "PublishConfig",
    "RegistryConfig",
    "ScenarioConfig",
    "SimulationConfig",
    "AttackersConfig",
    "SiteConfig",
    "StrategyConfig",
    "TrackingConfig",
    "TrainConfig",
    "TriggerConfig",
    "build",
    "compose_config",
    "compose_raw",
    "conf_dir",
    "flatten",
    "overrides_from_run_config",
    "site_config_from_node_config",
    "to_yaml",
    "unflatten",
]
