"""The accountants a site may choose, by name: the one list the config and the ledger read.

Only accountants that give an upper bound are offered: RDP and PRV. Opacus' GDP
accountant is a CLT approximation and is not a guarantee, so a publish or spend
gate must never use it. The registry names opacus' classes and imports opacus only
when one is asked for, so composing a config does not load torch.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from opacus.accountants import IAccountant

# name -> class in opacus.accountants
ACCOUNTANTS: Mapping[str, str] = {
    "rdp": "RDPAccountant",
    "prv": "PRVAccountant",
}


def accountant_class(name: str) -> type[IAccountant]:
    """Return the opacus accountant class registered under ``name``.

    Raises
    ------
    ValueError
        If ``name`` is not registered; the message lists the valid names.
    """
    try:
        class_name = ACCOUNTANTS[name]
    except KeyError:
        valid = ", ".join(sorted(ACCOUNTANTS))
        raise ValueError(f"unknown accountant {name!r}; valid accountants: {valid}") from None
    cls: type[IAccountant] = getattr(importlib.import_module("opacus.accountants"), class_name)
    return cls
