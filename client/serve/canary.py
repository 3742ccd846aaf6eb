"""A canary's report on the version on trial: how it did on the site's live traffic, noised.

The site's service journals every answer given while a version is on trial
(client/serve/app.py), and the people who use it rate answers or correct them
(client/serve/feedback.py). Once ``min_feedback`` answers given during the trial have
feedback, the coordinator's ``query.canary`` gets, as one Gaussian release charged to the
site's ledger (noise multiplier ``eval-noise``, like the site's evaluation of a candidate):

    num-examples, diff-sum, diff-sumsq   count, sum and sum of squares over the corrected
                                         answers of (trial loss - installed loss) on the text
                                         the user said it should have been (prompt +
                                         correction), each clipped to ``eval-clip``: the same
                                         keys as an evaluation reply, read the same way
    ab-trial-good, ab-trial-rated        A/B only: good ratings and ratings of the answers each
    ab-installed-good, ab-installed-rated  version served (in shadow only the installed serves)
    *-std                                the standard deviation of each figure's noise

With ``report-after-s`` it reports that long after the trial began with what it has (at least
two). Before that the reply says only ``ready = 0``: that fewer answers of the trial have
feedback is all it reveals (as a status reply's missing drift scores do). The
report is made once per trial: asked again, the site sends the same figures (no new spend).
Nothing else leaves: no prompt, answer, correction or rating.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import safetensors.torch

from client.install.model_store import ModelStore
from client.install.trial import Trial, current_trial, trial_root
from client.round.site import noised_loss_change
from client.serve.journal import Journal
from fedretrain.arrays import from_torch_state_dict
from fedretrain.atomic import atomic_write_json
from fedretrain.config import Job, SiteConfig
from fedretrain.errors import ConfigError
from fedretrain.privacy.ledger import PrivacyLedger, ledger_lock
from fedretrain.privacy.release import RELEASE_SAMPLE_RATE, RELEASE_STEPS
from fedretrain.registry.bundle import VersionBundle

log = logging.getLogger("fedretrain.client")

REPORT_FILE = "report.json"


def trial_feedback(journal: Journal, trial: Trial) -> dict[str, Any]:
    """The trial's answers with feedback: the corrected texts (prompt + correction) and, per
    serving version (``trial`` or ``installed``), good and rated counts; exact, for the site."""
    answered = {
        rid: e for rid, e in journal.answered().items() if (e.get("trial") or {}).get("version") == trial.version
    }
    corrected: dict[str, str] = {}
    rated: dict[str, str] = {}  # answer id -> its last rating: one answer counts once, however often rated
    for entry in journal.all_feedback():
        answer = answered.get(str(entry.get("id")))
        if answer is None:
            continue
        if isinstance(entry.get("correction"), str):
            corrected.setdefault(answer["id"], answer["prompt"] + entry["correction"])
        elif entry.get("rating") in ("good", "bad"):
            rated[answer["id"]] = entry["rating"]
    ratings = {"trial": [0, 0], "installed": [0, 0]}
    for answer_id, rating in rated.items():
        arm = ratings["trial" if answered[answer_id]["version"] == trial.version else "installed"]
        arm[0] += rating == "good"
        arm[1] += 1
    # In shadow only the corrections are scored (the installed version served every rated answer).
    counted = set(corrected) if trial.mode == "shadow" else set(corrected) | set(rated)
    return {
        "answers": len(answered),
        "with_feedback": len(counted),
        "corrected": [corrected[k] for k in sorted(corrected)],
        "ratings": ratings,
    }


def canary_report(site: SiteConfig, job: Job) -> dict[str, float | int]:
    """The reply to ``query.canary`` (see the module docstring).

    Raises
    ------
    ConfigError
        No version is on trial at this site.
    PrivacyBudgetExceeded
        The release would take the site past its ceiling.
    """
    store = ModelStore(site.model_store_path)
    on_trial = current_trial(store)
    if on_trial is None:
        raise ConfigError(f"site {site.site_id}: no version is on trial here")
    trial, trial_dir = on_trial
    kept = trial_root(store) / REPORT_FILE
    with ledger_lock(site.ledger_path):
        if kept.is_file():
            return dict(json.loads(kept.read_text(encoding="utf-8")))
        feedback = trial_feedback(Journal.at(site.state_path), trial)
        if not trial.ready(feedback["with_feedback"]):
            return {"trial-version": trial.version, "ready": 0}
        ledger = PrivacyLedger.load(
            site.ledger_path, site_id=site.site_id, accountant=site.accountant, delta=site.delta
        )
        ledger.check_can_spend(site.eval_noise, RELEASE_SAMPLE_RATE, RELEASE_STEPS, site.epsilon_ceiling)
        metrics = _noised_comparison(site, job, store, trial, trial_dir, feedback)
        ledger.record(job.run_id, 0, site.eval_noise, RELEASE_SAMPLE_RATE, RELEASE_STEPS, kind="canary")
        ledger.save(site.ledger_path)  # the spend is on record before the figures can leave
        metrics["epsilon"] = ledger.epsilon()
        atomic_write_json(kept, metrics)
    log.info(
        "site %s: canary report on version %d: %d answers, %d with feedback, %d corrected",
        site.site_id,
        trial.version,
        feedback["answers"],
        feedback["with_feedback"],
        len(feedback["corrected"]),
    )
    return metrics


def _noised_comparison(
    site: SiteConfig, job: Job, store: ModelStore, trial: Trial, trial_dir: Path, feedback: dict[str, Any]
) -> dict[str, float | int]:
    # The sums of an evaluation (client/round/site.py), on the corrected texts: the version on
    # trial against the installed one; in A/B the ratings' counts join the same release.
    stored = VersionBundle.from_dir(trial_dir).files["adapter_model.safetensors"]
    counts = {}
    if trial.mode == "ab":
        for arm, (good, rated) in feedback["ratings"].items():
            counts[f"ab-{arm}-good"], counts[f"ab-{arm}-rated"] = float(good), float(rated)
    metrics = noised_loss_change(
        site,
        job,
        feedback["corrected"],
        store.current_adapter(),
        from_torch_state_dict(safetensors.torch.load(stored)),
        counts,
    )
    metrics.update({"trial-version": trial.version, "ready": 1})
    return metrics
