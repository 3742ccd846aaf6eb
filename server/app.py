"""The ServerApp: parse the run's config once, then hand the Grid to the retraining driver.

Deployed (``flwr run``), the run_config (``experiment``, ``overrides``) is mapped onto
Hydra overrides. In simulation, ``run_simulation()`` hands the ServerApp an empty
run_config, so ``simulation/`` builds its ServerApp with ``make_server_app`` and the
config it already parsed.
"""

from __future__ import annotations

import logging
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedretrain.config import Config, compose_raw, overrides_from_run_config, to_yaml
from fedretrain.config.parse import build
from server.rundir import new_run_dir
from server.run import run_retraining

log = logging.getLogger("fedretrain.server")


def make_server_app(cfg: Config, run_dir: Path, config_yaml: str, validation_path: str | None = None) -> ServerApp:
    """A ServerApp bound to an already parsed config (simulation and tests)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_retraining(grid, cfg, run_dir, config_yaml=config_yaml, validation_path=validation_path)

    return app


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Deployment entry (``server.app:app``): the config comes from run_config."""
    raw = compose_raw(overrides_from_run_config(context.run_config))
    cfg = build(Config, raw)
    run_dir = new_run_dir(Path(cfg.output_dir), cfg.name)
    log.info("run directory: %s", run_dir)
    run_retraining(grid, cfg, run_dir, config_yaml=to_yaml(raw))
