"""The typed config: frozen dataclasses, one per Hydra group, validated on construction.

A failed check raises ``ConfigError`` naming the field; ``parse.build`` prefixes the
group so the user reads the dotted key (``privacy.target_epsilon: ...``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from fedretrain.attacks import ATTACKS
from fedretrain.config.declared import strategy_declarations
from fedretrain.errors import ConfigError
from fedretrain.privacy.accountants import ACCOUNTANTS
from fedretrain.training.params import GRAD_SAMPLE_MODES, MAX_PROXIMAL_MU, OPTIMIZERS

DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "float32", "bfloat16")
CORRUPTIONS = ("none", "garble")


def _positive(key: str, value: float) -> None:
    # `nan <= 0` is False, so NaN has to be refused explicitly (FLIP#833).
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{key}: must be a finite number > 0, got {value!r}")


def _fraction(key: str, value: float, *, open_low: bool = True) -> None:
    ok = math.isfinite(value) and (0 < value <= 1 if open_low else 0 <= value < 1)
    if not ok:
        bounds = "in (0, 1]" if open_low else "in [0, 1)"
        raise ConfigError(f"{key}: must be {bounds}, got {value!r}")


def _one_of(key: str, value: str, allowed: Collection[str]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}: must be one of {', '.join(allowed)}; got {value!r}")


@dataclass(frozen=True)
class ModelConfig:
    name_or_path: str = "embedded"
    device: str = "auto"
    dtype: str = "auto"
    max_length: int = 128
    # A checkpoint missing some of its model's parameters is refused; this seed opts in to
    # initialising them, the same in every process, and becomes part of the model's identity.
    init_missing_seed: int | None = None

    def __post_init__(self) -> None:
        if not self.name_or_path.strip():
            raise ConfigError("name_or_path: must name a local directory, a hub id or 'embedded'")
        if self.init_missing_seed is not None and self.init_missing_seed < 0:
            raise ConfigError(f"init_missing_seed: must be >= 0 or null, got {self.init_missing_seed}")
        _one_of("device", self.device, DEVICES)
        _one_of("dtype", self.dtype, DTYPES)
        if self.max_length < 8:
            raise ConfigError(f"max_length: must be >= 8, got {self.max_length}")


@dataclass(frozen=True)
class LoraSettings:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    # null: chosen from the architecture (peft's defaults for its model_type, else every
    # linear layer of the attention blocks; fedretrain/modeling/targets.py).
    target_modules: tuple[str, ...] | None = None
    # FFA-LoRA (Sun et al. 2024): lora_A stays at its seeded initialisation at every site and
    # only lora_B trains, so the average of the sites' products B_k A is the product of their
    # average, and DP noise goes to half the parameters.
    freeze_a: bool = False

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ConfigError(f"r: the LoRA rank must be >= 1, got {self.r}")
        if self.alpha < 1:
            raise ConfigError(f"alpha: must be >= 1, got {self.alpha}")
        _fraction("dropout", self.dropout, open_low=False)
        if self.target_modules is not None and not self.target_modules:
            raise ConfigError("target_modules: name at least one module (e.g. [q_proj, v_proj]), or null for auto")

    def to_manifest(self, target_modules: Sequence[str]) -> dict[str, Any]:
        """The LoRA settings a published version's manifest records, with the targets as resolved."""
        return {"r": self.r, "alpha": self.alpha, "dropout": self.dropout, "target_modules": list(target_modules)}


SELECTIONS = ("all", "uncertainty", "random", "newest")


