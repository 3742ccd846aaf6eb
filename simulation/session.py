"""One simulated session on Flower's simulation engine (Ray backend): a cycle, the drift
scenario or the watch, for a config already composed and checked.

The ServerApp and the ClientApp are the real ones (server/, client/); only the sites
are virtual: each is a directory written by ``simulation.federation``. The entry points
(``simulation.runner``) start Ray while this module and its libraries import.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from flwr.simulation import run_simulation

from client.app import make_client_app
from fedretrain.config import Config, flatten, to_yaml, unflatten
from fedretrain.data.notes import read_records
from fedretrain.errors import ConfigError, SimulationFailed
from fedretrain.modeling.loading import resolve_model_path
from server.app import bind_sites, make_server_app
from server.cycle.rundir import new_run_dir
from server.sites.roster import Roster
from server.watch.loop import Watcher, write_watch_summary
from simulation.attacks import attack_mod, attacker_ids, write_attack_report
from simulation.federation import Federation, FederationSites, build_federation

log = logging.getLogger("fedretrain.simulation")


def simulate(cfg: Config, *, verbose: bool = False) -> Path:
    """Generate the federation, run one retraining cycle (or with ``scenario=drift``
    simulated time with drift, simulation/scenario.py); return the run directory."""
    if cfg.scenario.name == "drift" and cfg.simulation.sites_dir:
        raise ConfigError(
            "scenario=drift writes the notes that arrive at its sites; it does not run on simulation.sites_dir"
        )
    traffic = cfg.simulation.traffic
    if cfg.publish.staged and not traffic.requests:
        raise ConfigError(
            "publish.canary: a simulated canary reports on its users' traffic; set simulation.traffic.requests "
            f"(at least publish.min_feedback={cfg.publish.min_feedback})"
        )
    if traffic.general_from_step is not None and cfg.scenario.name != "drift":
        raise ConfigError("simulation.traffic.general_from_step: a scenario step; it needs scenario=drift")
    run = _prepare(cfg)
    if run.cfg.scenario.name == "drift":
        from simulation.scenario import run_drift_scenario

        server_app = ServerApp()

        @server_app.main()
        def main(grid: Grid, context: Context) -> None:
            run_drift_scenario(bind_sites(grid, run.roster), run.cfg, run.run_dir, run.config_yaml, run.fed)
    else:
        server_app = make_server_app(run.cfg, run.run_dir, run.config_yaml, str(run.fed.validation_path), run.roster)
    return _run(run, server_app, verbose)


def watch(cfg: Config, *, verbose: bool = False) -> Path:
    """``fedretrain coordinator watch`` over the standing sites of ``cfg``: poll, trigger,
    retrain, until ``trigger.max_polls`` polls or an interrupt; return the run directory."""
    run = _prepare(cfg, name_suffix="watch")
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        watcher = Watcher(
            bind_sites(grid, run.roster),
            run.cfg,
            run.run_dir / "cycles",
            run.config_yaml,
            str(run.fed.validation_path),
            expected_sites=len(run.fed.sites),
        )
        events = watcher.run(max_polls=run.cfg.trigger.max_polls)
        write_watch_summary(run.run_dir, events)

    return _run(run, server_app, verbose)


@dataclass(frozen=True)
class _Prepared:
    cfg: Config
    run_dir: Path
    fed: Federation
    config_yaml: str

    @property
    def roster_dir(self) -> Path:
        """Where the site resolver binds this run's virtual nodes to their sites."""
        return self.run_dir / "roster"

    @property
    def roster(self) -> Roster:
        return Roster.from_directory(self.roster_dir)


