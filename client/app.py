"""The ClientApp: unpack the message, call the site's core, pack the reply.

A site's failure (bad data, budget spent, a malformed job) becomes an error reply with
its reason; the coordinator logs it and the round goes on without this site.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.install.installer import receive_version
from client.join import mark_clientapp
from client.round.site import evaluate_round, train_round
from client.status import site_status
from fedretrain import errors
from fedretrain.arrays import from_array_record, to_array_record
from fedretrain.config import Job, MonitorConfig, SiteConfig, build, site_config_from_node_config
from fedretrain.registry.bundle import RollbackRecord, VersionBundle

log = logging.getLogger("fedretrain.client")

# Error codes in error replies; the coordinator logs code and reason.
ERROR_CODES: dict[type[Exception], int] = {
    errors.DataValidationError: 4101,
    errors.PrivacyBudgetExceeded: 4102,
    errors.LedgerError: 4103,
    errors.ModelLoadError: 4104,
    errors.AdapterMismatchError: 4105,
    errors.ConfigError: 4106,
    errors.TrainingError: 4107,
    errors.VerificationError: 4108,
    errors.EvaluationRefused: 4109,
}
UNEXPECTED_ERROR = 4199

SiteResolver = Callable[[Context], SiteConfig]


def site_from_node_config(context: Context) -> SiteConfig:
    """Deployment: the site's settings are its SuperNode's ``--node-config``."""
    return site_config_from_node_config(context.node_config)


def make_client_app(resolve_site: SiteResolver = site_from_node_config, *, mark_process: bool = False) -> ClientApp:
    """A ClientApp whose site settings come from ``resolve_site`` (node_config by default).

    ``mark_process``: each message first marks its process as one that got its message
    (client/join.py ``mark_clientapp``), so the site's watchdog leaves it alone; the
    deployed app does, a simulation's virtual sites do not.
    """
    app = ClientApp()

    def handle(msg: Message, context: Context, core: Core) -> Message:
        return _handle(msg, context, resolve_site, core, mark_process=mark_process)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return handle(msg, context, _train)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return handle(msg, context, _evaluate)

    @app.query("publish")
    def publish(msg: Message, context: Context) -> Message:
        return handle(msg, context, _publish)

    @app.query("status")
    def status(msg: Message, context: Context) -> Message:
        return handle(msg, context, _status)

    return app


Core = Callable[[SiteConfig, Job, int, RecordDict], RecordDict]


def _handle(
    msg: Message, context: Context, resolve_site: SiteResolver, core: Core, *, mark_process: bool = False
) -> Message:
    """Unpack the site and the job, run ``core``, and answer with its reply or an error reply.

    The reply echoes the instruction's round and global adapter digest, so the
    coordinator can tell a reply to this round from a stale or replayed one.
    """

    def work() -> RecordDict:
        site, job, echo = _unpack(msg, context, resolve_site)
        if mark_process:
            mark_clientapp(site.state_path)
        reply = core(site, job, int(echo.get("server-round", 0)), msg.content)
        reply["site"] = ConfigRecord({"site-id": site.site_id, **echo})
        return reply

    return _guarded(msg, work)


def _train(site: SiteConfig, job: Job, server_round: int, content: RecordDict) -> RecordDict:
    global_hash = content["config"].get("global-hash")
    outcome = train_round(
        site,
        job,
        from_array_record(content.array_records["arrays"]),
        server_round,
        global_hash=str(global_hash) if global_hash else None,
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
    return _reply(site, None, outcome.metrics)


def _status(site: SiteConfig, job: Job, server_round: int, content: RecordDict) -> RecordDict:
    # Noised counts (charged to the ledger), privacy totals, and drift scores only where the
    # site opted in: no record, token or identifier of a patient leaves in a status reply.
    monitor = build(MonitorConfig, dict(content["monitor"]), "monitor")
    return _reply(site, None, site_status(site, job, monitor, charge=True))


# Keys of an instruction's config that are not part of the job: the round (added by
# Flower's FedAvg) and the global adapter's digest (strategies/fedavg_lora.py); both
# are echoed back in the reply.
_ECHOED = ("server-round", "global-hash")


def _unpack(msg: Message, context: Context, resolve_site: SiteResolver) -> tuple[SiteConfig, Job, dict]:
    site = resolve_site(context)
    config = dict(msg.content["config"])
    echo = {key: config.pop(key) for key in _ECHOED if key in config}
    return site, Job.from_flat(config), echo


def _reply(site: SiteConfig, arrays: ArrayRecord | None, metrics: dict[str, Any]) -> RecordDict:
    content = RecordDict({"metrics": MetricRecord(metrics), "site": ConfigRecord({"site-id": site.site_id})})
    if arrays is not None:
        content["arrays"] = arrays
    return content


# An absolute path tells the coordinator how the site's disks are laid out; the file's name
# is all it needs to say what failed. Not after a word, a dot, a colon or a slash, so
# ratios (120/80), relative paths and URLs stay as they are.
_ABSOLUTE_PATH = re.compile(r"(?<![\w.:/~])(?:/[^\s/'\"(),;]+)+/?")


def without_paths(reason: str) -> str:
    """``reason`` with every absolute path cut to its last part (``/srv/site/data/a.jsonl`` -> ``a.jsonl``)."""
    return _ABSOLUTE_PATH.sub(lambda m: m.group(0).rstrip("/").rsplit("/", 1)[-1] or "/", reason)


def _guarded(msg: Message, work: Callable[[], RecordDict]) -> Message:
    """``work``'s reply, or an error reply saying what failed (the site's own log keeps the paths).

    The reason does not name the site: the coordinator names it by the node whose key
    it proved (server/sites/grid.py), not by what the site says.
    """
    try:
        return Message(work(), reply_to=msg)
    except errors.FedretrainError as err:
        code = next((c for t, c in ERROR_CODES.items() if isinstance(err, t)), UNEXPECTED_ERROR)
        log.warning("%s refused: %s", msg.metadata.message_type, err)
        return Message(Error(code=code, reason=without_paths(f"{type(err).__name__}: {err}")), reply_to=msg)
    except Exception as err:  # noqa: BLE001 - the site must answer, not vanish, on a bug
        log.exception("%s failed", msg.metadata.message_type)
        return Message(Error(code=UNEXPECTED_ERROR, reason=without_paths(f"{type(err).__name__}: {err}")), reply_to=msg)


# `client.app:app` in pyproject.toml: the deployed ClientApp reads its site from node_config.
app = make_client_app(mark_process=True)