@dataclass(frozen=True)
class TrainConfig:
    local_steps: int = 30
    batch_size: int = 16
    lr: float = 0.01
    optimizer: str = "adamw"
    eval_batch_size: int = 64
    # Train on each site's newest `window` training records only (null: all of them). After
    # drift, a cycle then learns today's data instead of averaging it away with years of old notes.
    window: int | None = None
    # Which of the window's records a site trains on (client/round/selection.py): all | uncertainty
    # (loss under the installed version >= selection_threshold nats, plus a share of the rest) |
    # random (a share) | newest (the newest share).
    selection: str = "all"
    selection_threshold: float | None = None
    selection_share: float = 0.1
    # Train only on records a reviewer at the site accepted (client/review.py, `fedretrain site review`).
    require_review: bool = False
    # Against forgetting: each record of the site's previous training window joins a cycle's
    # records with this probability (client/round/selection.py); 0: none.
    replay: float = 0.0
    # Curriculum: each round trains on records whose base-model loss is at most a ceiling rising
    # linearly from curriculum_start (round 1) to curriculum_end (the last round), nats; null: off.
    curriculum_start: float | None = None
    curriculum_end: float | None = None

    def __post_init__(self) -> None:
        _one_of("selection", self.selection, SELECTIONS)
        if (self.curriculum_start is None) != (self.curriculum_end is None):
            raise ConfigError("curriculum_start: set both curriculum_start and curriculum_end (nats), or neither")
        if self.curriculum_start is not None and self.curriculum_end is not None:
            if not (math.isfinite(self.curriculum_start) and math.isfinite(self.curriculum_end)):
                raise ConfigError("curriculum_start: curriculum_start and curriculum_end must be finite (nats)")
            if self.curriculum_end < self.curriculum_start:
                raise ConfigError(
                    f"curriculum_end: must be >= curriculum_start ({self.curriculum_start}), got {self.curriculum_end}"
                )
        if not (math.isfinite(self.replay) and 0 <= self.replay <= 1):
            raise ConfigError(f"replay: a share in [0, 1], got {self.replay!r}")
        if not (math.isfinite(self.selection_share) and 0 <= self.selection_share <= 1):
            raise ConfigError(f"selection_share: must be in [0, 1], got {self.selection_share!r}")
        if self.selection == "uncertainty" and (
            self.selection_threshold is None or not math.isfinite(self.selection_threshold)
        ):
            raise ConfigError("selection_threshold: selection=uncertainty needs a loss threshold in nats")
        if self.selection in ("random", "newest") and self.selection_share == 0:
            raise ConfigError(f"selection_share: selection={self.selection} with a share of 0 trains on nothing")
        for key in ("local_steps", "batch_size", "eval_batch_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}: must be >= 1, got {getattr(self, key)}")
        if self.window is not None and self.window < 1:
            raise ConfigError(f"window: must be >= 1 or null, got {self.window}")
        _positive("lr", self.lr)
        _one_of("optimizer", self.optimizer, OPTIMIZERS)


@dataclass(frozen=True)
class PrivacyConfig:
    enabled: bool = True
    target_epsilon: float = 4.0
    noise_multiplier: float | None = None
    max_grad_norm: float = 1.0
    grad_sample_mode: str = "hooks"
    # Poisson sampling rate of DP-SGD at every site, whatever its size: a rate derived from
    # the site's record count would make sigma and epsilon (both sent) reveal that count.
    sample_rate: float = 0.05
    # Simulation only: seed the DP noise and sampling from the job's seed so a researcher can
    # replay a run. A deployed site refuses it (the coordinator would know the noise).
    reproducible_noise: bool = False

    def __post_init__(self) -> None:
        _positive("target_epsilon", self.target_epsilon)
        _fraction("sample_rate", self.sample_rate)
        if self.noise_multiplier is not None:
            if not math.isfinite(self.noise_multiplier) or self.noise_multiplier < 0:
                raise ConfigError(f"noise_multiplier: must be >= 0 or null, got {self.noise_multiplier!r}")
        _positive("max_grad_norm", self.max_grad_norm)
        _one_of("grad_sample_mode", self.grad_sample_mode, GRAD_SAMPLE_MODES)


@dataclass(frozen=True)
class DataConfig:
    records_per_site: int = 400
    heldout_fraction: float = 0.2
    validation_records: int = 300
    dirichlet_alpha: float = 0.5
    # Simulation only: "garble" replaces every word of the sites' training notes with random
    # letters (a broken export), so the candidate gets worse and the gate must refuse it.
    train_corruption: str = "none"

    def __post_init__(self) -> None:
        _one_of("train_corruption", self.train_corruption, CORRUPTIONS)
        if self.records_per_site < 10:
            raise ConfigError(f"records_per_site: must be >= 10, got {self.records_per_site}")
        _fraction("heldout_fraction", self.heldout_fraction, open_low=False)
        if self.heldout_fraction == 0:
            raise ConfigError("heldout_fraction: must be > 0 (sites evaluate on held-out data)")
        if self.validation_records < 1:
            raise ConfigError(f"validation_records: must be >= 1, got {self.validation_records}")
        _positive("dirichlet_alpha", self.dirichlet_alpha)


CENTRAL_CLIPPING = ("off", "fixed", "adaptive")


@dataclass(frozen=True)
class CentralDPConfig:
    """Client-level DP at the coordinator: Flower's server-side DP wrapper around the strategy.

    Each accepted update is clipped to ``clipping_norm`` around the global adapter (fixed, or
    adapted towards the ``target_clipped_quantile`` of the updates' norms), and the mean gets
    Gaussian noise of ``noise_multiplier * clipping_norm / (quorum / 2)`` (strategies/central_dp.py):
    a site's whole update is what is protected, against whoever sees the published versions.
    """

    clipping: str = "off"
    noise_multiplier: float = 1.0
    clipping_norm: float = 1.0  # adaptive: the starting norm
    target_clipped_quantile: float = 0.5
    clip_norm_lr: float = 0.2
    # Adaptive: the noise on the count of clipped updates; None: the larger of quorum / 20
    # (Andrew et al.'s choice, for many sites) and noise_multiplier (a few sites: the
    # update's own noise multiplier then grows by 1.15x, Flower splitting the budget).
    clipped_count_stddev: float | None = None
    delta: float = 1e-5

    def __post_init__(self) -> None:
        _one_of("clipping", self.clipping, CENTRAL_CLIPPING)
        _positive("noise_multiplier", self.noise_multiplier)
        _positive("clipping_norm", self.clipping_norm)
        _fraction("target_clipped_quantile", self.target_clipped_quantile)
        _positive("clip_norm_lr", self.clip_norm_lr)
        if self.clipped_count_stddev is not None and not self.clipped_count_stddev > self.noise_multiplier / 2:
            raise ConfigError(
                f"clipped_count_stddev: must be more than noise_multiplier / 2 = {self.noise_multiplier / 2:g} "
                f"(Flower splits the noise between the update and the count), got {self.clipped_count_stddev!r}"
            )
        _fraction("delta", self.delta, open_low=False)
        if self.delta == 0:
            raise ConfigError("delta: must be > 0")


