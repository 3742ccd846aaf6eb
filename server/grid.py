"""A view of Flower's Grid limited to some of its nodes.

Flower's strategies sample from ``grid.get_node_ids()``; a cycle that must leave some
sites out (their privacy budget cannot pay for it) hands the strategy this view, so
those sites are never sampled, rather than sampled and refused.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Collection, Iterable

from flwr.app import Message
from flwr.supercore.run import Run
from flwr.serverapp import Grid


log = logging.getLogger("fedretrain.server")


def wait_for_nodes(grid: Grid, minimum: int, timeout_s: float, *, poll_s: float = 0.5) -> list[int]:
    """The connected node ids, once at least ``minimum`` are connected or ``timeout_s`` has passed.

    Flower's own ``sample_nodes`` waits for nodes without a deadline; a poll or a delivery
    must not hang on a site that never comes, nor run before the sites have connected.
    """
    deadline = time.monotonic() + timeout_s
    while len(nodes := sorted(grid.get_node_ids())) < minimum and time.monotonic() < deadline:
        time.sleep(poll_s)
    if len(nodes) < minimum:
        log.warning("%d of the %d expected sites connected within %.0f s; going on with them",
                    len(nodes), minimum, timeout_s)
    return nodes


class SiteSubset(Grid):
    """``grid`` with ``get_node_ids`` limited to ``node_ids`` (those still connected)."""

    def __init__(self, grid: Grid, node_ids: Collection[int]) -> None:
        self._grid = grid
        self._allowed = frozenset(node_ids)

    def get_node_ids(self) -> Iterable[int]:
        return [node for node in self._grid.get_node_ids() if node in self._allowed]

    def set_run(self, run: Run) -> None:
        self._grid.set_run(run)

    @property
    def run(self) -> Run:
        return self._grid.run

    def create_message(self, *args, **kwargs) -> Message:  # type: ignore[override]
        return self._grid.create_message(*args, **kwargs)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self._grid.send_and_receive(messages, timeout=timeout)
