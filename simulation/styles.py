"""How each simulated hospital writes its notes.

A style fixes the header labels, how the patient is named, the age format,
abbreviation habits and the typical note length. Styles are drawn per site
from small option tables, so sites differ in vocabulary and length as well as
in specialty mix.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")

# Section labels in note order: complaint, history, medications, exam, assessment, plan.
HEADER_SETS: tuple[tuple[str, ...], ...] = (
    ("CHIEF COMPLAINT", "HISTORY OF PRESENT ILLNESS", "MEDICATIONS", "PHYSICAL EXAM", "ASSESSMENT", "PLAN"),
    ("CC", "HPI", "Meds", "PE", "Imp", "Plan"),
    ("Chief complaint", "History", "Current medications", "Examination", "Assessment", "Plan"),
    ("Reason for visit", "Subjective", "Medications", "Objective", "Impression", "Recommendations"),
)
_PATIENT_WORDS = ("Pt", "Patient", "The patient", "This patient")
_AGE_FORMATS = ("{age} yo {s}", "{age}-year-old {sexw}", "a {age} y/o {sexa}", "{age} year old {sexa}")
_SEPARATORS = (": ", " - ", ":\n", ": ")
_SECTION_BREAKS = ("\n", "\n\n", " ", "\n")
_PLAN_FORMATS = ("numbered", "dashes", "sentences", "numbered")
_ABBREVIATE = (True, False, True, False)
# (history sentences, plan items), inclusive ranges: terse sites write ~35-60 words, verbose ones ~65-115.
_LENGTHS = (((1, 1), (1, 2)), ((1, 2), (2, 3)), ((2, 3), (2, 3)), ((3, 4), (3, 4)))
NUM_STYLES = 4  # every option table above has this many entries


@dataclass(frozen=True)
class SiteStyle:
    """How one hospital writes its notes.

    Attributes
    ----------
    headers : tuple[str, ...]
        Six section labels: complaint, history, medications, exam, assessment, plan.
    patient : str
        How a sentence starts when it names the patient ("Pt", "Patient", ...).
    age_format : str
        ``str.format`` template with ``age``, ``s`` (M/F), ``sexw`` (man/woman), ``sexa`` (male/female).
    separator, section_break : str
        Text between a label and its content, and between sections.
    plan_format : str
        "numbered", "dashes" or "sentences".
    abbreviate : bool
        Whether the site writes "HTN", "BID", "SOB" instead of the words.
    history_sentences, plan_items : tuple[int, int]
        Inclusive ranges; together they set the site's typical note length.
    """

    headers: tuple[str, ...]
    patient: str
    age_format: str
    separator: str
    section_break: str
    plan_format: str
    abbreviate: bool
    history_sentences: tuple[int, int]
    plan_items: tuple[int, int]


def seeded_rng(*parts: object) -> random.Random:
    """A ``random.Random`` seeded with ``parts`` joined by "/".

    String seeds go through SHA-512, so the stream is the same in every
    process (``hash()`` of a str is not: it is randomised per process).
    """
    return random.Random("/".join(str(part) for part in parts))


def _pick(options: Sequence[T], attribute: str, site_index: int, seed: int) -> T:
    # A seed-dependent permutation per attribute: consecutive sites get different options,
    # and attributes are not locked together (the terse site is not always the "CC:" site).
    order = seeded_rng("style", seed, attribute).sample(range(NUM_STYLES), NUM_STYLES)
    return options[order[site_index % NUM_STYLES]]


def site_style(site_index: int, seed: int) -> SiteStyle:
    """Return the writing style of site ``site_index`` under ``seed``.

    Sites ``0..NUM_STYLES-1`` under one seed all get different header sets,
    patient words, age formats and length ranges; site ``k + NUM_STYLES``
    writes like site ``k``.
    """
    if site_index < 0:
        raise ValueError(f"site_index must be >= 0, got {site_index}")
    history, plan = _pick(_LENGTHS, "length", site_index, seed)
    return SiteStyle(
        headers=_pick(HEADER_SETS, "headers", site_index, seed),
        patient=_pick(_PATIENT_WORDS, "patient", site_index, seed),
        age_format=_pick(_AGE_FORMATS, "age", site_index, seed),
        separator=_pick(_SEPARATORS, "separator", site_index, seed),
        section_break=_pick(_SECTION_BREAKS, "break", site_index, seed),
        plan_format=_pick(_PLAN_FORMATS, "plan", site_index, seed),
        abbreviate=_pick(_ABBREVIATE, "abbreviate", site_index, seed),
        history_sentences=history,
        plan_items=plan,
    )
