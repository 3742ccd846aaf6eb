"""Deterministic synthetic clinical notes and general-domain text.

Each simulated hospital writes notes in its own style (header labels,
"Pt" vs "Patient", abbreviations, note length) about its own mix of
specialties, so the federation's data is non-IID in specialty, vocabulary and
length. The general corpus is everyday English that pretrains the embedded
base model; it never contains clinical-note headers, so fine-tuning on notes
has something to learn.

Everything here is a pure function of its arguments: randomness comes from
``random.Random`` seeded with strings (stable across processes, unlike
``hash``), and nothing iterates an unordered collection.

Run ``python -m simulation.notes --write-general-corpus`` to regenerate the
bundled ``fedretrain/assets/general_corpus.md``.
"""

from __future__ import annotations

import argparse
import math
import random
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path

from fedretrain.atomic import atomic_write_text
from simulation.general_text import general_corpus
from simulation.specialties import ABBREVIATIONS, SPECIALTIES, VOCABULARY, Vocabulary
from simulation.styles import HEADER_SETS, NUM_STYLES, SiteStyle, seeded_rng, site_style

__all__ = [
    "HEADER_SETS",
    "SPECIALTIES",
    "SiteStyle",
    "general_corpus",
    "render_general_corpus",
    "site_notes",
    "site_style",
    "specialty_mix_for_site",
    "validation_notes",
]

GENERAL_CORPUS_PATH = Path(__file__).resolve().parent.parent / "fedretrain" / "assets" / "general_corpus.md"

_EPOCH = datetime(2026, 1, 1, 8, 0, 0, tzinfo=UTC)

_HISTORY = (
    "{pt} reports {complaint} for {dur}.",
    "{pt} has a history of {condition}.",
    "Symptoms started {dur} ago and are {course}.",
    "{pt} denies {complaint2}.",
    "Previously treated with {med}.",
    "At the last visit the exam showed {finding}.",
    "Recent {test} was unremarkable.",
    "{pt} was seen in the emergency department {dur} ago for {complaint2}.",
)
_COURSES = ("getting worse", "stable", "improving", "intermittent", "worse at night", "worse with activity")
_DURATIONS = ("two days", "three days", "one week", "two weeks", "one month", "three months", "six months")
_STATUS = ("stable", "new diagnosis", "poorly controlled", "improving", "likely", "worsening")
_PLAN = (
    "Start {med}",
    "Continue {med}",
    "Order {test}",
    "Schedule {procedure}",
    "Follow up in {weeks} weeks",
    "Return if {complaint} gets worse",
    "Discussed {condition} and treatment options",
)


def specialty_mix_for_site(
    site_index: int, *, dirichlet_alpha: float, seed: int, num_specialties: int | None = None
) -> dict[str, float]:
    """Draw a site's specialty mix from a symmetric Dirichlet distribution.

    Parameters
    ----------
    site_index : int
        Which site; each site gets its own draw.
    dirichlet_alpha : float
        Concentration, > 0. Small values (0.1) give one or two dominant
        specialties per site (strongly non-IID); large values (100) give
        nearly uniform mixes.
    seed : int
        Run seed.
    num_specialties : int | None
        Use only the first ``num_specialties`` of ``SPECIALTIES`` (all when None).

    Returns
    -------
    dict[str, float]
        Specialty name to probability, in ``SPECIALTIES`` order, summing to 1.
    """
    if not (math.isfinite(dirichlet_alpha) and dirichlet_alpha > 0):
        raise ValueError(f"dirichlet_alpha must be a finite number > 0, got {dirichlet_alpha}")
    count = len(SPECIALTIES) if num_specialties is None else num_specialties
    if not 1 <= count <= len(SPECIALTIES):
        raise ValueError(f"num_specialties must be between 1 and {len(SPECIALTIES)}, got {num_specialties}")
    names = SPECIALTIES[:count]
    rng = seeded_rng("mix", seed, site_index)
    # A Dirichlet sample is a vector of independent Gamma(alpha, 1) draws, normalised.
    draws = [rng.gammavariate(dirichlet_alpha, 1.0) for _ in names]
    total = sum(draws)
    if total <= 0.0:  # every draw underflowed (tiny alpha): the limit is a one-hot mix
        draws = [0.0] * len(names)
        draws[rng.randrange(len(names))] = 1.0
        total = 1.0
    return {name: draw / total for name, draw in zip(names, draws, strict=True)}


