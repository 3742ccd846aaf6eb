"""``<run_dir>/live.json``: the exchange with the sites under way, for the dashboard's Cycle page.

The round loop blocks in the grid while the sites compute, so nothing else in the run
directory moves until a round ends. :class:`~server.sites.grid.PromptGrid` writes here at the
start of each exchange (which message, which round, how many replies it waits for, until
when), as replies come in, and at its end, when it adds the exchange's seconds to a short
history: the dashboard splits each round's time into the sites' part (the exchanges) and
the coordinator's (the rest: aggregation, scoring, checkpoints).

Counts only: which node replied is the round log's business once the round closes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from flwr.app import Message

from fedretrain.atomic import atomic_write_json

log = logging.getLogger("fedretrain.server")

LIVE_NAME = "live.json"
HISTORY = 400  # exchanges kept: a cycle has a few per round


class LiveFile:
    """The exchange under way and the recent ones, rewritten atomically as they move."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.history: list[dict[str, Any]] = []
        self.current: dict[str, Any] | None = None

    def started(self, messages: Sequence[Message], timeout: float | None) -> None:
        first = messages[0].metadata if messages else None
        now = time.time()
        self.current = {
            "exchange": None if first is None else first.message_type,
            "round": _round(None if first is None else first.group_id),
            "sent_at": now,
            "deadline_at": None if timeout is None else now + timeout,
            "expected": len(messages),
            "replied": 0,
            "errors": 0,
        }
        self._write()

    def replied(self, replies: Sequence[Message]) -> None:
        if self.current is None:
            return
        errors = sum(1 for reply in replies if reply.has_error())
        if (len(replies), errors) != (self.current["replied"], self.current["errors"]):
            self.current.update(replied=len(replies), errors=errors)
            self._write()

    def finished(self, replies: Sequence[Message]) -> None:
        if self.current is None:
            return
        done = {**self.current, "replied": len(replies), "errors": sum(1 for r in replies if r.has_error())}
        done["seconds"] = round(time.time() - done["sent_at"], 3)
        self.history = [*self.history, done][-HISTORY:]
        self.current = None
        self._write()

    def _write(self) -> None:
        # A full disk or a removed run directory must not stop the cycle: the dashboard then
        # shows the rounds as metrics.jsonl has them, without the exchange under way.
        try:
            if not self.path.parent.is_dir():
                raise FileNotFoundError(f"{self.path.parent}: the run directory is gone")
            atomic_write_json(self.path, {"current": self.current, "history": self.history, "written_at": time.time()})
        except Exception as err:  # noqa: BLE001 - nothing here may stop the cycle
            log.warning("could not write %s: %s", self.path, err)


def _round(group_id: str | None) -> int | None:
    # The round loop and Flower's strategies put the server round in each message's group_id.
    return int(group_id) if group_id and group_id.isdigit() else None
