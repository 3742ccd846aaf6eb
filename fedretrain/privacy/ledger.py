"""The site's lifetime privacy ledger: every DP round it ever spent, as JSON.

Opacus starts a fresh accountant at every ``make_private``, so the engine's
accountant only knows the current round. The ledger is the source of truth: it
keeps one entry per private round, for the whole life of the site's data, and
asks :mod:`fedretrain.privacy.accounting` for the epsilon of all of it.

Every release the site makes goes in, not only training rounds: each entry has a
``kind``. ``train`` is a DP-SGD round ``(sigma, q, steps)``. ``status``, ``evaluate`` and
``canary`` are Gaussian releases of scalars (a status poll's noised counts, an
evaluation's noised sums, :mod:`fedretrain.privacy.release`): one release of noise
multiplier ``z`` is the opacus history entry ``(z, 1.0, 1)``, so one accountant
composes everything the site ever released.

The file is plain JSON written atomically (never pickle). It also carries a
computed ``epsilon`` for humans reading it; that value is never trusted and is
recomputed from the entries on load. Non-private rounds are not recorded.
Files of schema 1 (training rounds only, no ``kind``) are read as ``train`` entries.
"""

from __future__ import annotations

import json
import math
import os
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fedretrain.atomic import atomic_write_json, file_lock
from fedretrain.errors import LedgerError, PrivacyBudgetExceeded
from fedretrain.privacy.accountants import accountant_class
from fedretrain.privacy.accounting import HistoryEntry, epsilon_for_history

SCHEMA_VERSION = 2
_READABLE_VERSIONS = (1, 2)

# What a ledger entry released: a DP-SGD round, a status reply, an evaluation, a canary's
# report on a version on trial (client/serve/canary.py).
KINDS = ("train", "status", "evaluate", "canary")

# Field name -> accepted JSON types, for a ledger file and for one entry.
_HEADER_FIELDS: dict[str, tuple[type, ...]] = {
    "schema_version": (int,),
    "site_id": (str,),
    "accountant": (str,),
    "delta": (float, int),
    "entries": (list,),
}
_ENTRY_FIELDS: dict[str, tuple[type, ...]] = {
    "run_id": (str,),
    "round": (int,),
    "noise_multiplier": (float, int),
    "sample_rate": (float, int),
    "steps": (int,),
    "recorded_at": (str,),
}


@dataclass(frozen=True)
class LedgerEntry:
    """One private round the site spent.

    ``(noise_multiplier, sample_rate, steps)`` is the round's opacus history
    entry; ``recorded_at`` is an ISO-8601 UTC timestamp.
    """

    run_id: str
    round: int
    noise_multiplier: float
    sample_rate: float
    steps: int
    recorded_at: str
    kind: str = "train"


