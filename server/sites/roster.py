"""Which site each node is: bound by the runtime, never by what a reply says.

A reply's ``"site-id"`` is written by the site's own code, so it proves nothing. What
the coordinator can trust is the node a reply comes from:

- **deployed**, the SuperLink admits a SuperNode only as the node id registered for
  the public key it proves (Flower's node-auth interceptor compares the request's node
  id with ``get_node_id_by_public_key``), and stores a reply only from the node its
  instruction was addressed to. ``coordinator register`` keeps site id -> node id in
  ``<coord>/sites.json`` (the node id ``flwr supernode register`` returned for that
  site's key), so that file, written by the coordinator, is the roster;
- **simulated**, Flower's simulation engine gives each virtual node a random id and a
  ``partition-id`` in its node config; the federation's site resolver (the simulation's
  runtime part, not a site's code) records ``<roster dir>/<node id>`` -> site id the
  first time it serves a node, before that node's first reply.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path

from fedretrain.atomic import atomic_write_text
from fedretrain.errors import DeployError

log = logging.getLogger("fedretrain.server")


class Roster:
    """node id -> site id, as the runtime bound them.

    Parameters
    ----------
    nodes : Mapping[int, str]
        The bindings known now.
    directory : Path | None (default: None)
        A simulation's roster directory (one file per node, named by its id, holding
        the site id); re-read when asked for a node not known yet.
    """

    def __init__(self, nodes: Mapping[int, str] | None = None, directory: Path | None = None) -> None:
        self._nodes = dict(nodes or {})
        self._directory = None if directory is None else Path(directory)
        self._check_unique()

    @classmethod
    def from_sites_file(cls, path: Path) -> Roster:
        """The roster of a deployment: ``<coord>/sites.json`` (site id -> ``node_id``, ``public_key``)."""
        path = Path(path)
        try:
            sites = json.loads(path.read_text())
            pairs = [(int(info["node_id"]), str(site)) for site, info in sites.items()]
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as err:
            raise DeployError(f"{path}: cannot read the registered sites ({type(err).__name__}: {err})") from None
        nodes: dict[int, str] = {}
        for node, site in pairs:
            if node in nodes:
                raise DeployError(f"{path}: node {node} is registered as two sites ({nodes[node]} and {site})")
            nodes[node] = site
        return cls(nodes)

    @classmethod
    def from_directory(cls, directory: Path) -> Roster:
        """The roster a simulation's site resolver writes (see :func:`record_node`)."""
        roster = cls(directory=directory)
        roster._reload()
        return roster

    def __len__(self) -> int:
        return len(self._nodes)

    @property
    def is_directory(self) -> bool:
        """Whether bindings are still being recorded (a simulation's roster directory)."""
        return self._directory is not None

    def site_of(self, node_id: int) -> str | None:
        """The site bound to ``node_id``; None for a node no site is registered as."""
        if node_id not in self._nodes and self._directory is not None:
            self._reload()
        return self._nodes.get(node_id)

    def node_of(self, site_id: str) -> int | None:
        """The node bound to ``site_id``; None if it has none (yet)."""
        return next((node for node, site in self._nodes.items() if site == site_id), None)

    def _reload(self) -> None:
        if self._directory is not None and self._directory.is_dir():
            for path in self._directory.iterdir():
                if path.name.isdigit():
                    self._nodes[int(path.name)] = path.read_text().strip()
        self._check_unique()

    def _check_unique(self) -> None:
        seen: dict[str, int] = {}
        for node, site in self._nodes.items():
            if site in seen:
                raise DeployError(
                    f"site {site} is bound to two nodes ({seen[site]} and {node}): the roster is "
                    "inconsistent; re-register the site's key"
                )
            seen[site] = node


def record_node(directory: Path, node_id: int, site_id: str) -> None:
    """Bind ``node_id`` to ``site_id`` in a simulation's roster directory (once; a change is refused)."""
    path = Path(directory) / str(int(node_id))
    if path.exists():
        bound = path.read_text().strip()
        if bound != site_id:
            raise DeployError(f"{path}: node {node_id} is bound to site {bound}, not {site_id}")
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, site_id + "\n")