def _fill(
    template: str, rng: random.Random, vocab: Vocabulary, style: SiteStyle, complaint: str, condition: str
) -> str:
    # Only the slots a template names are drawn, in a fixed order, so output is reproducible.
    # The note's own complaint and condition recur, as in real notes; "complaint2" is another one.
    slots = {
        "pt": lambda: style.patient,
        "complaint": lambda: complaint,
        "complaint2": lambda: rng.choice(vocab.complaints),
        "condition": lambda: condition,
        "med": lambda: rng.choice(vocab.medications),
        "test": lambda: rng.choice(vocab.tests),
        "finding": lambda: rng.choice(vocab.findings),
        "procedure": lambda: rng.choice(vocab.procedures),
        "dur": lambda: rng.choice(_DURATIONS),
        "course": lambda: rng.choice(_COURSES),
        "weeks": lambda: str(rng.choice((2, 4, 6, 8, 12))),
    }
    names = [name for name in slots if "{" + name + "}" in template]
    return template.format(**{name: slots[name]() for name in names})


def _capital(text: str) -> str:
    # Unlike str.capitalize, keeps "ECG" and "Crohn" as written.
    return text[0].upper() + text[1:]


def _plan_text(items: list[str], style: SiteStyle) -> str:
    if style.plan_format == "numbered":
        return " ".join(f"{i}. {item}." for i, item in enumerate(items, start=1))
    if style.plan_format == "dashes":
        return "\n".join(f"- {item}" for item in items)
    return " ".join(f"{item}." for item in items)


def note_text(rng: random.Random, vocab: Vocabulary, style: SiteStyle) -> str:
    """One note about ``vocab``'s specialty in ``style``, drawn from ``rng``."""
    age = rng.randint(2, 17) if vocab.pediatric else rng.randint(24, 89)
    female = rng.random() < 0.5
    intro = style.age_format.format(
        age=age, s="F" if female else "M", sexw="woman" if female else "man", sexa="female" if female else "male"
    )
    complaint, condition = rng.choice(vocab.complaints), rng.choice(vocab.conditions)
    history = [f"{_capital(intro)} with {rng.choice(vocab.conditions)}."]
    for _ in range(rng.randint(*style.history_sentences)):
        history.append(_fill(rng.choice(_HISTORY), rng, vocab, style, complaint, condition))
    meds = ", ".join(rng.sample(vocab.medications, rng.randint(1, 3))) + "."
    vitals = f"BP {rng.randint(104, 168)}/{rng.randint(60, 98)}, HR {rng.randint(56, 112)}."
    exam = f"{vitals} {_capital(rng.choice(vocab.findings))}."
    assessment = f"{_capital(condition)}, {rng.choice(_STATUS)}."
    plan = [
        _fill(rng.choice(_PLAN), rng, vocab, style, complaint, condition) for _ in range(rng.randint(*style.plan_items))
    ]
    bodies = (_capital(complaint) + ".", " ".join(history), meds, exam, assessment, _plan_text(plan, style))
    text = style.section_break.join(
        f"{label}{style.separator}{body}" for label, body in zip(style.headers, bodies, strict=True)
    )
    if style.abbreviate:
        for words, short in ABBREVIATIONS:
            text = text.replace(words, short)
    else:  # the vitals line is written out at sites that do not abbreviate
        text = text.replace("BP ", "Blood pressure ").replace("HR ", "heart rate ")
    return text


