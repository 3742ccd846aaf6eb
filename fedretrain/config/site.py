"""A site's own settings, read from its node_config and nowhere else.

Data location, site id, the lifetime epsilon ceiling and delta belong to the site
(the hospital's operator), never to the coordinator: a coordinator that could raise
a site's ceiling would own the site's privacy budget.

Deployment: ``flower-supernode --node-config "site-id='h1' data-dir='/srv/fedretrain'
epsilon-ceiling=8.0 delta=1e-5 coordinator-key='/etc/fedretrain/coordinator.pub'"``.
Simulation writes each virtual site's node_config to ``site.json`` in its directory.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedretrain.config.parse import build
from fedretrain.config.schema import DEVICES, _one_of, _positive
from fedretrain.errors import ConfigError
from fedretrain.privacy.accountants import ACCOUNTANTS

MODEL_VARIANTS = ("full", "student")

# Keys Flower itself puts into node_config (simulation); they are not the site's settings.
_FLOWER_KEYS = {"partition-id", "num-partitions"}


@dataclass(frozen=True)
class SiteConfig:
    site_id: str
    data_dir: str
    epsilon_ceiling: float
    delta: float
    accountant: str = "rdp"
    state_dir: str | None = None  # privacy ledger and model store; default: <data_dir>/.fedretrain
    device: str = "auto"
    # Non-private rounds have no finite epsilon, so the site, not the coordinator, decides
    # whether a job with privacy.enabled=false may train on its data (research sandboxes).
    allow_non_private: bool = False
    # The coordinator's Ed25519 public key (PEM), pinned by the site: a published version
    # is installed only if its manifest is signed by this key. None: nothing is installed.
    coordinator_key: str | None = None
    # Before installing a version, score it on the held-out data against the current one
    # and refuse it if it is worse there.
    smoke_eval: bool = False
    # Ingestion (`fedretrain site ingest`): share of new records kept as held-out data
    # (chosen by a hash of the record, so a record always lands on the same side).
    heldout_fraction: float = 0.2
    # Mask e-mail addresses, phone numbers and record numbers before anything is stored.
    redact: bool = False
    # A regular expression for this site's record numbers (e.g. 'MRN-?[0-9]{6}'), masked when redact=true.
    record_number_pattern: str | None = None
    # Noise multipliers z of the Gaussian mechanism on the scalars the site sends about its
    # records, each reply charged to the ledger as opacus' (z, 1.0, 1)
    # (fedretrain/privacy/release.py): the final evaluation of a cycle (one per cycle) ...
    eval_noise: float = 4.0
    # ... and a status reply's counts. The coordinator may poll often: within status-interval-s
    # of the last charged reply the site sends the same counts again (post-processing, no cost).
    status_noise: float = 20.0
    status_interval_s: float = 3600.0
    # Evaluations: each record's loss change (candidate - baseline, nats) is clipped to
    # [-eval-clip, eval-clip] before it is summed; false: the site answers no evaluation.
    eval_clip: float = 1.0
    share_evaluation: bool = True
    # Drift and loss scores of a status reply cannot be noised usefully at a site's sample
    # sizes: they stay at the site unless its operator opts in to sending them un-noised.
    share_drift_scores: bool = False
    # Choose sigma so that the cycle's planned rounds (and their evaluations) fit what is left
    # of the ceiling, instead of the coordinator's per-run target; the cycle is refused before
    # any spend when even that cannot fit.
    fit_sigma_to_ceiling: bool = False
    # Simulation only (site_config_from_node_config refuses it in deployment): allow a job's
    # privacy.reproducible_noise=true, the job's seed then seeds the DP noise.
    allow_reproducible_noise: bool = False
    # A directory the site drops new data files into; `fedretrain site ingest --inbox` takes them.
    inbox_dir: str | None = None
    # Send training updates only masked, under secure aggregation (client/secagg.py): a job
    # without it is refused at the ready check, a train message outside the protocol before
    # any training (nothing spent).
    require_secure_aggregation: bool = False
    # A site with less memory trains a lower LoRA rank than the job's (fedretrain/lora_ranks.py):
    # the first lora-rank components of the global adapter; None: the job's rank.
    lora_rank: int | None = None
    # Simulation only: a JSONL file of users' requests and their feedback ({"prompt", "correction"}
    # or {"prompt", "rating"}), replayed through the site's service (client/serve/replay.py)
    # when a version goes on trial here: a simulated canary's live traffic.
    replay_traffic: str | None = None
    # What this site installs of each published version: "full" (base model + adapter) or
    # "student", also the smaller model distilled from it when the coordinator publishes one
    # (server/cycle/distill.py): `fedretrain site generate` and `site serve` then answer with it.
    model_variant: str = "full"

    def __post_init__(self) -> None:
        if not self.site_id or any(c in self.site_id for c in "/\\ "):
            raise ConfigError(f"site-id: must be a non-empty name without '/', '\\' or spaces, got {self.site_id!r}")
        _positive("epsilon-ceiling", self.epsilon_ceiling)
        if not math.isfinite(self.delta) or not 0 < self.delta < 1:
            raise ConfigError(f"delta: must be in (0, 1), got {self.delta!r}")
        _one_of("accountant", self.accountant, ACCOUNTANTS)
        _one_of("device", self.device, DEVICES)
        _one_of("model-variant", self.model_variant, MODEL_VARIANTS)
        if not math.isfinite(self.heldout_fraction) or not 0 <= self.heldout_fraction < 1:
            raise ConfigError(f"heldout-fraction: must be in [0, 1), got {self.heldout_fraction!r}")
        _positive("eval-noise", self.eval_noise)
        _positive("status-noise", self.status_noise)
        if self.lora_rank is not None and (
            isinstance(self.lora_rank, bool) or not isinstance(self.lora_rank, int) or self.lora_rank < 1
        ):
            raise ConfigError(f"lora-rank: a LoRA rank >= 1 (or unset: the job's), got {self.lora_rank!r}")
        if not math.isfinite(self.status_interval_s) or self.status_interval_s < 0:
            raise ConfigError(f"status-interval-s: must be a finite number >= 0, got {self.status_interval_s!r}")
        _positive("eval-clip", self.eval_clip)
        if self.record_number_pattern is not None:
            try:
                re.compile(self.record_number_pattern)
            except re.error as err:
                raise ConfigError(f"record-number-pattern: not a valid regular expression ({err})") from None

    @property
    def train_path(self) -> Path:
        return _data_file(Path(self.data_dir), "train")

    @property
    def heldout_path(self) -> Path:
        return _data_file(Path(self.data_dir), "heldout")

    @property
    def state_path(self) -> Path:
        return Path(self.state_dir) if self.state_dir else Path(self.data_dir) / ".fedretrain"

    @property
    def ledger_path(self) -> Path:
        return self.state_path / "privacy_ledger.json"

    @property
    def quarantine_path(self) -> Path:
        """Records refused at ingestion, one JSON line each with the reason."""
        return self.state_path / "quarantine.jsonl"

    @property
    def reference_path(self) -> Path:
        """Which records the site trained on in its last cycle (client/ingest/reference.py)."""
        return self.state_path / "reference.json"

    @property
    def model_store_path(self) -> Path:
        """Where installed versions live: ``current`` and every earlier one."""
        return self.state_path / "models"

    def to_node_config(self) -> dict[str, Any]:
        out = {k.replace("_", "-"): v for k, v in self.__dict__.items() if v is not None}
        return out


# Keys a site config no longer takes, and what replaced them.
_REPLACED = {"count-noise": "status-noise (Gaussian noise on every released count, charged to the ledger)"}
_SIMULATION_ONLY = ("allow-reproducible-noise", "replay-traffic")


def site_config_from_node_config(node_config: Mapping[str, Any], *, simulation: bool = False) -> SiteConfig:
    """Parse a SuperNode's node_config (kebab-case keys) into a ``SiteConfig``.

    ``simulation``: a virtual site of Flower's simulation engine, the only kind that may
    set ``allow-reproducible-noise`` or ``replay-traffic``.
    """
    values = {k.replace("-", "_"): v for k, v in node_config.items() if k not in _FLOWER_KEYS}
    bad = sorted(k for k in node_config if k not in _FLOWER_KEYS and "_" in k)
    if bad:
        raise ConfigError(f"node_config: use kebab-case keys (site-id, data-dir, ...), got {', '.join(bad)}")
    for key, replacement in _REPLACED.items():
        if key in node_config:
            raise ConfigError(f"{key}: no longer a site setting; use {replacement}")
    if not simulation:
        for key in _SIMULATION_ONLY:
            if node_config.get(key):
                why = {
                    "allow-reproducible-noise": "a deployed site's DP noise comes from its own OS and is never "
                    "seeded by the coordinator",
                    "replay-traffic": "a deployed site's live traffic is its users' own (fedretrain site serve)",
                }[key]
                raise ConfigError(f"{key}: only a simulated site may set it; {why}")
    try:
        return build(SiteConfig, values, "node_config")
    except ConfigError as err:
        # Name the key as the operator wrote it (kebab-case); leave the rest of the message as is.
        key, sep, rest = str(err).partition(":")
        raise ConfigError(key.replace("_", "-") + sep + rest) from None


def _data_file(directory: Path, stem: str) -> Path:
    # JSONL is the native format; CSV (a `text` column) is accepted too.
    for suffix in (".jsonl", ".csv"):
        candidate = directory / f"{stem}{suffix}"
        if candidate.exists():
            return candidate
    return directory / f"{stem}.jsonl"
