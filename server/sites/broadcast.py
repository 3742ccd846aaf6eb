"""Send one message to every connected site and sort the replies: answered, refused, silent.

Publishing a version and polling the sites' status both go to all sites at once and
wait up to a timeout. A site's error reply or a malformed reply is a refusal with its
reason, never a crash; a site that does not answer in time is listed, not forgotten.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from server.sites.grid import bound_site, node_name, wait_for_nodes

log = logging.getLogger("fedretrain.server")

T = TypeVar("T")


@dataclass
class Broadcast(Generic[T]):
    """What came back: ``answered`` site id -> (node id, parsed reply); refusals with reasons; silent nodes.

    A refusal is ``{"node_id", "site_id", "reason"}``, its site the one the grid binds
    the node to (None without a roster).
    """

    answered: dict[str, tuple[int, T]] = field(default_factory=dict)
    refused: list[dict[str, Any]] = field(default_factory=list)
    no_reply: list[int] = field(default_factory=list)


def broadcast(
    grid: Grid,
    content: RecordDict,
    message_type: str,
    timeout_s: float,
    parse: Callable[[str, int, RecordDict], T],
    *,
    what: str,
    node_ids: Iterable[int] | None = None,
    min_nodes: int = 0,
) -> Broadcast[T]:
    """Send ``content`` to ``node_ids`` (default: every connected node) and parse each reply.

    Without ``node_ids`` it first waits, up to ``timeout_s``, for ``min_nodes`` nodes to
    connect (sites still starting up would otherwise miss the message).

    ``parse(site_id, node_id, content)`` turns a reply into a value; a ``KeyError``,
    ``TypeError`` or ``ValueError`` from it makes that reply a refusal. ``what`` names
    the exchange in log lines ("version 3", "status").
    """
    nodes = wait_for_nodes(grid, min_nodes, timeout_s) if node_ids is None else sorted(node_ids)
    messages = [Message(content=content, dst_node_id=node, message_type=message_type) for node in nodes]
    replies = list(grid.send_and_receive(messages, timeout=timeout_s))
    outcome: Broadcast[T] = Broadcast()
    answered: set[int] = set()
    claimed: dict[str, list[int]] = {}
    for reply in replies:
        node = reply.metadata.src_node_id
        answered.add(node)
        try:
            if reply.has_error():
                raise ValueError(f"code {reply.error.code}: {reply.error.reason}")
            site = str(reply.content["site"]["site-id"])
            claimed.setdefault(site, []).append(node)
            outcome.answered[site] = (node, parse(site, node, reply.content))
        except (KeyError, TypeError, ValueError) as err:
            reason = str(err) if reply.has_error() else f"malformed reply ({type(err).__name__}: {err})"
            log.warning("%s: %s refused: %s", what, node_name(grid, node), reason)
            code = int(reply.error.code) if reply.has_error() else None
            outcome.refused.append({"node_id": node, "site_id": bound_site(grid, node), "reason": reason, "code": code})
    for site, claimants in claimed.items():
        if len(claimants) > 1:  # two nodes speaking for one site: neither is trusted
            outcome.answered.pop(site, None)
            for node in claimants:
                reason = f"site {site!r} answered from {len(claimants)} nodes ({', '.join(map(str, claimants))})"
                log.warning("%s: %s refused: %s", what, node_name(grid, node), reason)
                outcome.refused.append({"node_id": node, "site_id": bound_site(grid, node), "reason": reason})
    outcome.no_reply = [n for n in nodes if n not in answered]
    for node in outcome.no_reply:
        log.warning("%s: %s did not answer within %.0f s", what, node_name(grid, node), timeout_s)
    return outcome
