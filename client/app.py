"""The ClientApp: the site's answer to each message Flower hands it.

In a simulation the answer is computed here, in the Ray actor that hosts the virtual
site (client/handlers.py). A deployed site's SuperNode starts a new ClientApp process for
every message; there the ClientApp forwards the message to the site's worker, the
long-lived process ``site join`` runs beside the SuperNode with the model and libraries
loaded (client/worker.py), and answers with what the worker says. This module imports
neither torch nor the site's training code, so a forwarding process starts in about a
second. While ``site join`` runs and its worker is starting, the answer is an error reply
(code 4110): the site's own install answers, or nothing does. Without ``site join`` (a
SuperNode started by hand), the ClientApp computes the answer itself, as in a simulation,
paying the imports and the model load for every message.

A site's failure (bad data, budget spent, a malformed job) becomes an error reply with
its reason; the coordinator logs it and the round goes on without this site.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod

from client.join import join_running, mark_clientapp
from client.reasons import without_paths
from client.worker import WorkerAddress, WorkerUnavailable, ask
from fedretrain.config import SiteConfig, site_config_from_node_config

log = logging.getLogger("fedretrain.client")

# An error reply's code when the site's worker did not answer (client/handlers.py has the others).
WORKER_UNAVAILABLE = 4110

SiteResolver = Callable[[Context], SiteConfig]


def site_from_node_config(context: Context) -> SiteConfig:
    """Deployment: the site's settings are its SuperNode's ``--node-config``."""
    return site_config_from_node_config(context.node_config)


def make_client_app(
    resolve_site: SiteResolver = site_from_node_config,
    *,
    mark_process: bool = False,
    use_worker: bool = False,
    mods: list[Mod] | None = None,
) -> ClientApp:
    """A ClientApp whose site settings come from ``resolve_site`` (node_config by default).

    ``mark_process``: each message first marks its process as one that got its message
    (client/join.py ``mark_clientapp``), so the site's watchdog leaves it alone.
    ``use_worker``: forward each message to the site's worker when one runs. The deployed
    app does both; a simulation's virtual sites do neither. ``mods``: Flower client mods
    around every message (a simulation's attackers, simulation/attacks.py), inside the
    secure-aggregation mod (client/secagg.py), which masks what they return.
    """
    from client.secagg import secure_aggregation_mod

    app = ClientApp(mods=[secure_aggregation_mod, *(mods or [])])

    def handle(msg: Message, context: Context) -> Message:
        return _handle(msg, context, resolve_site, mark_process=mark_process, use_worker=use_worker)

    app.train()(handle)
    app.evaluate()(handle)
    # The queries a site answers: a published version and its student, its status, whether it is
    # ready, and the staged rollout's trial, withdrawal and report (server/cycle/rollout.py).
    for action in ("publish", "student", "status", "ready", "trial", "withdraw", "canary"):
        app.query(action)(handle)

    return app


def _handle(
    msg: Message, context: Context, resolve_site: SiteResolver, *, mark_process: bool, use_worker: bool
) -> Message:
    """The reply to ``msg``: the site's answer, or an error reply saying what failed."""
    message_type = msg.metadata.message_type
    try:
        site = resolve_site(context)
        if mark_process:
            mark_clientapp(site.state_path)
        worker = WorkerAddress.read(site.state_path) if use_worker else None
        if worker is not None:
            answer = ask(worker, message_type, msg.content)
        elif use_worker and join_running(site):
            # `site join` runs and its worker is (re)starting: the site's own code answers, or none.
            raise WorkerUnavailable("the site worker is starting")
        else:
            if use_worker:
                log.warning("no site worker runs for %s: answering %s in this process", site.site_id, message_type)
            answer = _answer_here(site, message_type, msg.content)
    except WorkerUnavailable as err:
        log.error("%s; site join starts a new one", err)
        answer = (WORKER_UNAVAILABLE, "the site's worker did not answer (the site restarts it)")
    except Exception as err:  # noqa: BLE001 - the site must answer, not vanish, on a bug
        from client.handlers import refusal

        answer = refusal(message_type, err)
    if isinstance(answer, RecordDict):
        return Message(answer, reply_to=msg)
    code, reason = answer
    return Message(Error(code=code, reason=without_paths(reason)), reply_to=msg)


def _answer_here(site: SiteConfig, message_type: str, content: RecordDict) -> RecordDict | tuple[int, str]:
    from client.handlers import answer, refusal

    try:
        return answer(site, message_type, content)
    except Exception as err:  # noqa: BLE001 - the site must answer, not vanish, on a bug
        return refusal(message_type, err)


# `client.app:app` in pyproject.toml: the deployed ClientApp reads its site from node_config
# and hands each message to the site's worker.
app = make_client_app(mark_process=True, use_worker=True)
