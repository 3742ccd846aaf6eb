"""A site joins a federation: its SuperNode, with the site's own settings as node config.

``fedretrain site join`` runs Flower's ``flower-supernode``: TLS to the coordinator's
SuperLink, checked against the federation's CA, and the site's private key proving
which registered site it is. The site's settings (data, privacy ceiling, the pinned
coordinator key, ...) are checked here first, then handed to the SuperNode as its
node config, the only place the ClientApp reads them from (fedretrain/config/site.py):
the coordinator can neither see nor change them.

    <state-dir>/node-config.toml   the node config, as the SuperNode reads it
    <state-dir>/flwr/              the SuperNode's FLWR_HOME (the apps it was sent)

The state directory is made 0700 whatever the umask: it holds the privacy ledger and
the installed models.
"""

from __future__ import annotations

import logging
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedretrain.atomic import atomic_write_text
from fedretrain.config import SiteConfig, site_config_from_node_config
from fedretrain.deploy.filemodes import private_dir
from fedretrain.deploy.flower import flower_command, flower_env, split_address, toml_assignments
from fedretrain.errors import DeployError

log = logging.getLogger("fedretrain.client")


@dataclass(frozen=True)
class JoinSettings:
    """How a site reaches its coordinator."""

    superlink: str              # HOST:PORT of the SuperLink's Fleet API
    ca: Path | None             # the federation's CA certificate; None: insecure (test benches only)
    key: Path | None            # the site's private node key; None: no node authentication
    port: int                   # this SuperNode's local Runtime API port (one per SuperNode on a host)
    max_retries: int | None = None


def prepare_site(node_config: dict[str, Any]) -> SiteConfig:
    """Check the site's settings (an error names the key) and write its node config file."""
    site = site_config_from_node_config(node_config)
    if not site.train_path.exists():
        raise DeployError(f"{site.train_path}: the site's data is missing (data-dir must hold train.jsonl "
                          "and heldout.jsonl, or .csv with a text column)")
    private_dir(site.state_path)
    atomic_write_text(node_config_path(site), toml_assignments(site.to_node_config()))
    return site


def node_config_path(site: SiteConfig) -> Path:
    return site.state_path / "node-config.toml"


def supernode_command(site: SiteConfig, join: JoinSettings) -> list[str]:
    """``flower-supernode`` for this site."""
    split_address(join.superlink)  # a bad address fails here, naming it
    argv = [flower_command("flower-supernode"), "--superlink", join.superlink,
            "--node-config", str(node_config_path(site).resolve()), "--port", str(join.port)]
    if join.ca is None:
        argv.append("--insecure")
    else:
        argv += ["--root-certificates", str(_existing(join.ca, "--ca").resolve())]
    if join.key is not None:
        argv += ["--auth-supernode-private-key", str(_existing(join.key, "--key").resolve())]
    if join.max_retries is not None:
        argv += ["--max-retries", str(join.max_retries)]
    return argv


def start_supernode(site: SiteConfig, join: JoinSettings) -> subprocess.Popen:
    """Start the site's SuperNode (its FLWR_HOME below the site's state directory)."""
    argv = supernode_command(site, join)
    log.info("site %s joining %s", site.site_id, join.superlink)
    return subprocess.Popen(argv, env=flower_env(site.state_path / "flwr"), cwd=site.state_path)


def _existing(path: Path, flag: str) -> Path:
    if not Path(path).is_file():
        raise DeployError(f"{flag}: {path} does not exist")
    return Path(path)
