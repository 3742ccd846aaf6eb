"""Mask contact details and record numbers in a note before a site stores it.

Three kinds are masked: e-mail addresses (``[EMAIL]``), phone numbers (``[PHONE]``)
and record numbers matching the site's own pattern (``[RECORD]``). Everything else is
left alone, byte for byte: clinical text is full of numbers (``81 mg``, ``BP 120/80``,
``2026-01-01``, ``08:30``, ``10-20``) and a model trained on notes with holes punched
into them learns the holes.

So the phone patterns are narrow on purpose. A phone number here is one of

* international: ``+`` and a country code, then groups of digits split by a space,
  dot or hyphen (an area code may sit in parentheses), 9 to 15 digits in all:
  ``+1 555-123-4567``, ``+44 20 7946 0958``, ``+44 (0)20 7946 0958``;
* North American: three, three and four digits with separators, or an area code in
  parentheses: ``(555) 123-4567``, ``555.123.4567``, ``1-555-123-4567``;
* national with a trunk 0: ``020 7946 0958``, ``01632 960123``, 10 or 11 digits.

A bare run of digits (``5551234567``) is not masked: without separators it is as
likely a lab value or an id. Dates with ``-`` have 8 digits and never qualify.
"""

from __future__ import annotations

import re
from collections.abc import Callable

KINDS = ("email", "phone", "record_number")
MASKS = {"email": "[EMAIL]", "phone": "[PHONE]", "record_number": "[RECORD]"}

_EMAIL = re.compile(
    r"(?<![\w.%+-])[\w.%+-]+@[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*\.[A-Za-z]{2,}(?![\w-])"
)

# Not glued to a word, a slash (120/80), a plus, or a number with a separator before it.
_START = r"(?<![\w/+])(?<!\d[.,:-])"
# Not followed by a word character, a slash or colon, or a separator and another digit.
_END = r"(?![\w/:]|[.,-]\d)"
_SEP = r"[ .-]"
_PHONE = re.compile(
    _START + "(?:"
    # International: +CC, then groups (the first may be in parentheses), digit count checked below.
    rf"\+\d{{1,3}}(?:{_SEP}?\(\d{{1,4}}\))?(?:{_SEP}?\d{{1,4}}){{2,5}}"
    # North American: optional leading 1, (555) 123-4567 or 555-123-4567 (one separator style).
    rf"|(?:1{_SEP})?(?:\(\d{{3}}\) ?\d{{3}}{_SEP}\d{{4}}|\d{{3}}(?P<sep>{_SEP})\d{{3}}(?P=sep)\d{{4}})"
    # National with trunk 0 (UK style): 020 7946 0958, 01632 960123.
    r"|0\d{2,4}[ -]\d{3,4}(?:[ -]?\d{3,4})?"
    ")" + _END
)
_PHONE_DIGITS = {"+": (9, 15), "0": (10, 11)}  # by first character; North American is 10 or 11 by form


class Redactor:
    """Masks e-mail addresses, phone numbers and (optionally) the site's record numbers.

    Parameters
    ----------
    record_number_pattern : str | None
        A regular expression for the site's record numbers (e.g. ``MRN-?[0-9]{6}``);
        None: record numbers are not masked.
    """

    def __init__(self, record_number_pattern: str | None = None) -> None:
        self._record = re.compile(record_number_pattern) if record_number_pattern else None

    def redact(self, text: str) -> tuple[str, dict[str, int]]:
        """Return the masked text and how many of each kind were masked.

        E-mail addresses go first (their local part may hold digits), then record
        numbers (the site's pattern is the most specific), then phone numbers.
        """
        counts = dict.fromkeys(KINDS, 0)
        text = _mask(_EMAIL, text, "email", counts)
        if self._record is not None:
            text = _mask(self._record, text, "record_number", counts)
        text = _mask(_PHONE, text, "phone", counts, accept=_phone_digits_ok)
        return text, counts


def _mask(
    pattern: re.Pattern[str], text: str, kind: str, counts: dict[str, int], accept: Callable[[str], bool] = bool
) -> str:
    def replace(match: re.Match[str]) -> str:
        found = match.group(0)
        if not accept(found):  # an empty match (a careless site pattern) is never masked
            return found
        counts[kind] += 1
        return MASKS[kind]

    return pattern.sub(replace, text)


def _phone_digits_ok(found: str) -> bool:
    low, high = _PHONE_DIGITS.get(found[0], (10, 11))
    return low <= sum(c.isdigit() for c in found) <= high