@dataclass(frozen=True)
class SecureAggregationConfig:
    """Flower's SecAgg+ protocol on the Message API (server/cycle/secagg.py): the coordinator sees only the sum.

    Each site masks its update (adapter minus the global adapter), quantised into
    ``quantization_range`` levels over ``±clipping_range``, with a private mask and one
    pairwise mask per neighbour; the masks cancel or are removed in the sum. A site's
    secrets are split into Shamir shares among ``num_shares`` (a share of the sampled
    sites) neighbours, ``reconstruction_threshold`` (a share of those, raised to a majority
    and at least 2) of which are needed to remove the masks of a site that dropped out.
    """

    enabled: bool = False
    num_shares: float = 1.0
    reconstruction_threshold: float = 0.5
    clipping_range: float = 1.0
    quantization_range: int = 2**22
    modulus_range: int = 2**32

    def __post_init__(self) -> None:
        _fraction("num_shares", self.num_shares, open_low=True)
        _fraction("reconstruction_threshold", self.reconstruction_threshold, open_low=True)
        _positive("clipping_range", self.clipping_range)
        modulus, levels = self.modulus_range, self.quantization_range
        if isinstance(levels, bool) or not isinstance(levels, int) or levels < 2:
            raise ConfigError(f"quantization_range: an integer >= 2, got {levels!r}")
        if isinstance(modulus, bool) or not isinstance(modulus, int) or modulus & (modulus - 1) or modulus > 2**32:
            raise ConfigError(
                f"modulus_range: a power of two up to 2**32 (masked values travel as uint32), got {modulus!r}"
            )
        if modulus <= levels:
            raise ConfigError(f"modulus_range: must exceed quantization_range ({levels}), got {modulus}")

    def max_sites(self) -> int:
        """How many sites' quantised values the modulus can sum without wrapping."""
        return (self.modulus_range - 1) // self.quantization_range


# Secure aggregation hides every reply: only a plain mean of them can be computed.
SECURE_AGGREGATION_STRATEGIES = ("fedavg", "fedprox")


@dataclass(frozen=True)
class StrategyConfig:
    """Which aggregation algorithm, its own options, and the reply checks and deadlines every one runs with.

    ``name`` is one of conf/strategy/*.yaml; ``options`` may hold only the options that
    file lists, each of its default's type (strategies/registry.py builds the algorithm).
    """

    name: str = "fedavg"
    options: dict[str, int | float | bool | str] = field(default_factory=dict)
    fraction_train: float = 1.0
    fraction_evaluate: float = 1.0
    min_sites: int = 2
    max_abs_value: float | None = 100.0
    # An update farther from the global adapter than this many times the round's median
    # distance is scaled back to it before averaging (strategies/update_bound.py); None: off.
    max_update_norm_ratio: float | None = 3.0
    # A round waits at most this long for sites to connect, then for each stage's replies.
    round_timeout_s: float = 3600.0
    # Accepted train replies a round needs; fewer by the deadline aborts the cycle unpublished.
    quorum: int = 2
    central_dp: CentralDPConfig = field(default_factory=CentralDPConfig)
    secure_aggregation: SecureAggregationConfig = field(default_factory=SecureAggregationConfig)

    def __post_init__(self) -> None:
        _check_strategy_options(self.name, self.options)
        if self.secure_aggregation.enabled:
            self._check_secure_aggregation()
        _positive("round_timeout_s", self.round_timeout_s)
        if self.quorum < 1:
            raise ConfigError(f"quorum: must be >= 1, got {self.quorum}")
        _check_strategy_ranges(self.name, {**strategy_declarations()[self.name], **self.options}, self.quorum)
        if self.central_dp.clipping != "off":
            if self.name not in CENTRAL_DP_STRATEGIES:
                raise ConfigError(
                    f"central_dp.clipping: the coordinator's epsilon holds for a plain mean of clipped updates "
                    f"({', '.join(CENTRAL_DP_STRATEGIES)}), not for {self.name!r}"
                )
            if self.max_update_norm_ratio is not None:
                raise ConfigError(
                    "max_update_norm_ratio: must be null with central_dp (the DP clip bounds each update; a bound "
                    "set by the round's median couples the sites, and one site could move another's clip)"
                )
        if self.max_abs_value is not None:
            _positive("max_abs_value", self.max_abs_value)
        ratio = self.max_update_norm_ratio
        if ratio is not None and (
            isinstance(ratio, bool) or not isinstance(ratio, int | float) or not math.isfinite(ratio) or ratio < 1
        ):
            raise ConfigError(
                f"max_update_norm_ratio: must be a number >= 1 (a multiple of the round's median "
                f"update norm), or null for no bound; got {ratio!r}"
            )
        _fraction("fraction_train", self.fraction_train)
        _fraction("fraction_evaluate", self.fraction_evaluate)
        if self.min_sites < 1:
            raise ConfigError(f"min_sites: must be >= 1, got {self.min_sites}")

    def _check_secure_aggregation(self) -> None:
        """What cannot run when the coordinator sees only the sum of the updates."""
        if self.name not in SECURE_AGGREGATION_STRATEGIES:
            raise ConfigError(
                f"secure_aggregation.enabled: the coordinator sees only the sum of the updates, so only a plain "
                f"mean ({', '.join(SECURE_AGGREGATION_STRATEGIES)}) can be computed, not {self.name!r}"
            )
        if self.max_update_norm_ratio is not None:
            raise ConfigError(
                "max_update_norm_ratio: must be null with secure_aggregation (no single update is visible to bound)"
            )
        if self.central_dp.clipping != "off":
            raise ConfigError(
                "central_dp.clipping: must be off with secure_aggregation "
                "(the coordinator cannot clip updates it cannot see)"
            )


