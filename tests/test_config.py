"""Config: every YAML composes; bad values fail at start-up with the dotted key named."""

from __future__ import annotations

import math

import pytest

from fedretrain.config import (
    Config,
    Job,
    SiteConfig,
    build,
    compose_config,
    conf_dir,
    overrides_from_run_config,
    site_config_from_node_config,
)
from fedretrain.errors import ConfigError

GROUPS = [
    "model",
    "lora",
    "train",
    "privacy",
    "data",
    "strategy",
    "gate",
    "registry",
    "monitor",
    "trigger",
    "scenario",
    "simulation",
    "tracking",
]


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (conf_dir() / group).glob("*.yaml"))


@pytest.mark.parametrize("group", GROUPS)
def test_every_group_option_composes(group):
    for option in _options(group):
        # Prepare: model=hf has a mandatory path (???), which the user supplies.
        extra = ["model.name_or_path=/models/x"] if (group, option) == ("model", "hf") else []
        # Execute
        cfg = compose_config([f"{group}={option}", *extra])
        # Assert
        assert isinstance(cfg, Config)


@pytest.mark.parametrize("experiment", _options("experiment"))
def test_every_experiment_composes(experiment):
    cfg = compose_config([f"experiment={experiment}"])
    assert cfg.name == experiment


def test_command_line_overrides_reach_the_typed_config():
    cfg = compose_config(["simulation.num_sites=8", "privacy.target_epsilon=4", "lora.target_modules=[q_proj]"])
    assert cfg.simulation.num_sites == 8
    assert cfg.privacy.target_epsilon == 4.0 and isinstance(cfg.privacy.target_epsilon, float)
    assert cfg.lora.target_modules == ("q_proj",)


def test_config_is_frozen():
    cfg = compose_config()
    with pytest.raises(AttributeError):
        cfg.rounds = 9  # type: ignore[misc]


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("privacy.target_epsilon=0", "privacy.target_epsilon"),
        ("privacy.target_epsilon=-1", "privacy.target_epsilon"),
        ("privacy.target_epsilon=nan", "privacy.target_epsilon"),
        ("privacy.target_epsilon=inf", "privacy.target_epsilon"),
        ("lora.r=0", "lora.r"),
        ("train.lr=fast", "train.lr"),
        ("rounds=2.5", "rounds"),
        ("privacy.enabled=1", "privacy.enabled"),
        ("train.optimizer=adagrad", "train.optimizer"),
        ("simulation.site_delta=0", "simulation.site_delta"),
        ("privacy.tagret_epsilon=3", "privacy.tagret_epsilon"),  # typo: unknown key
        ("+privacy.tagret_epsilon=3", "privacy.tagret_epsilon"),  # forced in, still unknown
        ("model=hf", "model.name_or_path"),  # mandatory value not given
        ("tracking.mlflow_uri=./mlruns", "tracking.mlflow_uri"),  # MLflow 3's file store: no scheme
        ("tracking.mlflow_uri=https://ops:secret@mlflow.example", "tracking.mlflow_uri"),  # kept in config.yaml
        ("tracking.timeout_s=0", "tracking.timeout_s"),
    ],
)
def test_bad_values_fail_naming_the_key(override, key):
    with pytest.raises(ConfigError) as err:
        compose_config([override])
    assert str(err.value).startswith(key), str(err.value)


def test_unknown_key_in_a_mapping_is_named():
    with pytest.raises(ConfigError, match=r"^lora\.rank: unknown key"):
        build(Config, {"lora": {"rank": 4}})


def test_run_config_is_a_thin_front_over_hydra_overrides():
    overrides = overrides_from_run_config({"experiment": "smoke", "overrides": "rounds=5 'name=my run'"})
    assert overrides == ["experiment=smoke", "rounds=5", "name=my run"]
    with pytest.raises(ConfigError, match="run_config"):
        overrides_from_run_config({"num-server-rounds": 3})


def test_job_round_trips_through_a_flat_record_and_rejects_unknown_keys():
    cfg = compose_config(["experiment=smoke", "tracking.mlflow_uri=sqlite:///runs/mlflow.db"])
    job = Job.from_config(cfg, run_id="r1")
    flat = job.to_flat()
    assert Job.from_flat(flat) == job
    assert "simulation.num_sites" not in flat  # site and simulation settings never travel
    assert not [key for key in flat if key.startswith("tracking")]  # nor where the coordinator exports to
    with pytest.raises(ConfigError, match=r"^job\.privacy\.epsilon_ceiling: unknown key"):
        Job.from_flat({**flat, "privacy.epsilon_ceiling": 100.0})


def test_site_config_comes_from_node_config_with_kebab_keys(tmp_path):
    node = {
        "site-id": "h1",
        "data-dir": str(tmp_path),
        "epsilon-ceiling": 8.0,
        "delta": 1e-5,
        "partition-id": 0,
        "num-partitions": 3,
    }
    site = site_config_from_node_config(node)
    assert site == SiteConfig(site_id="h1", data_dir=str(tmp_path), epsilon_ceiling=8.0, delta=1e-5)
    assert site.ledger_path == tmp_path / ".fedretrain" / "privacy_ledger.json"


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"epsilon-ceiling": math.nan}, "epsilon-ceiling"),
        ({"delta": 1.5}, "delta"),
        ({"site-id": ""}, "site-id"),
        ({"ceiling": 3.0}, "ceiling"),
        ({"epsilon_ceiling": 3.0}, "epsilon_ceiling"),
    ],
)
def test_bad_site_config_names_the_key(tmp_path, change, key):
    node = {"site-id": "h1", "data-dir": str(tmp_path), "epsilon-ceiling": 8.0, "delta": 1e-5, **change}
    with pytest.raises(ConfigError) as err:
        site_config_from_node_config(node)
    assert key in str(err.value)


def test_each_option_list_is_its_registry_and_composing_loads_no_torch():
    import subprocess
    import sys

    from fedretrain.privacy.accountants import ACCOUNTANTS
    from fedretrain.training.params import GRAD_SAMPLE_MODES, OPTIMIZERS

    # Every name a registry holds is accepted by the config, and nothing else is.
    for key, names in (
        ("train.optimizer", OPTIMIZERS),
        ("privacy.grad_sample_mode", GRAD_SAMPLE_MODES),
        ("simulation.site_accountant", ACCOUNTANTS),
    ):
        for name in names:
            compose_config([f"{key}={name}"])
        with pytest.raises(ConfigError, match=key.split(".")[1]):
            compose_config([f"{key}=bogus"])
    # The config reads the names without building anything: torch and opacus stay unloaded.
    code = "import sys; from fedretrain.config import compose_config; compose_config([]); "
    code += "print('torch' in sys.modules, 'opacus' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


@pytest.mark.parametrize("experiment", ["demo", "smoke", "drift", "nonprivate", "garbled"])
def test_a_runs_config_yaml_builds_back_to_the_same_config(experiment):
    import yaml

    from fedretrain.config import flatten, to_yaml, unflatten
    from fedretrain.config.parse import build

    # A simulation writes its typed config (registry filled in) as <run>/config.yaml; a resumed
    # run builds its config from that file.
    cfg = compose_config([f"experiment={experiment}", "registry.root=/srv/registry"])
    assert build(Config, yaml.safe_load(to_yaml(unflatten(flatten(cfg))))) == cfg
