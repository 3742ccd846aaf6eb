"""``fedretrain simulate`` and the simulated ``coordinator watch``: compose the config, start
Ray, run the session (``simulation.session``).

Ray's start (its raylet, GCS and helper processes) and the imports a session needs
(torch, transformers, peft, opacus, Flower: ~7 s of CPU) do not depend on each other, so
they overlap: Ray starts in this thread while the session module imports in another (Ray
must start in the main thread: its processes are bound to the life of the thread that
forks them). Ray starts without a runtime environment: its workers inherit PYTHONPATH
from this process, which is all Flower's runtime environment would set, without a setup
process per worker. Measured on 2 cores, ``fedretrain simulate rounds=1
data.records_per_site=40 data.validation_records=40 train.local_steps=2`` (tests/
test_readme.py's shrunk run), before and after, alternating: 27.1, 25.9, 28.9 s -> 21.5,
23.4, 25.0 s; CPU of the whole machine 43.0 -> 39.1 s.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import tempfile
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from fedretrain.config import compose_config
from fedretrain.errors import ConfigError

SESSION = "simulation.session"


def simulate(overrides: Sequence[str] = (), *, verbose: bool = False) -> Path:
    """Compose the config, generate the federation, run it; return the run directory.

    One retraining cycle, or with ``scenario=drift`` simulated time with drift
    (simulation/scenario.py).
    """
    cfg = compose_config(overrides)  # a bad override is refused before anything starts
    with ray_while_importing(SESSION):
        from simulation.session import simulate as run

        return run(cfg, verbose=verbose)


def watch(overrides: Sequence[str] = (), *, verbose: bool = False) -> Path:
    """``fedretrain coordinator watch`` over a simulated federation: poll, trigger, retrain.

    The sites are the virtual ones in ``simulation.federation_dir`` (their data changes
    when their operators run ``fedretrain site ingest``); the watch stops after
    ``trigger.max_polls`` polls, or when interrupted.
    """
    cfg = compose_config(overrides)
    if not cfg.simulation.federation_dir:
        raise ConfigError(
            "simulation.federation_dir: the watch needs standing sites whose data grows between "
            "polls; name their directory (it is generated on first use)"
        )
    with ray_while_importing(SESSION):
        from simulation.session import watch as run

        return run(cfg, verbose=verbose)


@contextmanager
def ray_while_importing(module: str) -> Iterator[None]:
    """Start Ray here while ``module`` imports in a second thread; shut Ray down at the end.

    Flower's simulation engine finds Ray running and uses it (and shuts it down when the
    simulation ends); the exit here shuts it down when the session failed before that.
    """
    import ray

    with _private_runtime_dirs():
        failures: list[BaseException] = []

        def load() -> None:
            try:
                importlib.import_module(module)
            except BaseException as err:  # re-raised in the main thread below
                failures.append(err)

        loader = threading.Thread(target=load, name="fedretrain-imports", daemon=True)
        loader.start()
        try:
            try:
                # What Flower's RayBackend.init_ray passes, minus the runtime environment.
                ray.init(num_cpus=os.cpu_count() or 1, include_dashboard=False, logging_level=logging.ERROR)
            finally:
                loader.join()
            if failures:
                raise failures[0]
            yield
        finally:
            if ray.is_initialized():  # also after a failed start: what it started goes too
                ray.shutdown()


@contextmanager
def _private_runtime_dirs() -> Iterator[None]:
    # Ray's socket paths must stay short (AF_UNIX ~107 bytes), and a private FLWR_HOME keeps
    # this run clear of any other Flower or Ray instance on the machine. Ray's processes
    # inherit PYTHONPATH (this process's sys.path): how its workers import the project.
    keys = ("RAY_TMPDIR", "FLWR_HOME", "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "PYTHONPATH")
    saved = {k: os.environ.get(k) for k in keys}
    with tempfile.TemporaryDirectory(prefix="fr-", dir="/tmp") as tmp:
        os.environ["RAY_TMPDIR"] = tmp
        os.environ["FLWR_HOME"] = os.path.join(tmp, "flwr")
        # Keep Ray's future behaviour (and silence its warning): no GPU env rewrite at num_gpus=0.
        os.environ["RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO"] = "0"
        os.environ["PYTHONPATH"] = os.pathsep.join([*sys.path, *filter(None, [saved["PYTHONPATH"]])])
        try:
            yield
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
