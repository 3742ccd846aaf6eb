"""The coordinator's signed model registry, and the checks a site runs before installing a version.

Modules, by concept:

- :mod:`~fedretrain.registry.signing`    Ed25519 keys, signatures, canonical JSON
- :mod:`~fedretrain.registry.manifest`   the signed manifest's format, times, schema check
- :mod:`~fedretrain.registry.bundle`     a version as bytes; ``verify_bundle`` / ``verify_rollback``
- :mod:`~fedretrain.registry.base_model` the base model identity an adapter is bound to
- :mod:`~fedretrain.registry.pointer`    signed champion pointer records; ``verify_pointer`` / ``verify_chain``
- :mod:`~fedretrain.registry.chain`      the champion per the verified chain (``verified_head``)
- :mod:`~fedretrain.registry.store`      ``Registry``: publish, approve, rollback on disk
- :mod:`~fedretrain.registry.lifecycle`  what status a version has
- :mod:`~fedretrain.registry.audit`      ``fedretrain registry verify``
- :mod:`~fedretrain.registry.sidecar`    pinned key, decision log, site pseudonyms
- :mod:`~cli.registry`   the ``keys`` and ``registry`` CLI commands

Names are imported lazily: ``cli.registry`` must not load torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ADAPTER_FILES": "bundle",
    "RollbackRecord": "bundle",
    "VersionBundle": "bundle",
    "WithdrawalRecord": "bundle",
    "verify_bundle": "bundle",
    "verify_rollback": "bundle",
    "verify_withdrawal": "bundle",
    "base_model_identity": "base_model",
    "MANIFEST_FORMAT": "manifest",
    "build_manifest": "manifest",
    "format_time": "manifest",
    "parse_time": "manifest",
    "sha256_hex": "manifest",
    "utc_now": "manifest",
    "CheckReport": "audit",
    "Registry": "store",
    "STATUSES": "lifecycle",
    "ChampionPointer": "pointer",
    "verify_pointer": "pointer",
    "verify_chain": "pointer",
    "KeyPair": "signing",
    "canonical_json": "signing",
    "generate_keypair": "signing",
    "key_id": "signing",
    "load_private_key": "signing",
    "load_public_key": "signing",
    "sign": "signing",
    "verify_signature": "signing",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'fedretrain.registry' has no attribute {name!r}")
    return getattr(importlib.import_module(f"fedretrain.registry.{_EXPORTS[name]}"), name)
