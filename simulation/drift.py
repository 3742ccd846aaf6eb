"""The simulation's data arriving over time, with and without drift.

At every time step each site receives new notes written in its own style. From the
drift step on, the drifted sites write differently in two ways at once:

* **new terminology**: a new EHR template (section headers in none of ``HEADER_SETS``),
  renamed medications and tests, other dosing and plan phrasing
  (``DRIFT_REWRITES``, applied to the generated text): words a language model trained
  on the old notes has never seen and must learn anew;
* **another mix of specialties**: most of the weight moves to the specialties the
  site had little of (``drifted_mix``).

``fresh_probe`` draws records from the whole federation's distribution at a step:
the coordinator's refreshed validation set and the researcher's probe.
Everything is a pure function of its arguments (``seeded_rng`` streams).
"""

from __future__ import annotations

import dataclasses
import random
import re
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta

from simulation.federation import site_id
from simulation.notes import note_text
from simulation.specialties import SPECIALTIES, VOCABULARY
from simulation.styles import SiteStyle, seeded_rng, site_style

# Step 0 of simulated time (simulation/scenario.py's calendar starts here too). It lies
# after the ``site_notes`` timestamps: those begin 2026-01-01, ~100 minutes apart, so
# even 2,000 records a site end within five months.
ARRIVALS_EPOCH = datetime(2026, 6, 1, 0, 0, 0, tzinfo=UTC)

# The new EHR template: labels in note order (complaint, history, medications, exam,
# assessment, plan), bracketed, none of them in HEADER_SETS.
DRIFT_HEADERS: tuple[str, ...] = (
    "[Presenting problem]",
    "[Clinical narrative]",
    "[Active prescriptions]",
    "[Bedside findings]",
    "[Working diagnosis]",
    "[Care pathway]",
)
DRIFT_SHARE = 0.8  # weight a drifted site gives to the specialties it had least of

# Old wording -> new wording, matched as whole words, longest first, in one pass (a
# replacement is never rewritten again). Covers the abbreviated forms too.
DRIFT_REWRITES: dict[str, str] = {
    # Medications: every drug renamed (doses kept).
    "metoprolol": "cardiprexol",
    "lisinopril": "vasotrelin",
    "atorvastatin": "lipovarin",
    "apixaban": "thrombexa",
    "furosemide": "diurenox",
    "aspirin": "plaquetrin",
    "tamoxifen": "estrabloc",
    "ondansetron": "emezofan",
    "dexamethasone": "cortivexin",
    "capecitabine": "tumoracil",
    "oxycodone": "analgevor",
    "letrozole": "aromalix",
    "amoxicillin": "otibactin",
    "acetaminophen": "febrinol",
    "ibuprofen": "inflamadol",
    "albuterol": "bronchivent",
    "hydrocortisone cream": "dermacalm ointment",
    "oral rehydration solution": "electrolyte replenisher",
    "levetiracetam": "neurostabil",
    "sumatriptan": "cephalotrex",
    "carbidopa levodopa": "dopavance",
    "gabapentin": "neurelax",
    "topiramate": "migrastat",
    "donepezil": "cognivex",
    "naproxen": "artholin",
    "meloxicam": "jointrex",
    "cyclobenzaprine": "myorelaxin",
    "tramadol": "dolotrin",
    "diclofenac": "flexarol",
    "tiotropium": "pulmovair",
    "fluticasone salmeterol": "respiduo",
    "prednisone": "steroplex",
    "azithromycin": "macrobact",
    "montelukast": "leukotriban",
    "metformin": "glucorex",
    "levothyroxine": "thyrovance",
    "insulin glargine": "basalin",
    "semaglutide": "incretavex",
    "methimazole": "thyrostat",
    "alendronate": "ossifax",
    "omeprazole": "acidrex",
    "mesalamine": "colisol",
    "pantoprazole": "gastrovance",
    "loperamide": "motilex",
    "polyethylene glycol": "laxivar",
    # Dosing.
    "twice daily": "every 12 hours",
    "three times daily": "every 8 hours",
    "four times daily": "every 6 hours",
    "daily": "once a day",
    "at bedtime": "nightly",
    "as needed": "on demand",
    "weekly": "once a week",
    "BID": "q12h",
    "TID": "q8h",
    "QID": "q6h",
    "QHS": "nightly",
    "PRN": "on demand",
    # Tests and vital signs.
    "ECG": "12-lead tracing",
    "echocardiogram": "cardiac sonogram",
    "troponin": "hs-cTnI assay",
    "lipid panel": "cholesterol profile",
    "complete blood count": "full haematology panel",
    "MRI": "MR scan",
    "CT": "CAT scan",
    "x-ray": "radiograph",
    "EEG": "electroencephalography",
    "urinalysis": "urine dipstick",
    "hemoglobin A1c": "glycated haemoglobin",
    "TSH": "thyrotropin",
    "liver function tests": "hepatic panel",
    "pulmonary function tests": "spirometry battery",
    "PFTs": "spirometry battery",
    "BP": "NIBP",
    "Blood pressure": "NIBP",
    "HR": "pulse",
    "heart rate": "pulse",
    # Phrasing.
    "reports": "endorses",
    "denies": "is negative for",
    "history of": "background of",
    "hx of": "background of",
    "Previously treated with": "Prior therapy:",
    "was unremarkable": "came back within normal limits",
    "Follow up in": "Review in",
    "F/u in": "Review in",
    "Start": "Commence",
    "Continue": "Maintain",
    "Order": "Request",
    "Schedule": "Book",
    "Return if": "Re-present if",
    "Discussed": "Counselled on",
    "getting worse": "deteriorating",
    "improving": "settling",
}
_REWRITE = re.compile(
    r"(?<![\w-])(" + "|".join(re.escape(k) for k in sorted(DRIFT_REWRITES, key=len, reverse=True)) + r")(?![\w-])"
)


