"""A site's local model store: every version it installed, and which one is current.

    <state-dir>/models/state.json          current version, highest accepted, last rollback seen, history
    <state-dir>/models/versions/000003/    the signed bundle as received (adapter, config, manifest, signature)
    <state-dir>/models/versions/000002/    ... earlier versions stay, for rollback

A version directory is written under a staging name and renamed into place whole;
``state.json`` is replaced atomically afterwards. A crash at any point leaves the
previous current version in force. Only ``client.install.installer`` decides what gets in.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch

from fedretrain.arrays import from_torch_state_dict
from fedretrain.atomic import atomic_write_json, install_dir
from fedretrain.errors import VerificationError
from fedretrain.registry.bundle import VersionBundle


@dataclass
class StoreState:
    """What the site has accepted so far (the anti-rollback memory)."""

    current: int | None = None
    highest_accepted: int = 0
    rollback_sequence: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)


class ModelStore:
    """The versions installed at one site."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    @property
    def state_path(self) -> Path:
        return self.root / "state.json"

    def version_dir(self, version: int) -> Path:
        return self.root / "versions" / f"{version:06d}"

    def state(self) -> StoreState:
        if not self.state_path.exists():
            return StoreState()
        try:
            raw = json.loads(self.state_path.read_text())
            return StoreState(**raw)
        except (ValueError, TypeError) as err:
            raise VerificationError("store", f"{self.state_path}: unreadable ({err}); refusing to guess") from err

    def current_dir(self) -> Path | None:
        """Directory of the current version, or None when nothing is installed."""
        current = self.state().current
        return None if current is None else self.version_dir(current)

    def current_adapter(self) -> dict[str, np.ndarray] | None:
        """The current version's adapter tensors, or None when nothing is installed."""
        current = self.current_dir()
        if current is None:
            return None
        stored = VersionBundle.from_dir(current).files.get("adapter_model.safetensors")
        if stored is None:
            raise VerificationError("store", f"{current}: the installed version has no adapter_model.safetensors")
        return from_torch_state_dict(safetensors.torch.load(stored))

    def stored_bundle(self, version: int) -> VersionBundle | None:
        directory = self.version_dir(version)
        return VersionBundle.from_dir(directory) if directory.is_dir() else None

    def install(self, bundle: VersionBundle, *, via: str, rollback_sequence: int | None = None) -> StoreState:
        """Make ``bundle`` (already verified) the current version; keep every earlier one.

        ``via`` is ``"publish"`` or ``"rollback"``; a rollback records its sequence
        number so the same record cannot be replayed.
        """
        target = self.version_dir(bundle.version)
        if target.is_dir():
            stored = VersionBundle.from_dir(target)
            if stored.manifest_bytes != bundle.manifest_bytes:
                raise VerificationError(
                    "version",
                    f"version {bundle.version} is already stored with a different "
                    "manifest; two different versions under one number are refused",
                )
            if dict(stored.files) != dict(bundle.files) or stored.signature != bundle.signature:
                # The copy at rest changed since it was installed: replace it with the verified bundle.
                install_dir(target, bundle.write_to)
        else:
            install_dir(target, bundle.write_to)  # whole, before state.json (fsynced) points at it
        state = self.state()
        previous = state.current
        state.current = bundle.version
        state.highest_accepted = max(state.highest_accepted, bundle.version)
        if rollback_sequence is not None:
            state.rollback_sequence = rollback_sequence
        state.history.append(
            {
                "version": bundle.version,
                "previous": previous,
                "via": via,
                "at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            }
        )
        atomic_write_json(self.state_path, asdict(state))
        return state
