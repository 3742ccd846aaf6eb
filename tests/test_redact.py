"""Redaction masks e-mail addresses, phone numbers and the site's record numbers, and nothing else."""

from __future__ import annotations

import pytest

from client.ingest.redact import Redactor
from simulation.notes import site_notes, site_style, specialty_mix_for_site

MRN = r"MRN-?[0-9]{6}"


@pytest.mark.parametrize(
    "phone",
    [
        "+1 555-123-4567",
        "(555) 123-4567",
        "555.123.4567",
        "555-123-4567",
        "555 123 4567",
        "1-555-123-4567",
        "+44 20 7946 0958",
        "+44 (0)20 7946 0958",
        "020 7946 0958",
        "01632 960123",
        "+33 1 23 45 67 89",
    ],
)
def test_each_phone_form_is_masked(phone):
    # Prepare
    text = f"Daughter's number {phone}, call after 5."

    # Execute
    masked, counts = Redactor().redact(text)

    # Assert
    assert masked == "Daughter's number [PHONE], call after 5."
    assert counts == {"email": 0, "phone": 1, "record_number": 0}


@pytest.mark.parametrize("email", ["jane.doe@example.org", "j+clinic@mail.example.co.uk", "a_b-c@x-y.io"])
def test_email_addresses_are_masked(email):
    masked, counts = Redactor().redact(f"Results sent to {email}.")
    assert masked == "Results sent to [EMAIL]."
    assert counts == {"email": 1, "phone": 0, "record_number": 0}


def test_record_numbers_follow_the_site_pattern_only():
    # Prepare: two numbers match MRN-?[0-9]{6}; a short one, another scheme and a note id do not.
    text = "MRN-123456 (old MRN123456) merged; MRN-12345 and ACC-123456 and site3-17 untouched."

    # Execute
    with_pattern = Redactor(MRN).redact(text)
    without_pattern = Redactor().redact(text)

    # Assert
    assert with_pattern == (
        "[RECORD] (old [RECORD]) merged; MRN-12345 and ACC-123456 and site3-17 untouched.",
        {"email": 0, "phone": 0, "record_number": 2},
    )
    assert without_pattern == (text, {"email": 0, "phone": 0, "record_number": 0})


def test_only_what_matched_changes():
    # Prepare: a note mixing every kind with clinical numbers around them.
    text = (
        "Pt (MRN-654321) seen 2026-01-01 08:30, BP 120/80, HR 88, aspirin 81 mg.\n"
        "Call +1 555-123-4567 or mail dr.who@example.org; warfarin 2.5 mg, INR 2.0-3.0."
    )

    # Execute
    masked, counts = Redactor(MRN).redact(text)

    # Assert
    assert masked == (
        "Pt ([RECORD]) seen 2026-01-01 08:30, BP 120/80, HR 88, aspirin 81 mg.\n"
        "Call [PHONE] or mail [EMAIL]; warfarin 2.5 mg, INR 2.0-3.0."
    )
    assert counts == {"email": 1, "phone": 1, "record_number": 1}


@pytest.mark.parametrize(
    "clinical",
    [
        "aspirin 81 mg daily",
        "letrozole 2.5 mg",
        "BP 120/80, HR 88",
        "on 2026-01-01",
        "on 01/02/2026",
        "on 01.02.2026",
        "at 08:30",
        "2026-01-01T08:30:00Z",
        "a 67 year old",
        "3-4 times a day",
        "10-20 mg",
        "SBP 120-140",
        "2026-01-01 12 patients",
        "1,000,000 units",
        "carbidopa levodopa 25/100 TID",
        "WBC 12.5 x 10^9/L",
        "platelets 250 000",
        "ICD-10 I10",
        "lot 5551234567",
        "ext 555-1234",
        "2+ pitting edema",
        "weight 70.5 kg, height 1.75 m",
        "site0-12",
        "MRN-12345",
    ],
)
def test_clinical_numbers_are_left_alone(clinical):
    assert Redactor(MRN).redact(clinical) == (clinical, {"email": 0, "phone": 0, "record_number": 0})


@pytest.mark.parametrize("site_index", [0, 1, 2, 3, 4, 5])
def test_generated_notes_come_out_byte_for_byte(site_index):
    # Prepare
    notes = site_notes(
        site_index, 40, specialty_mix_for_site(site_index, dirichlet_alpha=0.5, seed=0), 0, site_style(site_index, 0)
    )
    redactor = Redactor(MRN)

    # Execute
    masked = [redactor.redact(note["text"])[0] for note in notes]

    # Assert
    assert [m.encode("utf-8") for m in masked] == [note["text"].encode("utf-8") for note in notes]


def test_a_pattern_that_matches_nothing_masks_nothing():
    # "x*" matches the empty string everywhere: no mask is inserted for an empty match.
    assert Redactor("x*").redact("HR 88") == ("HR 88", {"email": 0, "phone": 0, "record_number": 0})
