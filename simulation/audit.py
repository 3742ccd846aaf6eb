"""``fedretrain privacy audit``: an empirical lower bound on one site's epsilon, from one cycle.

Steinke, Nasr and Jagielski (2023), on the real site code path. The auditor

1. draws ``m`` distinct canaries (random word strings) and a fair coin for each, from
   its own generator (never the site's or the job's);
2. writes one simulated site whose training data are some honest notes plus the
   canaries whose coin came up heads;
3. runs that site through one cycle of ``rounds`` rounds with ``client.round.site.train_round``
   (data validation, DP-SGD, the privacy ledger); each round's global adapter is the
   site's previous update, as in a one-site federation;
4. scores each canary by how much its loss fell from the initial adapter to the final
   one, guesses IN for the highest scores and OUT for the lowest, and turns the right
   guesses into a lower bound on epsilon (:mod:`fedretrain.privacy.audit`), at the
   site's delta, beside the epsilon the site's ledger reports.

With DP on the bound must stay at or below the ledger's epsilon; with DP off it shows
how much a site leaks without it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from client.round.site import site_model, train_round
from fedretrain.config import Job, SiteConfig, compose_config
from fedretrain.data.encoding import encode_texts
from fedretrain.modeling.lora_model import adapter_arrays, load_adapter_arrays, load_lora_model
from fedretrain.privacy.audit import AuditBound, audit_scores
from fedretrain.privacy.ledger import PrivacyLedger
from fedretrain.training.evaluate import evaluate_loss
from simulation.notes import GENERAL_CORPUS_PATH, site_notes
from simulation.styles import site_style

SITE_ID = "audited-site"
# The cycle each audit runs unless its overrides say otherwise: two rounds of 60 steps at
# batch 8 pass about 20 times over 16 honest notes and ~32 planted canaries (m = 64),
# enough for training without DP to memorise them. 48 tokens hold a canary (at most ~30)
# and the start of a note: padding every canary to a whole note would triple the compute.
JOB_DEFAULTS = (
    "experiment=smoke",
    "model.max_length=48",
    "train.local_steps=60",
    "train.batch_size=8",
    "train.lr=0.01",
)


@dataclass(frozen=True)
class AuditSettings:
    """One audit. ``overrides`` are Hydra overrides for the job, applied after :data:`JOB_DEFAULTS`.

    ``guess_fractions`` are the ``(k_plus, k_minus)`` choices as fractions of ``canaries``;
    the bound is the best of them, Bonferroni-corrected to ``confidence``.
    ``auditor_seed`` seeds the auditor's canaries and coins (None: fresh OS entropy).
    """

    canaries: int = 64
    rounds: int = 2
    private: bool = True
    overrides: tuple[str, ...] = ()
    honest_records: int = 16
    canary_words: int = 8
    confidence: float = 0.95
    guess_fractions: tuple[tuple[float, float], ...] = ((0.25, 0.25), (0.5, 0.5))
    epsilon_ceiling: float = 1000.0
    delta: float = 1e-5
    device: str = "auto"
    auditor_seed: int | None = None

    def __post_init__(self) -> None:
        if self.canaries < 2 or self.rounds < 1 or self.honest_records < 1 or self.canary_words < 1:
            raise ValueError(
                "an audit needs canaries >= 2, rounds >= 1, honest_records >= 1 and "
                f"canary_words >= 1; got {self.canaries}, {self.rounds}, {self.honest_records} "
                f"and {self.canary_words}"
            )
        if not 0 < self.confidence < 1:
            raise ValueError(f"confidence: must be in (0, 1), got {self.confidence}")
        if not self.guess_fractions or any(a < 0 or b < 0 or a + b > 1 for a, b in self.guess_fractions):
            raise ValueError(
                f"guess_fractions: need (k_plus, k_minus) fractions >= 0 summing to <= 1, got {self.guess_fractions}"
            )

    def choices(self) -> list[tuple[int, int]]:
        """``guess_fractions`` as ``(k_plus, k_minus)`` counts of canaries, without repeats."""
        m = self.canaries
        return sorted({(int(a * m), int(b * m)) for a, b in self.guess_fractions})  # floors: k_plus + k_minus <= m


@dataclass(frozen=True)
class AuditResult:
    """An audit's bound, the ledger's epsilon (None without DP) and what it took."""

    settings: AuditSettings
    bound: AuditBound
    ledger_epsilon: float | None
    included: int
    mean_score_in: float
    mean_score_out: float
    wall_s: float

    def row(self) -> dict[str, object]:
        """One line of the audit table, JSON-ready."""
        b = self.bound
        return {
            "dp": self.settings.private,
            "m": b.m,
            "r": b.r,
            "v": b.v,
            "k_plus": b.k_plus,
            "k_minus": b.k_minus,
            "epsilon_lower_bound": round(b.epsilon, 4),
            "confidence": b.confidence,
            "delta": b.delta,
            "ledger_epsilon": None if self.ledger_epsilon is None else round(self.ledger_epsilon, 4),
            "rounds": self.settings.rounds,
            "included": self.included,
            "mean_score_in": round(self.mean_score_in, 4),
            "mean_score_out": round(self.mean_score_out, 4),
            "wall_s": round(self.wall_s, 1),
        }


def run_audit(settings: AuditSettings, workdir: str | Path | None = None) -> AuditResult:
    """Plant canaries in one site, run one cycle through the site's own code, bound epsilon.

    ``workdir`` holds the site's files and ledger: a new or empty directory (a temporary
    one when None), so the ledger holds this cycle only.

    Raises
    ------
    ValueError
        If ``workdir`` exists and is not empty.
    """
    if workdir is not None and Path(workdir).exists() and any(Path(workdir).iterdir()):
        raise ValueError(f"{workdir}: the audit's site directory must be new or empty")
    started = time.perf_counter()
    rng = np.random.default_rng(settings.auditor_seed)  # the auditor's, not the site's
    canaries = draw_canaries(rng, settings.canaries, settings.canary_words)
    included = rng.random(settings.canaries) < 0.5  # [m] fair coins
    job = audit_job(settings)
    with tempfile.TemporaryDirectory(prefix="fraudit-") as scratch:
        site = write_site(
            Path(workdir or scratch), settings, job, [c for c, keep in zip(canaries, included, strict=True) if keep]
        )
        # The job's fresh LoRA (B = 0: the base model's own loss), not the process' cached
        # model, which holds whatever adapter it last trained.
        initial = adapter_arrays(load_lora_model(job.model, job.lora, seed=job.seed, device=site.device).model)
        adapter = initial
        for server_round in range(1, settings.rounds + 1):
            adapter = train_round(site, job, adapter, server_round, global_hash=_digest(adapter)).adapter
        scores = canary_scores(job, site.device, canaries, initial, adapter)
        ledger = PrivacyLedger.load(
            site.ledger_path, site_id=site.site_id, accountant=site.accountant, delta=site.delta
        )
    bound = audit_scores(scores, included, settings.choices(), confidence=settings.confidence, delta=settings.delta)
    return AuditResult(
        settings=settings,
        bound=bound,
        ledger_epsilon=ledger.epsilon() if settings.private else None,
        included=int(included.sum()),
        mean_score_in=float(scores[included].mean()),
        mean_score_out=float(scores[~included].mean()),
        wall_s=time.perf_counter() - started,
    )


def draw_canaries(rng: np.random.Generator, count: int, words: int) -> list[str]:
    """``count`` distinct strings of ``words`` words drawn uniformly from the general corpus' vocabulary.

    Each is a sentence nobody wrote: the model can only know it by training on it.
    """
    vocabulary = sorted(set(re.findall(r"\b[a-z]{3,}\b", GENERAL_CORPUS_PATH.read_text(encoding="utf-8"))))
    canaries: list[str] = []
    while len(canaries) < count:
        text = " ".join(vocabulary[i] for i in rng.integers(len(vocabulary), size=words)).capitalize() + "."
        if text not in canaries:
            canaries.append(text)
    return canaries


def audit_job(settings: AuditSettings) -> Job:
    """The cycle's job: :data:`JOB_DEFAULTS` with ``settings.overrides``, DP on or off."""
    cfg = compose_config([*JOB_DEFAULTS, f"rounds={settings.rounds}", *settings.overrides])
    job = Job.from_config(cfg, run_id="privacy-audit")
    return dataclasses.replace(job, privacy=dataclasses.replace(job.privacy, enabled=settings.private))


