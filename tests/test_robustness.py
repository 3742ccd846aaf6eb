"""The gate's robustness suite (server/cycle/robustness.py): the perturbations, the canaries and
the comparison, with scorers written here; its place in a cycle is tested with the gate."""

from __future__ import annotations

import pytest

from server.cycle.robustness import (
    HOMOGLYPHS,
    INJECTIONS,
    PERTURBATIONS,
    canaries,
    compare,
    perturb,
    planted_and_unplanted,
)

NOTES = [
    "Patient presents with chest pain radiating to the left arm since this morning.",
    "Follow-up visit: blood pressure controlled, continue current medication and review in three months.",
    "Discharged home in stable condition after an uneventful recovery from appendectomy.",
]


@pytest.mark.parametrize("kind", PERTURBATIONS)
def test_each_perturbation_changes_the_text_the_same_way_for_the_same_seed(kind):
    once, again, other = perturb(NOTES, kind, seed=7), perturb(NOTES, kind, seed=7), perturb(NOTES, kind, seed=8)
    assert once == again and len(once) == len(NOTES)
    assert once != NOTES
    if kind in ("typos", "case", "homoglyphs"):
        assert once != other  # seeded, not fixed


def test_what_each_perturbation_does():
    typos = perturb(NOTES, "typos", seed=1)
    assert all(len(a) == len(b) and sorted(a) == sorted(b) for a, b in zip(typos, NOTES, strict=True))
    case = perturb(NOTES, "case", seed=1)
    assert [c.lower() for c in case] == [n.lower() for n in NOTES]
    glyphs = perturb(NOTES, "homoglyphs", seed=1)
    back = {v: k for k, v in HOMOGLYPHS.items()}
    assert ["".join(back.get(ch, ch) for ch in g) for g in glyphs] == NOTES and any(set(g) & set(back) for g in glyphs)
    truncated = perturb(NOTES, "truncation", seed=1)
    assert all(n.startswith(t) and len(t.split()) == len(n.split()) // 2 for t, n in zip(truncated, NOTES, strict=True))
    injected = perturb(NOTES, "injection", seed=1)
    assert all(any(i == p + n for p in INJECTIONS) for i, n in zip(injected, NOTES, strict=True))
    with pytest.raises(ValueError, match="unknown perturbation 'rot13'"):
        perturb(NOTES, "rot13", seed=1)


def test_planted_and_unplanted_canaries_are_distinct_and_of_one_form():
    planted, unplanted = planted_and_unplanted(seed=3, count=5)
    assert len(planted) == len(unplanted) == 5 and not set(planted) & set(unplanted)
    assert all(c.startswith("Record code ") and "belongs to" in c for c in planted + unplanted)
    assert canaries(3, 10) == planted + unplanted and canaries(4, 10) != canaries(3, 10)


def _scorer(base: float, per_text: dict[str, float]):
    return lambda texts: base + sum(per_text.get(t, 0.0) for t in texts) / len(texts)


def test_a_candidate_worse_on_one_perturbation_or_memorising_more_fails_with_the_figure():
    planted, unplanted = planted_and_unplanted(seed=0, count=4)
    injected = perturb(NOTES, "injection", seed=0)
    champion = _scorer(3.0, {})
    # Better everywhere by 0.2, except 0.3 worse on injected records; planted canaries 0.5 likelier.
    worse = {t: 0.5 for t in injected} | {t: -0.5 for t in planted}
    candidate = _scorer(2.8, worse)
    figures = compare(champion, candidate, NOTES, seed=0, tolerance=0.05, planted=planted, unplanted=unplanted)
    assert figures["perturbations"]["typos"]["change"] == pytest.approx(-0.2)
    assert figures["perturbations"]["injection"]["change"] == pytest.approx(0.3)
    assert figures["memorisation"]["change"] == pytest.approx(0.5)
    (injection, memorisation) = figures["failures"]
    assert injection.startswith("robustness: on injection") and "+0.3000 nats, tolerance 0.05" in injection
    assert memorisation.startswith("memorisation: planted canaries are 0.5000 nats likelier")
    # Within the tolerance, nothing fails; without canaries, no probe.
    assert compare(champion, _scorer(3.03, {}), NOTES, seed=0, tolerance=0.05)["failures"] == []
    assert "memorisation" not in compare(champion, champion, NOTES, seed=0, tolerance=0.05)