def _prepare(cfg: Config, name_suffix: str = "") -> _Prepared:
    """Make the run directory and the federation; the config names the coordinator's registry."""
    run_dir = new_run_dir(Path(cfg.output_dir), f"{cfg.name}-{name_suffix}" if name_suffix else cfg.name)
    fed_root = Path(cfg.simulation.federation_dir) if cfg.simulation.federation_dir else run_dir / "sites"
    fed = build_federation(cfg, fed_root, device="cuda" if _client_gpus(cfg) > 0 else "cpu")
    if cfg.simulation.sites_dir:  # the researcher's sites are the folders found there
        cfg = dataclasses.replace(cfg, simulation=dataclasses.replace(cfg.simulation, num_sites=len(fed.sites)))
    # The coordinator of a simulated federation keeps its registry and key beside its sites,
    # unless the config names its own.
    registry = dataclasses.replace(
        cfg.registry,
        root=cfg.registry.root or str(fed.registry_root.resolve()),
        signing_key=cfg.registry.signing_key or str(fed.signing_key.resolve()),
    )
    cfg = dataclasses.replace(cfg, registry=registry)
    log.info("run directory %s; %d sites in %s", run_dir, len(fed.sites), fed.root)
    # Build (or find) the base model once here, before Ray's client actors all ask for it.
    resolve_model_path(cfg.model.name_or_path)
    return _Prepared(cfg=cfg, run_dir=run_dir, fed=fed, config_yaml=to_yaml(unflatten(flatten(cfg))))


def _run(run: _Prepared, server_app: ServerApp, verbose: bool) -> Path:
    attackers = attacker_ids([s.site_id for s in run.fed.sites], run.cfg.simulation.attackers, run.cfg.seed)
    mods = [attack_mod(attackers, run.cfg.simulation.attackers, run.cfg.seed)] if attackers else None
    if attackers:
        log.info("attackers (%s): %s", run.cfg.simulation.attackers.behaviour, ", ".join(attackers))
    client_app = make_client_app(FederationSites(run.fed.root, run.roster_dir), mods=mods)
    # Ray is already running (simulation.runner started it): Flower uses it, and shuts it down.
    backend_config = {
        "client_resources": {"num_cpus": run.cfg.simulation.client_cpus, "num_gpus": _client_gpus(run.cfg)},
    }
    with _flower_logging(verbose):
        run_simulation(
            server_app=server_app,
            client_app=client_app,
            num_supernodes=run.cfg.simulation.num_sites,
            backend_config=backend_config,
        )
    _collect_ledgers(run.fed, run.run_dir)
    if not (run.run_dir / "summary.json").exists():
        raise SimulationFailed(
            f"the simulation ended without a summary; see the log above (run directory {run.run_dir})"
        )
    if attackers:
        prompts = [r.text for r in read_records(run.fed.validation_path)][:PHRASE_PROMPTS]
        write_attack_report(run.run_dir, run.cfg, attackers, prompts)
    return run.run_dir


PHRASE_PROMPTS = 32  # validation notes the backdoor phrase is scored after


AUTO_GPU_SHARE = 0.25  # LoRA on a small model leaves most of a GPU idle: four sites share one


def _client_gpus(cfg: Config) -> float:
    import torch

    if not torch.cuda.is_available():
        return 0.0
    return AUTO_GPU_SHARE if cfg.simulation.client_gpus is None else cfg.simulation.client_gpus


def _collect_ledgers(fed: Federation, run_dir: Path) -> None:
    # The run directory keeps a copy of each site's lifetime ledger as it stood at the end.
    for site in fed.sites:
        if site.ledger_path.exists():
            target = run_dir / "ledgers" / f"{site.site_id}.json"
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(site.ledger_path, target)


class _FlowerFilter(logging.Filter):
    """Keep Flower's warnings (unless verbose, drop its INFO chatter), minus one known notice.

    Flower 1.41 marks ``run_simulation`` deprecated in favour of ``flwr run``, which needs a
    SuperLink and hands the ServerApp its config through run_config. ``fedretrain simulate``
    keeps the in-process entry to the same simulation engine on purpose (the ServerApp gets
    the already-parsed config object); the deployment path is ``flwr run`` with
    ``server.app:app``. The notice would read like an error to every researcher, so it goes.
    """

    def __init__(self, verbose: bool) -> None:
        super().__init__()
        self.verbose = verbose

    def filter(self, record: logging.LogRecord) -> bool:
        if "`run_simulation` function is deprecated" in record.getMessage():
            return False
        return self.verbose or record.levelno >= logging.WARNING


@contextmanager
def _flower_logging(verbose: bool) -> Iterator[None]:
    # Flower prints through its own console handler: stop its records from reaching the
    # root logger too (each line twice), and unless asked keep only its warnings, since
    # the per-round progress comes from fedretrain. A filter, because run_simulation
    # resets the logger's level.
    logger = logging.getLogger("flwr")
    quiet = _FlowerFilter(verbose)
    saved = logger.propagate
    logger.propagate = False
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)
        logger.propagate = saved