@dataclass
class PrivacyLedger:
    """Lifetime record of a site's private rounds under one accountant and delta.

    A ledger is bound to its ``site_id``, ``accountant`` and ``delta``: epsilons
    under different deltas or accountants do not add up, so a file written
    under other settings is refused on load rather than silently reinterpreted.
    """

    site_id: str
    accountant: str
    delta: float
    entries: list[LedgerEntry] = field(default_factory=list)

    def __post_init__(self) -> None:
        accountant_class(self.accountant)  # ValueError listing valid names
        if not 0 < self.delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {self.delta}")

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, site_id: str, accountant: str, delta: float) -> PrivacyLedger:
        """Read the ledger at ``path``; a missing file is an empty ledger.

        Raises
        ------
        LedgerError
            If the file is not valid JSON, breaks the schema, or was written for
            another site_id, accountant or delta. The message names the file
            and the field.
        """
        ledger = cls(site_id=site_id, accountant=accountant, delta=delta)
        target = Path(path)
        if not target.exists():
            return ledger
        try:
            data = json.loads(target.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise LedgerError(f"{target}: not a readable JSON ledger ({exc})") from exc
        _check_fields(target, data, _HEADER_FIELDS, where="")
        if data["schema_version"] not in _READABLE_VERSIONS:
            raise LedgerError(
                f"{target}: field 'schema_version' is {data['schema_version']}, "
                f"this code reads versions {', '.join(map(str, _READABLE_VERSIONS))}"
            )
        for name, expected in (("site_id", site_id), ("accountant", accountant), ("delta", delta)):
            if data[name] != expected:
                raise LedgerError(
                    f"{target}: field '{name}' is {data[name]!r} but this site runs with "
                    f"{expected!r}; epsilons under different settings do not compose"
                )
        ledger.entries = [_parse_entry(target, i, raw) for i, raw in enumerate(data["entries"])]
        return ledger

    @property
    def history(self) -> list[HistoryEntry]:
        """Every recorded round as an opacus history entry ``(sigma, q, steps)``."""
        return [(e.noise_multiplier, e.sample_rate, e.steps) for e in self.entries]

    def epsilon(self) -> float:
        """Epsilon spent so far over the site's whole life (0.0 when empty)."""
        return epsilon_for_history(self.history, self.delta, self.accountant)

    def epsilon_after(self, noise_multiplier: float, sample_rate: float, steps: int) -> float:
        """Epsilon the site would have spent after one more such round."""
        projected = [*self.history, (noise_multiplier, sample_rate, steps)]
        return epsilon_for_history(projected, self.delta, self.accountant)

    def check_can_spend(self, noise_multiplier: float, sample_rate: float, steps: int, ceiling: float) -> float:
        """Return the projected epsilon if one more such round stays within ``ceiling``.

        Raises
        ------
        PrivacyBudgetExceeded
            When the projected epsilon is above ``ceiling``; the message gives
            the spent epsilon, the projected epsilon and the ceiling.
        """
        projected = self.epsilon_after(noise_multiplier, sample_rate, steps)
        if projected > ceiling:
            spent = self.epsilon()
            raise PrivacyBudgetExceeded(
                f"site {self.site_id!r} has spent epsilon {spent:.4f}; this round "
                f"(sigma={noise_multiplier:g}, q={sample_rate:g}, steps={steps}) would bring "
                f"it to {projected:.4f}, above the lifetime ceiling {ceiling:.4f} "
                f"(delta={self.delta:g}, accountant={self.accountant})"
            )
        return projected

    def trained(self, run_id: str, round: int | None = None) -> bool:
        """Whether the site spent a training round for ``run_id`` (its round ``round``, or any)."""
        return any(e.kind == "train" and e.run_id == run_id and round in (None, e.round) for e in self.entries)

    def record(
        self,
        run_id: str,
        round: int,
        noise_multiplier: float,
        sample_rate: float,
        steps: int,
        *,
        kind: str = "train",
    ) -> None:
        """Append one spent release (in memory; call :meth:`save` to persist).

        Raises
        ------
        ValueError
            If ``noise_multiplier`` is not > 0 (non-private rounds are not
            recorded), ``sample_rate`` is outside (0, 1], ``steps`` < 1 or
            ``kind`` is not one of :data:`KINDS`.
        """
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
        if not (noise_multiplier > 0 and math.isfinite(noise_multiplier)):
            raise ValueError(
                f"noise_multiplier must be finite and > 0, got {noise_multiplier}; non-private rounds are not recorded"
            )
        if not 0 < sample_rate <= 1:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        self.entries.append(
            LedgerEntry(
                run_id=run_id,
                round=int(round),
                noise_multiplier=float(noise_multiplier),
                sample_rate=float(sample_rate),
                steps=int(steps),
                recorded_at=datetime.now(UTC).isoformat(timespec="seconds"),
                kind=kind,
            )
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form; ``epsilon`` is computed here for humans, not read back."""
        return {
            "schema_version": SCHEMA_VERSION,
            "site_id": self.site_id,
            "accountant": self.accountant,
            "delta": self.delta,
            "epsilon": self.epsilon(),
            "entries": [asdict(e) for e in self.entries],
        }

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the ledger to ``path`` atomically: readers see the old or the new file."""
        atomic_write_json(path, self.to_dict())


def ledger_lock(path: str | os.PathLike[str]) -> AbstractContextManager[bool]:
    """Hold an exclusive lock on the ledger at ``path`` (blocking until it is free).

    Atomic writes keep the file whole, but load-check-train-record-save is a
    read-modify-write: two rounds at once would both pass the ceiling check and the
    later save would drop the earlier entry. Holding this lock from load to save
    makes a site's rounds run one at a time. The lock is ``<path>.lock`` (flock),
    released when the block ends or the process dies.
    """
    return file_lock(path)


def _parse_entry(path: Path, index: int, raw: Any) -> LedgerEntry:
    where = f"entries[{index}]."
    _check_fields(path, raw, _ENTRY_FIELDS, where=where)
    entry = LedgerEntry(
        run_id=raw["run_id"],
        round=raw["round"],
        noise_multiplier=float(raw["noise_multiplier"]),
        sample_rate=float(raw["sample_rate"]),
        steps=raw["steps"],
        recorded_at=raw["recorded_at"],
        kind=raw.get("kind", "train"),
    )
    if entry.kind not in KINDS:
        raise LedgerError(f"{path}: field '{where}kind' must be one of {', '.join(KINDS)}")
    if not (entry.noise_multiplier > 0 and math.isfinite(entry.noise_multiplier)):
        raise LedgerError(f"{path}: field '{where}noise_multiplier' must be finite and > 0")
    if not 0 < entry.sample_rate <= 1:
        raise LedgerError(f"{path}: field '{where}sample_rate' must be in (0, 1]")
    if entry.steps < 1:
        raise LedgerError(f"{path}: field '{where}steps' must be >= 1")
    return entry


def _check_fields(path: Path, data: Any, fields: dict[str, tuple[type, ...]], *, where: str) -> None:
    if not isinstance(data, dict):
        raise LedgerError(f"{path}: '{where.rstrip('.') or 'top level'}' must be a JSON object")
    for name, types in fields.items():
        if name not in data:
            raise LedgerError(f"{path}: field '{where}{name}' is missing")
        value = data[name]
        # bool is an int in Python but never a valid count or rate here.
        if isinstance(value, bool) or not isinstance(value, types):
            kind = type(value).__name__
            raise LedgerError(f"{path}: field '{where}{name}' has the wrong type ({kind})")