def rewrite_terminology(text: str) -> str:
    """Apply ``DRIFT_REWRITES`` to ``text`` (whole words, longest match first, one pass)."""
    return _REWRITE.sub(lambda m: DRIFT_REWRITES[m.group(1)], text)


def drifted_mix(mix: Mapping[str, float]) -> dict[str, float]:
    """The specialty mix of a site after drift.

    The half of ``SPECIALTIES`` the site had least of (by weight, ties in
    ``SPECIALTIES`` order) share ``DRIFT_SHARE`` equally; the remaining weight
    follows the old mix (normalised). Returns weights summing to 1, in
    ``SPECIALTIES`` order.
    """
    total = sum(mix.values())
    if total <= 0 or any(w < 0 for w in mix.values()):
        raise ValueError("mix needs non-negative weights with at least one > 0")
    order = sorted(SPECIALTIES, key=lambda name: (mix.get(name, 0.0), SPECIALTIES.index(name)))
    rare = set(order[: len(SPECIALTIES) // 2])
    return {
        name: (1 - DRIFT_SHARE) * mix.get(name, 0.0) / total + (DRIFT_SHARE / len(rare) if name in rare else 0.0)
        for name in SPECIALTIES
    }


def drifted_style(style: SiteStyle) -> SiteStyle:
    """The site's style with the new EHR template's headers (everything else as before)."""
    return dataclasses.replace(style, headers=DRIFT_HEADERS, separator=" ")


def step_arrivals(
    site_index: int,
    step: int,
    count: int,
    seed: int,
    *,
    drifted: bool,
    mix: Mapping[str, float],
    step_s: float = 86400.0,
) -> list[dict]:
    """New notes for one site at one time step.

    Parameters
    ----------
    site_index, step : int
        Which site and which step (>= 0); together they choose the random stream.
    count : int
        How many notes, >= 0.
    seed : int
        Run seed.
    drifted : bool
        Write with the new terminology and ``drifted_mix(mix)`` instead of ``mix``.
    mix : Mapping[str, float]
        The site's (undrifted) specialty mix.
    step_s : float
        Simulated seconds per step: timestamps fall in
        ``[ARRIVALS_EPOCH + step * step_s, ARRIVALS_EPOCH + (step + 1) * step_s)``.

    Returns
    -------
    list[dict]
        ``{"id": "site<k>-t<step>-<n>", "text", "timestamp"}``, timestamps increasing.
    """
    _check(step, count)
    rng = seeded_rng("arrivals", seed, site_index, step)
    stamps = _step_timestamps(rng, step, count, step_s)
    style = site_style(site_index, seed)
    return [
        {"id": f"site{site_index}-t{step}-{n}", "text": _note(rng, mix, style, drifted), "timestamp": stamp}
        for n, stamp in enumerate(stamps)
    ]


def fresh_probe(
    step: int,
    count: int,
    seed: int,
    num_sites: int,
    drifted_sites: int,
    drift_step: int,
    mixes: Mapping[str, Mapping[str, float]],
    *,
    stream: str = "probe",
    step_s: float = 86400.0,
) -> list[dict]:
    """Records from the federation's distribution at ``step``.

    Each record comes from a uniformly drawn site ``k`` in ``0..num_sites-1``, written
    as that site writes at ``step``: drifted when ``k < drifted_sites`` and
    ``step >= drift_step``. ``mixes`` maps ``site_id(k)`` ("site-00", ...) to the
    site's undrifted mix (``Federation.mixes``). ``stream`` names the random stream
    (one per use: the probe, the coordinator's validation set); every stream is
    disjoint from the arrivals'. Ids are ``<stream>-t<step>-<n>``.
    """
    _check(step, count)
    if num_sites < 1:
        raise ValueError(f"num_sites must be >= 1, got {num_sites}")
    missing = [site_id(k) for k in range(num_sites) if site_id(k) not in mixes]
    if missing:
        raise ValueError(f"mixes has no entry for {', '.join(missing)}")
    rng = seeded_rng("fresh", stream, seed, step)
    stamps = _step_timestamps(rng, step, count, step_s)
    records = []
    for n, stamp in enumerate(stamps):
        k = rng.randrange(num_sites)
        drifted = k < drifted_sites and step >= drift_step
        text = _note(rng, mixes[site_id(k)], site_style(k, seed), drifted)
        records.append({"id": f"{stream}-t{step}-{n}", "text": text, "timestamp": stamp})
    return records


def _note(rng: random.Random, mix: Mapping[str, float], style: SiteStyle, drifted: bool) -> str:
    weights = drifted_mix(mix) if drifted else mix
    names = [name for name in SPECIALTIES if weights.get(name, 0.0) > 0.0]
    vocab = VOCABULARY[rng.choices(names, [weights[name] for name in names])[0]]
    if not drifted:
        return note_text(rng, vocab, style)
    return rewrite_terminology(note_text(rng, vocab, drifted_style(style)))


def _step_timestamps(rng: random.Random, step: int, count: int, step_s: float) -> list[str]:
    start = ARRIVALS_EPOCH + timedelta(seconds=step * step_s)
    offsets = sorted(rng.uniform(0.0, step_s) for _ in range(count))
    return [(start + timedelta(seconds=int(o))).strftime("%Y-%m-%dT%H:%M:%SZ") for o in offsets]


def _check(step: int, count: int) -> None:
    if step < 0 or count < 0:
        raise ValueError(f"need step >= 0 and count >= 0, got {step} and {count}")
