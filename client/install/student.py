"""A site that chose the smaller model (``model-variant='student'``) installs each version's student.

The coordinator distils a student from a version it publishes (server/cycle/distill.py) and sends
it, after the version itself, to the sites whose install reply asked for it (``wants-student``).
The site verifies it before it keeps it (fail closed, the current student stays):

1. this site chose the student (a site of ``model-variant='full'`` refuses it);
2. it is the student of the version this site runs, bound to the exact bytes of that version's
   verified manifest (a student cannot be moved onto another version);
3. signature against the pinned coordinator key, canonical manifest, file hashes, expiry, a
   passed gate, finite weights (fedretrain/registry/student.py ``verify_student``);
4. it loads through ``from_pretrained`` with no missing, unexpected or mis-shaped weight and the
   parameter count its manifest states (``load_student``).

It is stored beside the versions, ``<state-dir>/models/students/000003/`` (written under a
staging name and renamed into place), and verified again when it is loaded to answer.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from client.install.installer import _pinned_key
from client.install.model_store import ModelStore
from fedretrain.atomic import install_dir
from fedretrain.config import SiteConfig
from fedretrain.errors import VerificationError
from fedretrain.registry.student import StudentBundle, load_student, verify_student

log = logging.getLogger("fedretrain.client")


def student_dir(store: ModelStore, version: int) -> Path:
    return store.root / "students" / f"{version:06d}"


def wants_student(site: SiteConfig, store: ModelStore) -> bool:
    """Whether this site chose the student and lacks a verified one of the version it runs (a copy
    damaged at rest is asked for again)."""
    current = store.state().current
    if site.model_variant != "student" or current is None:
        return False
    try:
        checked_student(store, current, _pinned_key(site), now=datetime.now(UTC), check_expiry=False)
    except (VerificationError, OSError) as err:
        if student_dir(store, current).is_dir():
            log.warning("site %s: the stored student of version %d fails its checks: %s", site.site_id, current, err)
        return True
    return False


def checked_student(store: ModelStore, version: int, key: Any, *, now: datetime, check_expiry: bool = True):  # noqa: ANN201
    """The stored student of ``version``, verified against ``key`` and its teacher as installed here, loaded."""
    folder = student_dir(store, version)
    if not folder.is_dir():
        raise VerificationError(
            "student",
            f"no student of version {version} is installed at this site (model-variant='student'); "
            "it arrives with the next publication or cycle of a coordinator that distils (distill.enabled=true)",
        )
    bundle = StudentBundle.from_dir(folder)
    teacher = (store.version_dir(version) / "manifest.json").read_bytes()
    verify_student(bundle, key, teacher_manifest_bytes=teacher, now=now, check_expiry=check_expiry)
    return bundle


def _stored(target: Path) -> StudentBundle | None:
    try:
        return StudentBundle.from_dir(target)
    except (VerificationError, OSError):  # damaged at rest: the verified one replaces it
        return None


def receive_student(site: SiteConfig, bundle: StudentBundle, *, now: datetime | None = None) -> dict[str, Any]:
    """Verify ``bundle`` (module docstring) and install it; raise ``VerificationError`` to refuse."""
    now = now or datetime.now(UTC)
    if site.model_variant != "student":
        raise VerificationError("student", f"site {site.site_id} installs full versions (model-variant='full')")
    key = _pinned_key(site)
    store = ModelStore(site.model_store_path)
    current = store.state().current
    if current is None or bundle.teacher_version != current:
        raise VerificationError(
            "teacher", f"the student of version {bundle.teacher_version}; this site runs version {current}"
        )
    teacher = (store.version_dir(current) / "manifest.json").read_bytes()
    verify_student(bundle, key, teacher_manifest_bytes=teacher, now=now)
    target = student_dir(store, current)
    if target.is_dir() and _stored(target) == bundle:
        return {"student-version": current, "already-installed": 1}
    model = load_student(bundle)
    parameters = sum(p.numel() for p in model.parameters())
    install_dir(target, bundle.write_to)  # a copy changed at rest is replaced by the verified one
    log.info("site %s installed the student of version %d (%d parameters)", site.site_id, current, parameters)
    return {"student-version": current, "student-parameters": parameters, "already-installed": 0}