def _timestamps(rng: random.Random, count: int) -> list[str]:
    # Notes arrive 20 minutes to 3 hours apart, in order.
    moment, stamps = _EPOCH, []
    for _ in range(count):
        moment += timedelta(minutes=rng.randint(20, 180))
        stamps.append(moment.strftime("%Y-%m-%dT%H:%M:%SZ"))
    return stamps


def site_notes(
    site_index: int, num_records: int, specialty_mix: Mapping[str, float], seed: int, style: SiteStyle
) -> list[dict]:
    """Generate one site's notes.

    Parameters
    ----------
    site_index : int
        Which site; used in record ids and to separate random streams.
    num_records : int
        How many notes, >= 0.
    specialty_mix : Mapping[str, float]
        Specialty name to non-negative weight (need not sum to 1); names must
        be in ``SPECIALTIES``.
    seed : int
        Run seed.
    style : SiteStyle
        The site's writing style, usually ``site_style(site_index, seed)``.

    Returns
    -------
    list[dict]
        ``{"id": "site<k>-<n>", "text": str, "timestamp": ISO-8601 UTC str}``
        records, timestamps increasing, 30-120 words of text each.
    """
    if num_records < 0:
        raise ValueError(f"num_records must be >= 0, got {num_records}")
    unknown = sorted(set(specialty_mix) - set(SPECIALTIES))
    if unknown:
        raise ValueError(f"unknown specialties {unknown}; valid names: {', '.join(SPECIALTIES)}")
    # SPECIALTIES order, not the mapping's, so equal mixes give equal notes.
    names = [name for name in SPECIALTIES if specialty_mix.get(name, 0.0) > 0.0]
    if not names or any(weight < 0 for weight in specialty_mix.values()):
        raise ValueError("specialty_mix needs non-negative weights with at least one > 0")
    weights = [specialty_mix[name] for name in names]
    rng = seeded_rng("notes", seed, site_index)
    stamps = _timestamps(rng, num_records)
    records = []
    for n, stamp in enumerate(stamps):
        vocab = VOCABULARY[rng.choices(names, weights)[0]]
        records.append({"id": f"site{site_index}-{n}", "text": note_text(rng, vocab, style), "timestamp": stamp})
    return records


def validation_notes(num_records: int, seed: int, num_sites: int = NUM_STYLES) -> list[dict]:
    """Generate the coordinator's validation notes.

    Each note takes a specialty uniformly from ``SPECIALTIES`` and the style of
    a site drawn uniformly from ``0..num_sites-1`` under ``seed``: the
    federation's overall distribution. The random stream is separate from
    every site's, so these notes are held out from all training data.

    Returns
    -------
    list[dict]
        Records shaped like ``site_notes`` output, with ids ``val-<n>``.
    """
    if num_records < 0 or num_sites < 1:
        raise ValueError(f"need num_records >= 0 and num_sites >= 1, got {num_records} and {num_sites}")
    styles = [site_style(i, seed) for i in range(num_sites)]
    rng = seeded_rng("validation", seed)
    stamps = _timestamps(rng, num_records)
    records = []
    for n, stamp in enumerate(stamps):
        vocab, style = VOCABULARY[rng.choice(SPECIALTIES)], rng.choice(styles)
        records.append({"id": f"val-{n}", "text": note_text(rng, vocab, style), "timestamp": stamp})
    return records


def render_general_corpus(seed: int = 0) -> str:
    """The general corpus as one UTF-8 text: documents separated by a blank line, trailing newline."""
    return "\n\n".join(general_corpus(seed)) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m simulation.notes", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--write-general-corpus", action="store_true", help=f"regenerate the bundled corpus at {GENERAL_CORPUS_PATH}"
    )
    args = parser.parse_args(argv)
    if not args.write_general_corpus:
        parser.error("nothing to do; pass --write-general-corpus")
    text = render_general_corpus()
    atomic_write_text(GENERAL_CORPUS_PATH, text)
    print(f"wrote {GENERAL_CORPUS_PATH} ({len(text.encode('utf-8'))} bytes)")


if __name__ == "__main__":
    main()