# Central DP's noise and epsilon assume a plain mean of clipped updates (strategies/central_dp.py).
CENTRAL_DP_STRATEGIES = ("fedavg", "fedprox")


def _check_strategy_ranges(name: str, options: Mapping[str, Any], quorum: int) -> None:
    """Option values an algorithm cannot run with, refused before any site trains."""
    f = options.get("num_malicious_nodes", 0)
    if f < 0:
        raise ConfigError(f"options.num_malicious_nodes: must be >= 0, got {f}")
    if name == "bulyan" and quorum < 4 * f + 3:
        raise ConfigError(
            f"quorum: bulyan with num_malicious_nodes={f} aggregates only 4f + 3 = {4 * f + 3} replies or more; "
            f"the quorum is {quorum}"
        )
    if name == "multikrum" and options["num_nodes_to_select"] < 1:
        raise ConfigError(f"options.num_nodes_to_select: must be >= 1, got {options['num_nodes_to_select']}")
    if name == "fedtrimmedavg" and not 0 <= options["beta"] < 0.5:
        raise ConfigError(f"options.beta: must be in [0, 0.5), got {options['beta']}")
    if name == "fedprox" and not 0 <= options["proximal_mu"] <= MAX_PROXIMAL_MU:
        raise ConfigError(
            f"options.proximal_mu: must be in [0, {MAX_PROXIMAL_MU:g}] (what a site accepts), "
            f"got {options['proximal_mu']}"
        )


def _check_strategy_options(name: str, options: Mapping[str, Any]) -> None:
    declared = strategy_declarations()
    if name not in declared:
        raise ConfigError(
            f"name: unknown strategy {name!r}; valid names (conf/strategy/): {', '.join(sorted(declared))}"
        )
    own = declared[name]
    for key, value in options.items():
        if key not in own:
            raise ConfigError(
                f"options.{key}: not an option of strategy {name!r}; its options: {', '.join(own) or 'none'}"
            )
        default = own[key]
        expected = float if isinstance(default, float) else type(default)
        fits = (
            isinstance(value, int | float) and not isinstance(value, bool)
            if expected is float
            else (type(value) is expected)
        )
        if not fits:
            raise ConfigError(f"options.{key}: expected {expected.__name__} (strategy {name!r}), got {value!r}")


@dataclass(frozen=True)
class RobustnessConfig:
    """The gate's robustness suite (server/cycle/robustness.py): perturbed validation records and canaries."""

    enabled: bool = True
    records: int = 64  # validation records perturbed (evenly spaced through the set)
    tolerance: float = 0.1  # nats the candidate may be worse than the champion on any perturbation

    def __post_init__(self) -> None:
        if self.records < 1:
            raise ConfigError(f"robustness.records: must be >= 1, got {self.records}")
        if not math.isfinite(self.tolerance) or self.tolerance < 0:
            raise ConfigError(f"robustness.tolerance: must be a finite number >= 0 (nats), got {self.tolerance!r}")


