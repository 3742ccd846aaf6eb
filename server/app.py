"""The ServerApp: parse the run's config once, then hand the Grid to the retraining driver.

Deployed (``flwr run``), the run_config (``experiment``, ``overrides``) is mapped onto
Hydra overrides. In simulation, ``run_simulation()`` hands the ServerApp an empty
run_config, so ``simulation/`` builds its ServerApp with ``make_server_app`` and the
config it already parsed.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedretrain.atomic import atomic_write_json
from fedretrain.config import Config, Job, compose_raw, overrides_from_run_config, to_yaml
from fedretrain.config.parse import build
from fedretrain.errors import ConfigError, ResumeError
from server.cycle.rundir import cycle_lock, new_run_dir
from server.sites.grid import BoundGrid, PromptGrid
from server.sites.live import LIVE_NAME, LiveFile
from server.sites.roster import Roster
from server.watch.poll import poll_status

log = logging.getLogger("fedretrain.server")
SIMULATION_CHECK_S = 0.1


def make_server_app(
    cfg: Config, run_dir: Path, config_yaml: str, validation_path: str | None = None, roster: Roster | None = None
) -> ServerApp:
    """A ServerApp bound to an already parsed config (simulation and tests).

    ``roster`` binds the nodes to their sites (a simulation's roster directory); without
    one, replies count for the site they name.
    """
    from server.cycle.run import run_retraining

    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        # Flower's simulation grid looks for replies every 0.1 s too; this loop also keeps live.json.
        grid = PromptGrid(grid, check_s=SIMULATION_CHECK_S, live=LiveFile(run_dir / LIVE_NAME))
        run_retraining(bind_sites(grid, roster), cfg, run_dir, config_yaml=config_yaml, validation_path=validation_path)

    return app


def bind_sites(grid: Grid, roster: Roster | None) -> Grid:
    """``grid`` whose replies count only for the site the roster binds their node to.

    An empty or missing roster (an insecure test bench registers no keys) leaves the
    replies unbound, and says so.
    """
    if roster is None or (len(roster) == 0 and not roster.is_directory):
        log.warning(
            "no registered sites: site identities are not bound to node keys, and a reply counts for the site it names"
        )
        return grid
    return BoundGrid(grid, roster)


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Deployment entry (``server.app:app``): the config comes from run_config.

    ``run-dir`` names the run directory (``fedretrain coordinator run`` creates it);
    with ``resume`` the cycle in it goes on from its last complete round, under the
    config it was started with (its ``config.yaml``). ``sites-file`` names the
    coordinator's ``sites.json``: a reply counts only for the site whose registered key
    its node proved (server/sites/roster.py).
    """
    sites_file = str(context.run_config.get("sites-file", "") or "").strip()
    roster = Roster.from_sites_file(Path(sites_file)) if sites_file else None
    grid = PromptGrid(grid)  # replies looked for every 0.5 s, not Flower's 3 s (server/sites/grid.py)
    mode = str(context.run_config.get("mode", "cycle") or "cycle")
    if mode == "poll":
        _poll(bind_sites(grid, roster), context)
        return
    if mode != "cycle":
        raise ConfigError(f"run_config: mode {mode!r} is neither 'cycle' nor 'poll'")
    # Imported here, not at the top: a status poll (the standing watch's, every
    # poll_interval_s) needs no torch, and the cycle's imports cost ~7 s a run.
    from server.cycle.run import run_retraining

    given = str(context.run_config.get("run-dir", "") or "").strip()
    resume = bool(context.run_config.get("resume", False))
    if resume and not given:
        raise ResumeError("run_config: resume needs run-dir, the run directory to resume")
    raw = load_run_config(Path(given)) if resume else compose_raw(overrides_from_run_config(context.run_config))
    cfg = build(Config, raw)
    run_dir = Path(given) if given else new_run_dir(Path(cfg.output_dir), cfg.name)
    with run_log(run_dir), cycle_lock(run_dir):
        log.info("run directory: %s", run_dir)
        grid.live = LiveFile(run_dir / LIVE_NAME)  # the exchange under way, for the dashboard
        run_retraining(
            bind_sites(grid, roster),
            cfg,
            run_dir,
            config_yaml=to_yaml(raw),
            resume=resume,
            train_nodes=_node_ids(context.run_config.get("train-nodes", "")),
        )


def _node_ids(value: object) -> list[int] | None:
    """``train-nodes`` ("1 2 3"): those node ids; empty: None (every connected site)."""
    text = str(value or "").strip()
    if not text:
        return None
    try:
        return [int(n) for n in text.split()]
    except ValueError:
        raise ConfigError(f"run_config: train-nodes {text!r} is not a list of node ids") from None


def _poll(grid: Grid, context: Context) -> None:
    """Poll mode: every site's status, written to ``poll-file`` for the standing watch."""
    target = str(context.run_config.get("poll-file", "") or "").strip()
    if not target:
        raise ConfigError("run_config: mode 'poll' needs poll-file, where the replies go")
    cfg = build(Config, compose_raw(overrides_from_run_config(context.run_config)))
    job = Job.from_config(cfg, run_id=f"status-{context.run_id}")
    poll = poll_status(grid, job, cfg.monitor, min_nodes=cfg.strategy.min_sites)
    atomic_write_json(Path(target), poll.to_dict())


@contextmanager
def run_log(run_dir: Path) -> Iterator[Path]:
    """While the cycle runs, fedretrain's and Flower's log lines also go to ``<run_dir>/run.log``.

    Deployed, the ServerApp runs in a process Flower starts, whose console no operator
    reads; the run directory keeps what it logged (refusals, silent sites, the gate).
    Appended to, so a resumed cycle's lines follow the first attempt's.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "run.log"
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.INFO)
    ours = logging.getLogger("fedretrain")
    level = ours.level
    if ours.getEffectiveLevel() > logging.INFO:
        ours.setLevel(logging.INFO)
    loggers = (ours, logging.getLogger("flwr"))
    for logger in loggers:
        logger.addHandler(handler)
    try:
        yield path
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
        ours.setLevel(level)
        handler.close()


def load_run_config(run_dir: Path) -> dict:
    """The composed config a run was started with (``<run>/config.yaml``)."""
    import yaml

    path = Path(run_dir) / "config.yaml"
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ResumeError(f"{path}: cannot read the run's config ({err})") from None
    if not isinstance(raw, dict):
        raise ResumeError(f"{path}: not a config mapping")
    return raw
