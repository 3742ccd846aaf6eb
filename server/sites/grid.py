"""Views of Flower's Grid: limited to some nodes, and with every reply bound to its site.

Flower's strategies sample from ``grid.get_node_ids()``; a cycle that must leave some
sites out (their privacy budget cannot pay for it) hands the strategy a
:class:`SiteSubset`, so those sites are never sampled, rather than sampled and refused.

:class:`BoundGrid` is the grid every part of a cycle talks through: a reply counts for
the site the roster binds its node to (server/sites/roster.py), and only for that one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Collection, Iterable

from flwr.app import Error, Message
from flwr.serverapp import Grid
from flwr.supercore.run import Run

from server.sites.live import LiveFile
from server.sites.roster import Roster

log = logging.getLogger("fedretrain.server")

# Error codes of the replies BoundGrid refuses (a site's own codes are 41xx, client/app.py).
UNREGISTERED_NODE = 4201
CLAIMS_ANOTHER_SITE = 4202
NO_REPLY = 4203
# Flower's SuperLink writes the error reply for a node it lost from its own node id.
SUPERLINK_NODE_ID = 1  # written by the round loop for a site silent past the deadline (server/cycle/rounds.py)


def wait_for_nodes(grid: Grid, minimum: int, timeout_s: float, *, poll_s: float = 0.5) -> list[int]:
    """The connected node ids, once at least ``minimum`` are connected or ``timeout_s`` has passed.

    Flower's own ``sample_nodes`` waits for nodes without a deadline; a poll or a delivery
    must not hang on a site that never comes, nor run before the sites have connected.
    """
    deadline = time.monotonic() + timeout_s
    while len(nodes := sorted(grid.get_node_ids())) < minimum and time.monotonic() < deadline:
        time.sleep(poll_s)
    if len(nodes) < minimum:
        log.warning(
            "%d of the %d expected sites connected within %.0f s; going on with them", len(nodes), minimum, timeout_s
        )
    return nodes


class _GridView(Grid):
    """``grid``, every call passed through (subclasses change one)."""

    def __init__(self, grid: Grid) -> None:
        self._grid = grid

    def get_node_ids(self) -> Iterable[int]:
        return self._grid.get_node_ids()

    def site_of(self, node_id: int) -> str | None:
        """The site bound to ``node_id`` by a :class:`BoundGrid` below this view (None: none, or no roster)."""
        return self._grid.site_of(node_id) if isinstance(self._grid, _GridView) else None

    def set_run(self, run: Run) -> None:
        self._grid.set_run(run)

    @property
    def run(self) -> Run:
        return self._grid.run

    def create_message(self, *args, **kwargs) -> Message:
        return self._grid.create_message(*args, **kwargs)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self._grid.send_and_receive(messages, timeout=timeout)


# Flower's deployed grid (flwr/superlink/grid/http_grid.py) looks for replies every 3 s, so
# each exchange with the sites (a delivery, a training round, an evaluation, a publication:
# five or more a cycle) waited up to 3 s past its last reply, 1.5 s on average. One look is
# one request to the SuperLink, so the deployed ServerApp looks every half second. (The
# simulation's grid looks every 0.1 s already.)
REPLY_CHECK_S = 0.5


class PromptGrid(_GridView):
    """``grid`` whose ``send_and_receive`` is Flower's loop (push, then pull until every
    message is answered or ``timeout`` has passed), looking every ``check_s`` seconds;
    with ``live``, each exchange's progress goes to the run directory's live.json."""

    def __init__(self, grid: Grid, check_s: float = REPLY_CHECK_S, live: LiveFile | None = None) -> None:
        super().__init__(grid)
        self.check_s = check_s
        self.live = live

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        if self.live is not None:
            self.live.started(messages, timeout)
        replies: list[Message] = []
        try:
            waiting = set(self._grid.push_messages(messages))
            end = time.time() + (timeout if timeout is not None else 0.0)
            while timeout is None or time.time() < end:
                got = list(self._grid.pull_messages(waiting))
                replies.extend(got)
                waiting.difference_update(reply.metadata.reply_to_message_id for reply in got)
                if got and self.live is not None:
                    self.live.replied(replies)
                if not waiting:
                    break
                time.sleep(self.check_s)
        finally:  # a SuperLink gone away ends the exchange in live.json too
            if self.live is not None:
                self.live.finished(replies)
        return replies


class SiteSubset(_GridView):
    """``grid`` with ``get_node_ids`` limited to ``node_ids`` (those still connected)."""

    def __init__(self, grid: Grid, node_ids: Collection[int]) -> None:
        super().__init__(grid)
        self._allowed = frozenset(node_ids)

    def get_node_ids(self) -> Iterable[int]:
        return [node for node in self._grid.get_node_ids() if node in self._allowed]


class BoundGrid(_GridView):
    """``grid`` whose replies count only for the site their node is bound to.

    Each reply is matched to the instruction it answers (``reply_to_message_id``): the
    node is the one that instruction was addressed to, which the SuperLink checked
    against the key the node proved. Then

    - a node no site is registered as gets an error reply in place of its answer;
    - a reply naming another site than its node's ("site-id") is refused, and the log
      names both: the node holding site B's key cannot speak for site A;
    - an error reply, the site's own or the one Flower's SuperLink writes for a node it
      lost, is re-issued from that node with its site named;

    Refusals are error replies, so strategies and broadcasts count and record them as
    they do any other failed site.
    """

    def __init__(self, grid: Grid, roster: Roster) -> None:
        super().__init__(grid)
        self.roster = roster

    def site_of(self, node_id: int) -> str | None:
        """The site bound to ``node_id`` (None: unregistered)."""
        return self.roster.site_of(node_id)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        sent = {msg.metadata.message_id: msg for msg in messages}
        bound = []
        for reply in replies:
            instruction = sent.pop(reply.metadata.reply_to_message_id, None)
            if instruction is None:  # Flower's grids return only replies to what was sent; never counted
                log.warning(
                    "a reply from node %d answers no message of this exchange: dropped", reply.metadata.src_node_id
                )
                continue
            bound.append(self._bind(reply, instruction))
        return bound

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        # A pulled reply has no instruction at hand to bind it by: replies come through
        # send_and_receive (Flower's strategies and fedretrain use nothing else).
        raise TypeError(
            "BoundGrid binds replies to their sites only in send_and_receive; pull_messages would bypass that"
        )

    def _bind(self, reply: Message, instruction: Message) -> Message:
        node = instruction.metadata.dst_node_id
        site = self.site_of(node)
        if site is None:
            return _refused(
                instruction, UNREGISTERED_NODE, f"node {node} is not registered as any site: its reply is not counted"
            )
        if reply.metadata.src_node_id not in (node, SUPERLINK_NODE_ID):  # Flower's SuperLink refuses these already
            return _refused(
                instruction,
                CLAIMS_ANOTHER_SITE,
                f"a reply to site {site} (node {node}) came from node {reply.metadata.src_node_id}: not counted",
            )
        if reply.has_error():
            return Message(
                Error(code=reply.error.code, reason=f"site {site} (node {node}): {reply.error.reason}"),
                reply_to=instruction,
            )
        claimed = _claimed_site(reply)
        if claimed is not None and claimed != site:
            return _refused(
                instruction,
                CLAIMS_ANOTHER_SITE,
                f"node {node} holds site {site}'s key but its reply claims site {claimed}: not counted for either",
            )
        return reply


def bound_site(grid: Grid, node_id: int) -> str | None:
    """The site ``grid`` binds ``node_id`` to; None where it binds none (no roster, or unregistered)."""
    return grid.site_of(node_id) if isinstance(grid, _GridView) else None


def node_name(grid: Grid, node_id: int) -> str:
    """Name a node for a log line: "site S (node N)" where ``grid`` binds the node to a site, else "node N"."""
    site = bound_site(grid, node_id)
    return f"node {node_id}" if site is None else f"site {site} (node {node_id})"


def _refused(instruction: Message, code: int, reason: str) -> Message:
    """An error reply to ``instruction`` from its addressee, logged."""
    log.warning("%s reply refused: %s", instruction.metadata.message_type, reason)
    return Message(Error(code=code, reason=reason), reply_to=instruction)


def _claimed_site(reply: Message) -> str | None:
    site = reply.content.config_records.get("site")
    value = None if site is None else site.get("site-id")
    return None if value is None else str(value)