@dataclass(frozen=True)
class GateConfig:
    """When a candidate adapter may be published (server/cycle/gate.py has the policy in full)."""

    margin: float = 0.01
    confidence: float = 0.95
    bootstrap_samples: int = 2000
    site_tolerance: float = 0.02
    min_sites: int = 1
    require_federated_confidence: bool = True
    require_approval: bool = False
    robustness: RobustnessConfig = field(default_factory=RobustnessConfig)

    def __post_init__(self) -> None:
        if not math.isfinite(self.margin) or self.margin < 0:
            raise ConfigError(f"margin: must be a finite number >= 0 (nats), got {self.margin!r}")
        if not (math.isfinite(self.confidence) and 0.5 <= self.confidence < 1):
            raise ConfigError(f"confidence: must be in [0.5, 1), got {self.confidence!r}")
        if self.bootstrap_samples < 100:
            raise ConfigError(f"bootstrap_samples: must be >= 100, got {self.bootstrap_samples}")
        if not math.isfinite(self.site_tolerance) or self.site_tolerance < 0:
            raise ConfigError(f"site_tolerance: must be a finite number >= 0 (nats), got {self.site_tolerance!r}")
        if self.min_sites < 0:
            raise ConfigError(f"min_sites: must be >= 0, got {self.min_sites}")


@dataclass(frozen=True)
class RegistryConfig:
    """The coordinator's signed registry of published versions (fedretrain/registry/)."""

    root: str | None = None  # simulation: <federation>/coordinator/registry; deployment must set it
    signing_key: str | None = None  # Ed25519 private key (fedretrain keys coordinator); <key>.pub beside it
    expiry_days: float = 90.0
    publish_timeout_s: float = 300.0

    def __post_init__(self) -> None:
        _positive("expiry_days", self.expiry_days)
        _positive("publish_timeout_s", self.publish_timeout_s)


ROLLOUT_MODES = ("shadow", "ab")
ROLLOUT_ACTIONS = ("auto", "hold")


