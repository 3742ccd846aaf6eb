"""The coordinator's status poll: one ``query.status`` message to every site, scalars back.

Each site answers with counts and scores computed on its own premises (client/status.py):
new records, drift, the published model's loss on new data, its privacy totals. The
reply is parsed into a ``SiteStatus``; a malformed or refused reply is listed with its
reason and the poll goes on without that site.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from flwr.app import ConfigRecord, RecordDict
from flwr.serverapp import Grid

from fedretrain.config import Job, MonitorConfig
from server.sites.broadcast import broadcast
from server.watch.triggers import SiteStatus

STATUS_MESSAGE = "query.status"


@dataclass(frozen=True)
class StatusPoll:
    statuses: tuple[SiteStatus, ...]
    refused: tuple[dict[str, Any], ...]
    no_reply: tuple[int, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "sites": {s.site_id: dataclasses.asdict(s) for s in self.statuses},
            "refused": list(self.refused),
            "no_reply": list(self.no_reply),
        }

    @classmethod
    def from_dict(cls, raw: Any) -> StatusPoll:
        """The poll :meth:`to_dict` wrote (a deployed poll run's file). ValueError names what is wrong."""
        try:
            # Each status checked again, as a site's reply is (SiteStatus.from_metrics).
            statuses = tuple(
                SiteStatus.from_metrics(
                    str(values["site_id"]),
                    int(values["node_id"]),
                    {
                        key.replace("_", "-"): value
                        for key, value in values.items()
                        if key not in ("site_id", "node_id") and value is not None
                    },
                )
                for values in raw["sites"].values()
            )
            no_reply = tuple(int(n) for n in raw["no_reply"])
            return cls(statuses=statuses, refused=tuple(raw["refused"]), no_reply=no_reply)
        except (KeyError, TypeError, AttributeError, ValueError) as err:
            raise ValueError(f"not a status poll ({type(err).__name__}: {err})") from None


def poll_status(
    grid: Grid, job: Job, monitor: MonitorConfig, node_ids: Iterable[int] | None = None, *, min_nodes: int = 0
) -> StatusPoll:
    """Ask every connected site (or ``node_ids``) for its status; wait ``monitor.status_timeout_s``.

    ``min_nodes``: sites expected to be connected; the poll waits for them, up to the timeout.
    """
    content = RecordDict({"config": ConfigRecord(job.to_flat()), "monitor": ConfigRecord(dataclasses.asdict(monitor))})
    sent = broadcast(
        grid,
        content,
        STATUS_MESSAGE,
        monitor.status_timeout_s,
        lambda site, node, reply: SiteStatus.from_metrics(site, node, dict(reply["metrics"])),
        what="status",
        node_ids=node_ids,
        min_nodes=min_nodes,
    )
    statuses = tuple(status for _, (_, status) in sorted(sent.answered.items()))
    return StatusPoll(statuses=statuses, refused=tuple(sent.refused), no_reply=tuple(sent.no_reply))
