"""A version on trial at a canary site: kept beside the installed version, never installed by it.

The staged rollout (server/cycle/rollout.py) sends a version that passed the gate, still
pending in the registry, to a few canary sites in a ``query.trial`` message. The site
verifies it as it would a published version, except for the champion pointer (a pending
version has none: the champion has not moved), and keeps it here::

    <state>/models/trial/trial.json    {"version", "mode", "ab_share", "min_feedback", "run_id", "started_at"}
    <state>/models/trial/000004/       the signed bundle as received
    <state>/models/withdrawn.json      {"versions": [...]}: versions withdrawn here, never trialled again

The site's inference service (client/serve/app.py) then answers with both versions: in
shadow (the champion's answer is served) or as an A/B split. A ``query.withdraw`` message
with the coordinator's signed withdrawal (the rollback at the canaries) ends the trial; the
promotion is an ordinary ``query.publish`` of the approved version, whose install ends it too.
Only one version is on trial at a time: a newer trial replaces an older one.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from client.install.installer import _pinned_key
from client.install.model_store import ModelStore
from client.round.site import site_model
from fedretrain.atomic import atomic_write_json, fsync_dir
from fedretrain.config import Job, SiteConfig
from fedretrain.config.schema import ROLLOUT_MODES
from fedretrain.errors import ConfigError, VerificationError
from fedretrain.modeling.loading import resolve_model_path
from fedretrain.registry.base_model import base_model_identity
from fedretrain.registry.bundle import VersionBundle, WithdrawalRecord, verify_bundle, verify_withdrawal
from fedretrain.registry.signing import verify_signature

log = logging.getLogger("fedretrain.client")

TRIAL_DIR = "trial"
WITHDRAWN_FILE = "withdrawn.json"


@dataclass(frozen=True)
class Trial:
    """The version on trial and how the site's service runs it."""

    version: int
    mode: str  # shadow | ab
    ab_share: float
    min_feedback: int
    run_id: str
    started_at: str
    report_after_s: float | None = None  # report this long after started_at with what there is (>= 2)

    @classmethod
    def from_settings(cls, version: int, settings: dict[str, Any], run_id: str) -> Trial:
        """From the ``rollout`` record of a trial message (ConfigError naming the field)."""
        mode, share, feedback = settings.get("mode"), settings.get("ab-share"), settings.get("min-feedback")
        if mode not in ROLLOUT_MODES:
            raise ConfigError(f"rollout.mode: one of {', '.join(ROLLOUT_MODES)}, got {mode!r}")
        if isinstance(share, bool) or not isinstance(share, int | float) or not 0 < share < 1:
            raise ConfigError(f"rollout.ab-share: a share in (0, 1), got {share!r}")
        if isinstance(feedback, bool) or not isinstance(feedback, int) or feedback < 2:
            raise ConfigError(f"rollout.min-feedback: a whole number >= 2, got {feedback!r}")
        after = settings.get("report-after-s")
        if after is not None and (isinstance(after, bool) or not isinstance(after, int | float) or not after > 0):
            raise ConfigError(f"rollout.report-after-s: a number of seconds > 0, got {after!r}")
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        return cls(version, mode, float(share), feedback, run_id, now, None if after is None else float(after))

    def ready(self, feedback: int, now: datetime | None = None) -> bool:
        """Whether ``feedback`` answers with feedback are enough to report on (see :mod:`client.serve.canary`)."""
        if feedback >= self.min_feedback:
            return True
        if self.report_after_s is None or feedback < 2:
            return False
        started = datetime.strptime(self.started_at, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
        return ((now or datetime.now(UTC)) - started).total_seconds() >= self.report_after_s


def trial_root(store: ModelStore) -> Path:
    return store.root / TRIAL_DIR


def current_trial(store: ModelStore) -> tuple[Trial, Path] | None:
    """The version on trial and its bundle's directory, or None."""
    path = trial_root(store) / "trial.json"
    if not path.is_file():
        return None
    try:
        trial = Trial(**json.loads(path.read_text(encoding="utf-8")))
    except (ValueError, TypeError) as err:
        raise VerificationError("store", f"{path}: unreadable ({err}); refusing to guess") from err
    return trial, trial_root(store) / f"{trial.version:06d}"


def withdrawn_versions(store: ModelStore) -> list[int]:
    path = store.root / WITHDRAWN_FILE
    if not path.is_file():
        return []
    try:
        return [int(v) for v in json.loads(path.read_text(encoding="utf-8"))["versions"]]
    except (ValueError, TypeError, KeyError) as err:
        raise VerificationError("store", f"{path}: unreadable ({err}); refusing to guess") from err


def receive_trial(
    site: SiteConfig, job: Job, bundle: VersionBundle, settings: dict[str, Any], *, now: datetime | None = None
) -> dict[str, float | int]:
    """Verify ``bundle`` and keep it as the version on trial; the reply's metrics.

    Checks, failing closed: a pinned coordinator key; the manifest's signature; a version
    newer than any this site accepted and never withdrawn here; then every check of
    :func:`fedretrain.registry.bundle.verify_bundle` (hashes, expiry, this site's base model,
    this site's adapter shapes, finite values).

    Raises
    ------
    VerificationError
        The version fails a check; nothing is kept.
    ConfigError
        The rollout settings are malformed.
    """
    now = now or datetime.now(UTC)
    key = _pinned_key(site)
    store = ModelStore(site.model_store_path)
    trial = Trial.from_settings(bundle.version, settings, job.run_id)
    if bundle.version in withdrawn_versions(store):
        raise VerificationError("trial", f"version {bundle.version} was withdrawn here; it is not trialled again")
    running = current_trial(store)
    if running is not None and running[0].version == bundle.version:
        stored = VersionBundle.from_dir(running[1])
        if stored.manifest_bytes == bundle.manifest_bytes and stored.signature == bundle.signature:
            return {"trial-version": bundle.version, "already-on-trial": 1}  # a re-send
    verify_signature(key, bundle.manifest_bytes, bundle.signature)  # before loading anything
    lm = site_model(job, site.device)
    model_dir = Path(resolve_model_path(job.model.name_or_path))
    identity = base_model_identity(job.model.name_or_path, model_dir, job.model.init_missing_seed)
    state = store.state()
    verify_bundle(
        bundle,
        key,
        now=now,
        last_accepted=state.highest_accepted or None,
        base_model_sha256=identity["sha256"],
        expected_shapes={name: shape for name, shape, _ in lm.spec.entries},
    )
    _replace_trial(store, bundle, trial)
    log.info(
        "site %s: version %d on trial (%s), beside version %s", site.site_id, bundle.version, trial.mode, state.current
    )
    return {"trial-version": bundle.version, "already-on-trial": 0, "installed-version": state.current or 0}


def withdraw_trial(site: SiteConfig, record: WithdrawalRecord) -> dict[str, float | int]:
    """End the trial the coordinator's signed withdrawal names; the reply's metrics.

    The version is remembered as withdrawn (never trialled again). A withdrawal of a version
    that is not on trial here is still remembered, and said.

    Raises
    ------
    VerificationError
        The record's signature or form fails.
    """
    body = verify_withdrawal(record, _pinned_key(site))
    version = int(body["version"])
    store = ModelStore(site.model_store_path)
    withdrawn = withdrawn_versions(store)
    if version not in withdrawn:
        atomic_write_json(store.root / WITHDRAWN_FILE, {"versions": sorted([*withdrawn, version])})
    running = current_trial(store)
    ended = running is not None and running[0].version == version
    if ended:
        _remove_trial(store)
        log.info("site %s: version %d withdrawn by the coordinator: %s", site.site_id, version, body["reason"])
    return {"withdrawn-version": version, "trial-ended": int(ended)}


def end_trial_if(store: ModelStore, version: int) -> bool:
    """End the trial of ``version`` (it was just installed: promoted). True if one ended."""
    running = current_trial(store)
    if running is None or running[0].version > version:
        return False
    _remove_trial(store)  # the trialled version is installed now, or an older trial was overtaken
    return True


def _replace_trial(store: ModelStore, bundle: VersionBundle, trial: Trial) -> None:
    # The new trial is built aside and swapped in whole: a crash leaves the old trial or the new.
    store.root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".trial-", dir=store.root))
    try:
        bundle.write_to(staging / f"{bundle.version:06d}")
        atomic_write_json(staging / "trial.json", asdict(trial))
        _remove_trial(store)
        staging.rename(trial_root(store))
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    fsync_dir(store.root)


def _remove_trial(store: ModelStore) -> None:
    root = trial_root(store)
    if not root.exists():
        return
    retired = Path(tempfile.mkdtemp(prefix=".retired-", dir=store.root))
    root.rename(retired / TRIAL_DIR)  # gone from readers in one rename
    shutil.rmtree(retired, ignore_errors=True)
    fsync_dir(store.root)
