"""What a site does with each message: unpack the job, run the site's core, pack the reply.

The same code answers in a simulation's ClientApp (in the Ray actor) and in a deployed
site's worker (client/worker.py). A failure the site means (bad data, budget spent, a
malformed job) is raised as a :class:`fedretrain.errors.FedretrainError`; :func:`refusal`
turns any failure into the code and reason of an error reply.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from client.install.installer import receive_version
from client.reasons import without_paths
from client.round.site import base_identity, check_ready, evaluate_round, train_round
from client.status import site_status
from fedretrain import errors
from fedretrain.arrays import from_array_record, to_array_record
from fedretrain.config import Job, MonitorConfig, SiteConfig, build
from fedretrain.registry.bundle import RollbackRecord, VersionBundle, WithdrawalRecord
from fedretrain.secagg import SECURE_STAGE
from fedretrain.training.params import MAX_PROXIMAL_MU

log = logging.getLogger("fedretrain.client")

# Error codes in error replies (fedretrain/errors.py, where the light client mods read them too).
ERROR_CODES = errors.ERROR_CODES
UNEXPECTED_ERROR = errors.UNEXPECTED_ERROR

Core = Callable[[SiteConfig, Job, int, RecordDict], RecordDict]

# Keys of an instruction's config that are not part of the job: the round (added by
# Flower's FedAvg) and the global adapter's digest (strategies/checked.py); both
# are echoed back in the reply.
_ECHOED = ("server-round", "global-hash")
# Keys an algorithm adds to the train config for the site's local objective, not part of
# the job either: Flower's FedProx sends its "proximal-mu" (fedretrain/training/dp.py).
LOCAL_OBJECTIVE = ("proximal-mu",)


def answer(site: SiteConfig, message_type: str, content: RecordDict) -> RecordDict:
    """The site's reply to a message of ``message_type`` with ``content``.

    The reply echoes the instruction's round and global adapter digest, so the
    coordinator can tell a reply to this round from a stale or replayed one.
    """
    try:
        core = CORES[message_type]
    except KeyError:
        raise errors.ConfigError(f"message type {message_type!r}: this site answers {', '.join(CORES)}") from None
    config = dict(content.config_records["config"])
    echo = {key: config.pop(key) for key in _ECHOED if key in config}
    for key in LOCAL_OBJECTIVE:
        config.pop(key, None)
    server_round = echo.get("server-round", 0)
    if not isinstance(server_round, int) or isinstance(server_round, bool) or server_round < 0:
        raise errors.ConfigError(f"server-round: a round number, got {server_round!r}")
    reply = core(site, Job.from_flat(config), server_round, content)
    reply["site"] = ConfigRecord({"site-id": site.site_id, **echo})
    return reply


def refusal(message_type: str, err: Exception) -> tuple[int, str]:
    """The error reply's code and reason for ``err`` (logged here, with paths; the reason has none).

    The reason does not name the site: the coordinator names it by the node whose key
    it proved (server/sites/grid.py), not by what the site says.
    """
    if isinstance(err, errors.FedretrainError):
        log.warning("%s refused: %s", message_type, err)
        code = next((c for t, c in ERROR_CODES.items() if isinstance(err, t)), UNEXPECTED_ERROR)
    else:
        log.error("%s failed", message_type, exc_info=err)
        code = UNEXPECTED_ERROR
    return code, without_paths(f"{type(err).__name__}: {err}")


def _train(site: SiteConfig, job: Job, server_round: int, content: RecordDict) -> RecordDict:
    if site.require_secure_aggregation and SECURE_STAGE not in content.config_records:
        # The site's own mod marks a train message it answers inside the protocol, and strips
        # the mark from any other, so a coordinator cannot claim it (client/secagg.py).
        raise errors.ConfigError(
            f"site {site.site_id!r} sends its updates only under secure aggregation "
            "(require-secure-aggregation=true); this train message is outside the protocol"
        )
    global_hash = content["config"].get("global-hash")
    mu = content["config"].get("proximal-mu", 0.0)
    if isinstance(mu, bool) or not isinstance(mu, int | float) or not 0 <= mu <= MAX_PROXIMAL_MU:
        raise errors.ConfigError(f"proximal-mu: a number in [0, {MAX_PROXIMAL_MU:g}], got {mu!r}")
    outcome = train_round(
        site,
        job,
        from_array_record(content.array_records["arrays"]),
        server_round,
        global_hash=str(global_hash) if global_hash else None,
        proximal_mu=float(mu),
    )
    return _reply(site, to_array_record(outcome.adapter), outcome.metrics)


def _evaluate(site: SiteConfig, job: Job, server_round: int, content: RecordDict) -> RecordDict:
    baseline = content.array_records.get("baseline")
    outcome = evaluate_round(
        site,
        job,
        from_array_record(content.array_records["arrays"]),
        None if baseline is None else from_array_record(baseline),
        server_round=server_round,
    )
    return _reply(site, None, outcome.metrics)


def _publish(site: SiteConfig, job: Job, server_round: int, content: RecordDict) -> RecordDict:
    # A signed version (and, for a rollback, the signed record) as bytes in "version".
    payload = dict(content["version"])
    outcome = receive_version(site, job, VersionBundle.from_mapping(payload), RollbackRecord.from_mapping(payload))
    metrics = dict(outcome.metrics)
    if site.model_variant == "student":  # the coordinator sends the version's student next (query.student)
        from client.install.model_store import ModelStore
        from client.install.student import wants_student

        metrics["wants-student"] = int(wants_student(site, ModelStore(site.model_store_path)))
    return _reply(site, None, metrics)


def _student(site: SiteConfig, job: Job, server_round: int, content: RecordDict) -> RecordDict:
    # The smaller model distilled from the version this site runs, for a site that chose it.
    from client.install.student import receive_student
    from fedretrain.registry.student import StudentBundle

    return _reply(site, None, receive_student(site, StudentBundle.from_mapping(dict(content["student"]))))


def _trial(site: SiteConfig, job: Job, server_round: int, content: RecordDict) -> RecordDict:
    # A pending version for this canary to run beside its installed one (client/install/trial.py).
    from client.install.trial import receive_trial

    bundle = VersionBundle.from_mapping(dict(content["version"]))
    metrics: dict[str, Any] = dict(receive_trial(site, job, bundle, dict(content["rollout"])))
    if site.replay_traffic and not metrics.get("already-on-trial"):  # a simulated canary's users
        from client.serve.replay import replay

        metrics.update(replay(site, Path(site.replay_traffic)))
    return _reply(site, None, metrics)


def _withdraw(site: SiteConfig, job: Job, server_round: int, content: RecordDict) -> RecordDict:
    # The coordinator's signed withdrawal of a version on trial: the rollback at the canaries.
    from client.install.trial import withdraw_trial

    return _reply(site, None, withdraw_trial(site, WithdrawalRecord.from_mapping(dict(content["withdrawal"]))))


def _canary(site: SiteConfig, job: Job, server_round: int, content: RecordDict) -> RecordDict:
    # The noised comparison of the version on trial with the installed one (client/serve/canary.py).
    from client.serve.canary import canary_report

    return _reply(site, None, canary_report(site, job))


def _status(site: SiteConfig, job: Job, server_round: int, content: RecordDict) -> RecordDict:
    # Noised counts (charged to the ledger), privacy totals, and drift scores only where the
    # site opted in: no record, token or identifier of a patient leaves in a status reply.
    monitor = build(MonitorConfig, dict(content["monitor"]), "monitor")
    return _reply(site, None, site_status(site, job, monitor, charge=True))


def _ready(site: SiteConfig, job: Job, server_round: int, content: RecordDict) -> RecordDict:
    # Data and budget checked, nothing spent: the coordinator trains only the sites that are
    # ready, and only those whose base model is its own (the identity of the site's files).
    reply = _reply(site, None, check_ready(site, job, server_round))
    reply["base-model"] = ConfigRecord({"sha256": base_identity(job)})
    return reply


# Flower's message types (client/app.py registers one function for each).
CORES: dict[str, Core] = {
    "train": _train,
    "evaluate": _evaluate,
    "query.publish": _publish,
    "query.student": _student,
    "query.status": _status,
    "query.ready": _ready,
    "query.trial": _trial,
    "query.withdraw": _withdraw,
    "query.canary": _canary,
}


def _reply(site: SiteConfig, arrays: ArrayRecord | None, metrics: dict[str, Any]) -> RecordDict:
    content = RecordDict({"metrics": MetricRecord(metrics), "site": ConfigRecord({"site-id": site.site_id})})
    if arrays is not None:
        content["arrays"] = arrays
    return content