def write_site(root: Path, settings: AuditSettings, job: Job, planted: Sequence[str]) -> SiteConfig:
    """A site directory with honest notes and the planted canaries, shuffled in; its config."""
    notes = site_notes(0, settings.honest_records + 4, {"endocrinology": 1.0}, job.seed, site_style(0, job.seed))
    train = [n["text"] for n in notes[4:]] + list(planted)
    # Canaries among the notes in an order fixed by their text alone (the coins decide nothing else).
    train.sort(key=lambda text: hashlib.sha256(text.encode()).digest())
    root.mkdir(parents=True, exist_ok=True)
    _write_jsonl(root / "train.jsonl", train)
    _write_jsonl(root / "heldout.jsonl", [n["text"] for n in notes[:4]])
    # A research sandbox: only the site itself may allow a job without DP.
    return SiteConfig(
        site_id=SITE_ID,
        data_dir=str(root),
        epsilon_ceiling=settings.epsilon_ceiling,
        delta=settings.delta,
        device=settings.device,
        allow_non_private=not settings.private,
    )


def canary_scores(
    job: Job, device: str, canaries: Sequence[str], initial: dict[str, np.ndarray], final: dict[str, np.ndarray]
) -> np.ndarray:
    """``[m]`` loss under ``initial`` minus loss under ``final``: larger looks more trained on."""
    lm = site_model(job, device)
    dataset = encode_texts(lm.tokenizer, list(canaries), job.model.max_length)
    losses = []
    for adapter in (initial, final):
        load_adapter_arrays(lm, adapter)
        stats = evaluate_loss(lm.model, dataset, batch_size=job.train.eval_batch_size)
        losses.append(np.asarray(stats.example_losses))
    return losses[0] - losses[1]


def _digest(adapter: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for name in sorted(adapter):
        h.update(name.encode())
        h.update(np.ascontiguousarray(adapter[name]).tobytes())
    return h.hexdigest()


def _write_jsonl(path: Path, texts: Sequence[str]) -> None:
    path.write_text(
        "".join(json.dumps({"id": f"r{i}", "text": t}) + "\n" for i, t in enumerate(texts)), encoding="utf-8"
    )