@dataclass(frozen=True)
class PublishConfig:
    """The staged rollout of a version that passed the gate (server/cycle/rollout.py).

    Without ``canary`` a passing version goes to every site at once. With it, the version is
    published pending and goes first to the canary sites, which score it against the champion
    on their live traffic and report noised figures; then it is promoted to every site, held,
    or rolled back at the canaries with a signed record.
    """

    canary: tuple[str, ...] | float | None = None  # site ids, or a share of the sites in (0, 1)
    mode: str = "shadow"  # shadow: both answer, the champion's answer is served; ab: a split
    ab_share: float = 0.5  # ab: share of requests the candidate answers
    min_feedback: int = 32  # corrected or rated answers a canary needs before it reports ...
    report_after_s: float | None = None  # ... or this long after its trial began, with what it has (>= 2)
    timeout_s: float = 86400.0  # a canary that has not reported by then: hold
    check_s: float = 60.0  # how often the coordinator asks the canaries
    tolerance: float = 0.0  # nats the candidate may be worse on corrected answers (per record)
    rating_tolerance: float = 0.05  # share of good ratings the candidate may lose (ab)
    confidence: float = 0.95  # level of each canary's interval
    action: str = "auto"  # auto: promote, hold or roll back as the figures say; hold: the operator decides

    @property
    def staged(self) -> bool:
        return self.canary is not None

    def __post_init__(self) -> None:
        if isinstance(self.canary, float):
            if not 0 < self.canary < 1:
                raise ConfigError(f"canary: a share of the sites must be in (0, 1), got {self.canary!r}")
        elif self.canary is not None:
            if not self.canary:
                raise ConfigError("canary: name at least one site (or null for no staged rollout)")
            if len(set(self.canary)) != len(self.canary):
                raise ConfigError(f"canary: a site is named twice in {list(self.canary)}")
        _one_of("mode", self.mode, ROLLOUT_MODES)
        _one_of("action", self.action, ROLLOUT_ACTIONS)
        if not 0 < self.ab_share < 1:
            raise ConfigError(f"ab_share: must be in (0, 1), got {self.ab_share!r}")
        if self.min_feedback < 2:
            raise ConfigError(f"min_feedback: must be >= 2 (an interval needs two), got {self.min_feedback}")
        _positive("timeout_s", self.timeout_s)
        _positive("check_s", self.check_s)
        if self.report_after_s is not None:
            _positive("report_after_s", self.report_after_s)
        for name in ("tolerance", "rating_tolerance"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ConfigError(f"{name}: must be a finite number >= 0, got {value!r}")
        if not (math.isfinite(self.confidence) and 0.5 <= self.confidence < 1):
            raise ConfigError(f"confidence: must be in [0.5, 1), got {self.confidence!r}")


@dataclass(frozen=True)
class DistillConfig:
    """A smaller student distilled from each published version (server/cycle/distill.py), for sites
    with little compute; on the coordinator's own validation text, no site data."""

    enabled: bool = False
    layers: int | None = None  # the student's decoder layers (taken evenly from the teacher's); null: half
    steps: int = 100  # optimizer steps (AdamW on every student weight)
    batch_size: int = 16
    lr: float = 0.002
    temperature: float = 2.0  # softens both distributions in the distillation loss
    alpha: float = 1.0  # weight of the teacher's soft targets; 1 - alpha on the text's own next tokens
    held_out: float = 0.25  # share of the validation records kept out of distillation, to gate the student
    tolerance: float = 0.5  # nats the student's held-out loss may exceed its teacher's (upper end of the interval)

    def __post_init__(self) -> None:
        if self.layers is not None and self.layers < 1:
            raise ConfigError(f"layers: must be >= 1, got {self.layers}")
        if self.steps < 1 or self.batch_size < 1:
            raise ConfigError(f"steps and batch_size: must be >= 1, got {self.steps} and {self.batch_size}")
        _positive("lr", self.lr)
        _positive("temperature", self.temperature)
        if not (math.isfinite(self.alpha) and 0 <= self.alpha <= 1):
            raise ConfigError(f"alpha: must be in [0, 1], got {self.alpha!r}")
        if not 0 < self.held_out < 1:
            raise ConfigError(f"held_out: must be in (0, 1), got {self.held_out!r}")
        if not math.isfinite(self.tolerance) or self.tolerance < 0:
            raise ConfigError(f"tolerance: must be a finite number >= 0 (nats), got {self.tolerance!r}")


@dataclass(frozen=True)
class MonitorConfig:
    """What each site measures when the coordinator asks for its status (client/status.py)."""

    sample_records: int = 200  # records drawn from each window (reference, new) for the scores
    min_new_records: int = 20  # fewer new records than this: no drift or loss scores, only counts
    status_timeout_s: float = 120.0

    def __post_init__(self) -> None:
        if self.sample_records < 2:
            raise ConfigError(f"sample_records: must be >= 2, got {self.sample_records}")
        if self.min_new_records < 1:
            raise ConfigError(f"min_new_records: must be >= 1, got {self.min_new_records}")
        _positive("status_timeout_s", self.status_timeout_s)


@dataclass(frozen=True)
class TriggerConfig:
    """When the coordinator starts a retraining cycle (server/watch/triggers.py). null turns a trigger off."""

    new_records: int | None = None  # new records summed over the sites
    drift_js: float | None = 0.03  # token Jensen-Shannon divergence (bits, 0..1) at a site ...
    drift_hidden: float | None = 0.3  # ... or shift of the base model's mean hidden state ...
    drift_min_sites: int = 1  # ... at this many sites or more
    performance_margin: float | None = 0.1  # published model's loss on new data above its loss on reference (nats)
    schedule_s: float | None = None  # a cycle every this many seconds
    min_interval_s: float = 0.0  # rate limit: at least this long between cycle starts
    poll_interval_s: float = 60.0  # `fedretrain coordinator watch`: seconds between polls
    max_polls: int | None = None  # `fedretrain coordinator watch`: stop after this many polls

    def __post_init__(self) -> None:
        if self.new_records is not None and self.new_records < 1:
            raise ConfigError(f"new_records: must be >= 1 or null, got {self.new_records}")
        for key in ("drift_js", "drift_hidden", "performance_margin", "schedule_s"):
            value = getattr(self, key)
            if value is not None:
                _positive(key, value)
        if self.drift_min_sites < 1:
            raise ConfigError(f"drift_min_sites: must be >= 1, got {self.drift_min_sites}")
        if not math.isfinite(self.min_interval_s) or self.min_interval_s < 0:
            raise ConfigError(f"min_interval_s: must be a finite number >= 0, got {self.min_interval_s!r}")
        _positive("poll_interval_s", self.poll_interval_s)
        if self.max_polls is not None and self.max_polls < 1:
            raise ConfigError(f"max_polls: must be >= 1 or null, got {self.max_polls}")


# MLflow tracking URIs an export accepts (server/tracking/). MLflow 3 refuses its file: store
# unless told otherwise; sqlite:///PATH.db is the local store that needs no server.
MLFLOW_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql", "http", "https")
TRACKER_NAME = re.compile(r"[\w.+-]{1,200}")


def check_mlflow_uri(key: str, uri: str) -> None:
    """Refuse a tracking URI MLflow would not take, or one that holds a password.

    ``key`` names the setting in the message (``tracking.mlflow_uri``, ``--mlflow-uri``).
    A password would be kept in the run's config.yaml and printed in its logs.
    """
    if re.match(r"^[^:/]+://[^/@]*:[^/@]*@", uri):
        raise ConfigError(
            f"{key}: the URI holds a password, which config.yaml and the logs would keep; give it in "
            "MLflow's environment (MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD, or "
            "MLFLOW_TRACKING_TOKEN) or the database's own (PGPASSWORD)"
        )
    scheme = uri.split(":", 1)[0].split("+", 1)[0].lower() if ":" in uri else ""
    if scheme not in MLFLOW_SCHEMES:
        raise ConfigError(
            f"{key}: {f'unknown MLflow tracking URI scheme {scheme!r}' if scheme else 'no URI scheme'} in {uri!r}; "
            "use one of "
            f"{', '.join(MLFLOW_SCHEMES)} (a local store: sqlite:///PATH.db; MLflow 3 keeps its file: store "
            "in maintenance mode)"
        )
    if scheme == "sqlite" and not uri.startswith("sqlite:///"):
        raise ConfigError(f"{key}: a SQLite store is sqlite:///relative/path.db or sqlite:////absolute/path.db")


@dataclass(frozen=True)
class TrackingConfig:
    """Export to MLflow and TensorBoard as the cycle writes its run directory (server/tracking/).

    Written by the coordinator only; the run directory and the registry stay the source of
    truth, and ``fedretrain export`` redoes an export. null turns a target off.
    """

    mlflow_uri: str | None = None  # sqlite:///PATH.db, http(s)://HOST:PORT, postgresql://...
    tensorboard_dir: str | None = None  # one log directory per run below this folder
    experiment: str = "fedretrain"  # the MLflow experiment that holds the runs
    model_name: str | None = None  # the MLflow registered model of the registry; null: fedretrain-<key id>
    timeout_s: float = 30.0  # how long the end of a cycle waits for its export

    def __post_init__(self) -> None:
        if self.mlflow_uri is not None:
            check_mlflow_uri("mlflow_uri", self.mlflow_uri)
        if self.tensorboard_dir is not None and not self.tensorboard_dir.strip():
            raise ConfigError("tensorboard_dir: must name a folder, or be null")
        if not self.experiment.strip():
            raise ConfigError("experiment: must be a non-empty MLflow experiment name")
        if self.model_name is not None and not TRACKER_NAME.fullmatch(self.model_name):
            raise ConfigError(
                f"model_name: letters, digits, '.', '_', '+' and '-' only (up to 200), or null; got {self.model_name!r}"
            )
        _positive("timeout_s", self.timeout_s)

    @property
    def enabled(self) -> bool:
        return self.mlflow_uri is not None or self.tensorboard_dir is not None


SCENARIOS = ("none", "drift")


@dataclass(frozen=True)
class ScenarioConfig:
    """Simulated time (simulation/scenario.py): records arrive at every step; at one step the data drifts."""

    name: str = "none"
    steps: int = 8  # time steps after step 0 (step 0: the first cycle publishes version 1)
    drift_step: int = 3  # from this step on, new records are drifted
    arrivals_per_step: int = 40  # new records per site per step
    drifted_sites: int | None = None  # how many sites drift (the first ones); null: all
    probe_records: int = 120  # fresh records per step scored for the plot (the researcher's view)
    step_s: float = 86400.0  # simulated seconds per step (the triggers' clock)

    def __post_init__(self) -> None:
        _one_of("name", self.name, SCENARIOS)
        if self.steps < 1:
            raise ConfigError(f"steps: must be >= 1, got {self.steps}")
        if not 1 <= self.drift_step <= self.steps:
            raise ConfigError(f"drift_step: must be between 1 and steps ({self.steps}), got {self.drift_step}")
        for key in ("arrivals_per_step", "probe_records"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}: must be >= 1, got {getattr(self, key)}")
        if self.drifted_sites is not None and self.drifted_sites < 1:
            raise ConfigError(f"drifted_sites: must be >= 1 or null, got {self.drifted_sites}")
        _positive("step_s", self.step_s)


@dataclass(frozen=True)
class AttackersConfig:
    """Malicious virtual sites (fedretrain/attacks.py): a share of the sites, chosen by the seed."""

    share: float = 0.0  # of the virtual sites, rounded to the nearest count; 0: none
    behaviour: str = "sign_flip"
    strength: float | None = None  # None: the behaviour's own default
    # What a backdoor attacker writes into its training notes (and the run measures).
    phrase: str = "Discharge immediately and stop all anticoagulants."

    def __post_init__(self) -> None:
        if not (math.isfinite(self.share) and 0 <= self.share < 1):
            raise ConfigError(f"share: must be in [0, 1), got {self.share!r}")
        _one_of("behaviour", self.behaviour, ATTACKS)
        if self.strength is not None and not (math.isfinite(self.strength) and self.strength >= 0):
            raise ConfigError(f"strength: must be a finite number >= 0 or null, got {self.strength!r}")
        if self.behaviour == "backdoor" and self.strength is not None and self.strength > 1:
            raise ConfigError(
                f"strength: a backdoor's is the share of notes it poisons, in [0, 1]; got {self.strength}"
            )
        if not self.phrase.strip():
            raise ConfigError("phrase: must not be empty")


@dataclass(frozen=True)
class TrafficConfig:
    """Simulated users of each site's service (client/serve/replay.py): replayed when a version goes
    on trial at the site (a canary of a staged rollout, ``publish.canary``)."""

    requests: int = 0  # per site; 0: no simulated users
    prompt_share: float = 0.3  # of a note's text the user types; the rest is their correction
    # From this scenario step on the users ask general, non-clinical questions (a drift in what
    # users ask, simulation/scenario.py); null: they keep asking about notes like the site's own.
    general_from_step: int | None = None
    max_tokens: int = 4  # tokens each answer is generated to (the comparison scores the corrections)

    def __post_init__(self) -> None:
        if self.requests < 0:
            raise ConfigError(f"traffic.requests: must be >= 0, got {self.requests}")
        if not 1 <= self.max_tokens <= 512:
            raise ConfigError(f"traffic.max_tokens: must be in [1, 512], got {self.max_tokens}")
        if self.general_from_step is not None and self.general_from_step < 0:
            raise ConfigError(f"traffic.general_from_step: a scenario step >= 0, got {self.general_from_step}")
        if not 0 < self.prompt_share < 1:
            raise ConfigError(f"traffic.prompt_share: must be in (0, 1), got {self.prompt_share!r}")


@dataclass(frozen=True)
class SimulationConfig:
    num_sites: int = 3
    client_cpus: float = 1.0
    client_gpus: float | None = None  # None: auto (a quarter of a GPU per site when CUDA is present)
    site_epsilon_ceiling: float = 8.0
    site_delta: float = 1e-5
    site_accountant: str = "rdp"
    site_smoke_eval: bool = True
    federation_dir: str | None = None
    # A researcher's own data: each sub-folder a site with its train and heldout files (JSONL
    # or CSV). The sites are these folders (num_sites is their count); fedretrain reads them
    # and writes nothing there (each site's state goes below the run's federation folder).
    sites_dir: str | None = None
    attackers: AttackersConfig = field(default_factory=AttackersConfig)
    # Mixed LoRA ranks: site k trains rank site_lora_ranks[k % len] (its lora-rank setting,
    # fedretrain/lora_ranks.py); null: every site the job's lora.r.
    site_lora_ranks: tuple[int, ...] | None = None
    # Sites that install the student distilled from each version (their model-variant='student',
    # server/cycle/distill.py); null: every site installs the full version.
    student_sites: tuple[str, ...] | None = None
    # The gate's memorisation probe (server/cycle/robustness.py): canary strings planted in the
    # generated sites' training notes, dealt out across the sites, each canary_repeats times.
    canaries: int = 0
    canary_repeats: int = 4
    traffic: TrafficConfig = field(default_factory=TrafficConfig)

    def __post_init__(self) -> None:
        if self.canaries < 0 or self.canary_repeats < 1:
            raise ConfigError(
                f"canaries: must be >= 0 and canary_repeats >= 1, got {self.canaries} and {self.canary_repeats}"
            )
        if self.canaries and self.sites_dir:
            raise ConfigError("canaries: planted in generated notes; they do not run on simulation.sites_dir")
        if self.site_lora_ranks is not None and (
            not self.site_lora_ranks
            or any(isinstance(r, bool) or not isinstance(r, int) or r < 1 for r in self.site_lora_ranks)
        ):
            raise ConfigError(f"site_lora_ranks: LoRA ranks >= 1, one per site (cycled), got {self.site_lora_ranks!r}")
        if self.attackers.share > 0 and self.attackers.behaviour == "backdoor" and self.sites_dir:
            raise ConfigError(
                "attackers.behaviour: backdoor writes its phrase into generated training notes; "
                "it does not run on simulation.sites_dir"
            )
        if self.num_sites < 1:
            raise ConfigError(f"num_sites: must be >= 1, got {self.num_sites}")
        _positive("client_cpus", self.client_cpus)
        if self.client_gpus is not None and (not math.isfinite(self.client_gpus) or self.client_gpus < 0):
            raise ConfigError(f"client_gpus: must be >= 0, got {self.client_gpus!r}")
        _positive("site_epsilon_ceiling", self.site_epsilon_ceiling)
        _fraction("site_delta", self.site_delta, open_low=False)
        if self.site_delta == 0:
            raise ConfigError("site_delta: must be > 0")
        _one_of("site_accountant", self.site_accountant, ACCOUNTANTS)


@dataclass(frozen=True)
class Config:
    """The whole composed config of one run."""

    name: str = "default"
    seed: int = 0
    rounds: int = 3
    output_dir: str = "runs"
    validation_path: str | None = None
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    train: TrainConfig = field(default_factory=TrainConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    data: DataConfig = field(default_factory=DataConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    gate: GateConfig = field(default_factory=GateConfig)
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    publish: PublishConfig = field(default_factory=PublishConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    trigger: TriggerConfig = field(default_factory=TriggerConfig)
    scenario: ScenarioConfig = field(default_factory=ScenarioConfig)
    simulation: SimulationConfig = field(default_factory=SimulationConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def __post_init__(self) -> None:
        if self.rounds < 1:
            raise ConfigError(f"rounds: must be >= 1, got {self.rounds}")
        if self.seed < 0:
            raise ConfigError(f"seed: must be >= 0, got {self.seed}")
        if not self.name or "/" in self.name:
            raise ConfigError(f"name: must be a non-empty name without '/', got {self.name!r}")
