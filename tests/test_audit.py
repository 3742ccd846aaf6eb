"""The one-run privacy audit: its maths pinned by hand-worked values, and one real audit of a site.

Steinke, Nasr and Jagielski (2023): under (eps, 0)-DP the right guesses are dominated by
Binomial(r, e^eps / (1 + e^eps)); under (eps, delta)-DP the tail gains
2 m delta max_i P[v - i <= Binomial < v] / i.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import binom

from fedretrain.privacy.audit import (
    AuditBound,
    audit_scores,
    count_guesses,
    epsilon_lower_bound,
    guesses_from_scores,
    p_value,
)


def test_all_of_100_guesses_right_refutes_the_epsilon_whose_binomial_tail_is_5_percent() -> None:
    # Prepare: r = v = 100, so the tail is q^100; at 95% confidence q^100 = 0.05,
    # q = 0.05^(1/100) = 0.970487 and eps = ln(q / (1 - q)) = ln(32.884) = 3.49297.
    q = 0.05 ** (1 / 100)

    # Execute
    bound = epsilon_lower_bound(100, 100, 100, confidence=0.95)

    # Assert
    assert bound == pytest.approx(math.log(q / (1 - q)), abs=1e-8)
    assert bound == pytest.approx(3.49297, abs=1e-5)


def test_the_delta_zero_p_value_is_the_binomial_tail_at_the_randomized_response_accuracy() -> None:
    # eps = ln 3 gives q = 3/4. P[Bin(10, 3/4) >= 9] = 10 (3/4)^9 (1/4) + (3/4)^10 = (3/4)^9 * 3.25.
    by_hand = 0.75**9 * 3.25  # 0.244025...

    assert p_value(10, 10, 9, math.log(3)) == pytest.approx(by_hand, rel=1e-12)
    assert p_value(10, 10, 9, math.log(3)) == pytest.approx(float(binom.sf(8, 10, 0.75)), rel=1e-12)
    assert by_hand == pytest.approx(0.244025, abs=1e-6)


def test_the_delta_term_is_2_m_delta_times_the_worst_tail_slice_per_guess() -> None:
    # r = v = 2 at eps = 0 (q = 1/2): tail P[Bin = 2] = 1/4. Slices: i = 1, P[Bin = 1] / 1 = 1/2;
    # i = 2, P[0 <= Bin < 2] / 2 = (3/4) / 2 = 3/8. alpha = 1/2, so with m = 10, delta = 0.01:
    # p = 1/4 + 1/2 * 0.01 * 2 * 10 = 0.35.
    assert p_value(10, 2, 2, 0.0, delta=0.01) == pytest.approx(0.35, abs=1e-12)
    assert p_value(10, 2, 2, 0.0, delta=0.0) == pytest.approx(0.25, abs=1e-12)
    # Capped at 1 where 2 m delta is large.
    assert p_value(1000, 2, 2, 0.0, delta=0.01) == 1.0


def test_a_positive_delta_refutes_less_and_more_canaries_cost_more_of_it() -> None:
    pure = epsilon_lower_bound(100, 100, 100, delta=0.0)
    with_delta = epsilon_lower_bound(100, 100, 100, delta=1e-5)
    many_canaries = epsilon_lower_bound(10_000, 100, 100, delta=1e-5)

    assert many_canaries < with_delta < pure
    # The bound is exactly where the p-value crosses 5%.
    assert p_value(100, 100, 100, with_delta, 1e-5) == pytest.approx(0.05, abs=1e-6)


def test_chance_level_guessing_refutes_nothing() -> None:
    # Half right is what a coin does: not even eps = 0 is refuted (P[Bin(100, 1/2) >= 50] = 0.54).
    assert epsilon_lower_bound(200, 100, 50) == 0.0
    assert epsilon_lower_bound(200, 0, 0) == 0.0
    # 60 of 100 right: P[Bin(100, 1/2) >= 60] = 0.028 < 0.05, so eps = 0 is refuted, barely.
    assert 0.0 < epsilon_lower_bound(200, 100, 60) < 0.1


def test_more_right_guesses_give_a_higher_bound() -> None:
    bounds = [epsilon_lower_bound(100, 100, v) for v in (70, 80, 90, 100)]
    assert bounds == sorted(bounds) and len(set(bounds)) == 4


@pytest.mark.parametrize(("m", "r", "v", "confidence"), [(5, 6, 1, 0.95), (5, 3, 4, 0.95), (5, 3, 2, 1.0)])
def test_impossible_counts_and_confidences_are_refused(m: int, r: int, v: int, confidence: float) -> None:
    with pytest.raises(ValueError):
        epsilon_lower_bound(m, r, v, confidence=confidence)


def test_guesses_take_the_top_scores_in_the_bottom_scores_out_and_abstain_between() -> None:
    # Prepare: canary 3 scores highest, then 0; canary 4 lowest.
    scores = [0.9, -1.0, 0.1, 5.0, -3.0]

    # Execute
    guesses = guesses_from_scores(scores, k_plus=2, k_minus=1)

    # Assert
    assert guesses.tolist() == [1, 0, 0, 1, -1]
    # Ties keep canary order: the first of equal scores is guessed IN.
    assert guesses_from_scores([1.0, 1.0, 0.0], 1, 0).tolist() == [1, 0, 0]
    with pytest.raises(ValueError, match="k_plus"):
        guesses_from_scores(scores, 3, 3)
    with pytest.raises(ValueError, match="finite"):
        guesses_from_scores([0.0, math.nan], 1, 0)


def test_counting_guesses_ignores_abstentions() -> None:
    # Guesses IN, OUT, abstain, IN against coins in, in, out, out: 3 made, 1 right (the first).
    assert count_guesses(np.array([1, -1, 0, 1]), [True, True, False, False]) == (3, 1)


def test_the_best_of_several_guess_sizes_pays_for_the_choice() -> None:
    # Prepare: 20 canaries, the 10 IN scoring 10..19 and the 10 OUT scoring 0..9: perfect scores.
    included = np.array([True] * 10 + [False] * 10)
    scores = np.concatenate([np.arange(10, 20), np.arange(10)]).astype(float)

    # Execute: one choice, then the same choice among two.
    alone = audit_scores(scores, included, [(10, 10)], confidence=0.95)
    among_two = audit_scores(scores, included, [(2, 2), (10, 10)], confidence=0.95)

    # Assert: 20 of 20 right; alone it is judged at 5%, among two at 2.5% (Bonferroni).
    assert alone == AuditBound(
        m=20,
        r=20,
        v=20,
        k_plus=10,
        k_minus=10,
        confidence=0.95,
        delta=0.0,
        epsilon=epsilon_lower_bound(20, 20, 20, confidence=0.95),
    )
    assert (among_two.r, among_two.v) == (20, 20)
    assert among_two.epsilon == epsilon_lower_bound(20, 20, 20, confidence=0.975)
    assert among_two.epsilon < alone.epsilon


# The real audit as `fedretrain privacy audit` runs it by default: one simulated site, its own
# train_round, the embedded model, two rounds of 60 steps at batch 8 (simulation.audit.JOB_DEFAULTS).
AUDIT = dict(canaries=64, rounds=2, honest_records=16, device="cpu")


def test_canaries_are_distinct_word_strings_from_the_auditors_generator() -> None:
    from simulation.audit import draw_canaries

    first = draw_canaries(np.random.default_rng(7), 50, 8)
    again = draw_canaries(np.random.default_rng(7), 50, 8)

    assert first == again and len(set(first)) == 50
    assert all(len(c.split()) == 8 for c in first)


def test_an_audit_refuses_a_site_directory_that_already_holds_files(tmp_path) -> None:
    from simulation.audit import AuditSettings, run_audit

    (tmp_path / "privacy_ledger.json").write_text("{}")
    with pytest.raises(ValueError, match="new or empty"):
        run_audit(AuditSettings(**AUDIT), tmp_path)


@pytest.mark.slow
def test_an_audit_sees_the_leak_without_dp_and_stays_under_the_ledger_with_it(tmp_path) -> None:
    from simulation.audit import AuditSettings, run_audit

    # Execute: the same cycle without DP (the site allows it) and with it.
    plain = run_audit(AuditSettings(private=False, auditor_seed=0, **AUDIT), tmp_path / "plain")
    private = run_audit(AuditSettings(private=True, auditor_seed=0, **AUDIT), tmp_path / "private")

    # Assert: without DP the canaries it trained on lost far more loss, and the audit
    # refutes every epsilon below 1 at 95% confidence; with DP the bound stays below
    # the epsilon the site's ledger recorded.
    assert plain.ledger_epsilon is None
    assert plain.mean_score_in > plain.mean_score_out
    assert plain.bound.epsilon > 1.0, plain.row()
    assert private.ledger_epsilon is not None and private.ledger_epsilon > 0
    assert private.bound.epsilon <= private.ledger_epsilon, private.row()
    assert private.bound.m == plain.bound.m == 64
