"""The life of a version: which status it has, from the champion pointer and the rollbacks.

``champion``     the version ``champion.json`` points at; sites install it.
``pending``      newer than the champion, never approved and not withdrawn by a rollback:
                 published with ``require_approval``; ``approve`` makes it champion.
``withdrawn``    a pending version its staged rollout took back at the canaries (a signed
                 ``withdrawal.json``, server/cycle/rollout.py): it can never be approved.
``rolled-back``  a champion that a rollback withdrew (a record's ``from_version``).
``approved``     approved once, since replaced by a newer champion or withdrawn by a rollback.
``superseded``   anything else: a former champion replaced by a newer one, a version a rollback
                 skipped over, or a pending version overtaken by a newer champion before anyone
                 approved it (approving it then would move the champion backwards unsigned).

A rollback from F to T withdraws every version in (T, F]. The champion only moves
forward otherwise (publish and approve take a version newer than the champion), so a
version newer than the champion and inside no withdrawn span has never been champion.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from fedretrain.errors import VerificationError
from fedretrain.registry.bundle import RollbackRecord

STATUSES = ("champion", "pending", "withdrawn", "rolled-back", "approved", "superseded")


def version_status(
    version: int,
    *,
    champion: int | None,
    approved: bool,
    rollbacks: Sequence[tuple[int, int]],
    withdrawn: bool = False,
) -> str:
    """Return the status of ``version``.

    Parameters
    ----------
    version : int
        The version asked about.
    champion : int or None
        The current champion (None before any version became champion).
    approved : bool
        Whether ``version`` carries an approval.
    rollbacks : sequence of (target_version, from_version)
        Every rollback so far.
    withdrawn : bool
        Whether ``version`` carries a withdrawal (taken back at its canaries, never approved).
    """
    if version == champion:
        return "champion"
    if withdrawn and not approved:
        return "withdrawn"
    if any(source == version for _, source in rollbacks):
        return "rolled-back"
    withdrawn = any(target < version <= source for target, source in rollbacks)
    if not approved and not withdrawn and (champion is None or version > champion):
        return "pending"
    return "approved" if approved else "superseded"


def rollback_spans(records: Iterable[RollbackRecord]) -> list[tuple[int, int]]:
    """``(target_version, from_version)`` of each readable record; the audit reports unreadable ones."""
    spans = []
    for record in records:
        try:
            body = record.record
        except VerificationError:
            continue
        target, source = body.get("target_version"), body.get("from_version")
        if type(target) is int and type(source) is int:
            spans.append((target, source))
    return spans
