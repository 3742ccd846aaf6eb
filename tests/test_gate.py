"""The publish gate on hand-made scores: refuses worse, equal-within-margin and site-regressing
candidates, passes a clearly better one."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedretrain.config.schema import GateConfig
from fedretrain.training.evaluate import LossStats
from server.cycle.gate import PENDING, PUBLISH, REFUSE, decide, paired_bootstrap, pooled_interval
from strategies.validation import SiteEvaluation

POLICY = GateConfig(margin=0.05, confidence=0.95, bootstrap_samples=1000, site_tolerance=0.02, min_sites=2)


def stats(losses, tokens=None) -> LossStats:
    tokens = tokens or [10] * len(losses)
    loss = sum(loss * t for loss, t in zip(losses, tokens, strict=True)) / sum(tokens)
    return LossStats(
        loss=loss, tokens=sum(tokens), examples=len(losses), example_losses=tuple(losses), example_tokens=tuple(tokens)
    )


def site(site_id, base, cand, n=50, spread=0.05, sum_std=0.0) -> SiteEvaluation:
    # n records whose differences are (cand - base) +/- spread, half each way:
    # sum = n * d, sum of squares = n * (d^2 + spread^2); sum_std: the site's noise on the sum
    d = cand - base
    return SiteEvaluation(site_id, n, diff_sum=n * d, diff_sumsq=n * (d * d + spread * spread), sum_std=sum_std)


RNG = np.random.default_rng(7)
BASE = [float(x) for x in 5.0 + RNG.normal(0, 0.3, 200)]


def test_clearly_better_candidate_is_published():
    # Every record 0.5 nats better; both sites improve
    cand = [b - 0.5 for b in BASE]
    result = decide(POLICY, stats(BASE), stats(cand), [site("a", 5.0, 4.6), site("b", 5.2, 4.9)], seed=0)

    assert result.decision == PUBLISH
    assert result.figures["improvement"] == pytest.approx(0.5)
    # A constant shift has a zero-width bootstrap interval at 0.5
    assert result.figures["ci_low"] == pytest.approx(0.5) and result.figures["ci_high"] == pytest.approx(0.5)
    assert result.figures["worst_site"] == "b" and result.figures["worst_site_change"] == pytest.approx(-0.3)
    assert all(result.figures["checks"].values())


def test_worse_candidate_is_refused_with_its_numbers():
    cand = [b + 0.2 for b in BASE]
    result = decide(POLICY, stats(BASE), stats(cand), [site("a", 5.0, 5.2), site("b", 5.0, 5.1)], seed=0)

    assert result.decision == REFUSE
    assert result.figures["improvement"] == pytest.approx(-0.2)
    text = " ".join(result.reasons)
    assert "improved by -0.2000, less than the margin 0.0500" in text
    assert "site a: held-out loss rises by at least 0.2000 (beyond its noise), more than the tolerance 0.0200" in text


def test_improvement_within_the_margin_is_refused():
    # 0.03 better everywhere: real (interval above 0) but under the 0.05 margin
    cand = [b - 0.03 for b in BASE]
    result = decide(POLICY, stats(BASE), stats(cand), [site("a", 5.0, 4.97), site("b", 5.0, 4.97)], seed=0)

    assert result.decision == REFUSE
    assert result.figures["checks"] == {
        "margin": False,
        "confidence": True,
        "federated": True,
        "sites": True,
        "coverage": True,
    }


def test_better_on_average_but_one_site_regresses_is_refused():
    cand = [b - 0.3 for b in BASE]
    sites = [site("a", 5.0, 4.5), site("b", 5.0, 4.6), site("c", 5.0, 5.05)]

    result = decide(POLICY, stats(BASE), stats(cand), sites, seed=0)

    assert result.decision == REFUSE
    assert result.figures["worst_site"] == "c"
    assert result.figures["worst_site_change"] == pytest.approx(0.05)
    assert result.reasons == (
        "site c: held-out loss rises by at least 0.0500 (beyond its noise), more than the tolerance 0.0200",
    )


def test_a_site_rise_within_its_noise_does_not_refuse():
    # Site c's change +0.05 with noise std 2.5 on its sum of 50 records: std 0.05 on the mean,
    # so the lower end 0.05 - 1.96 * 0.05 = -0.048 is within the tolerance 0.02.
    cand = [b - 0.3 for b in BASE]
    sites = [site("a", 5.0, 4.5), site("b", 5.0, 4.6), site("c", 5.0, 5.05, sum_std=2.5)]

    result = decide(POLICY, stats(BASE), stats(cand), sites, seed=0)

    assert result.decision == PUBLISH
    assert result.figures["sites"]["c"]["change_noise_std"] == pytest.approx(0.05)


def test_noisy_improvement_whose_interval_spans_zero_is_refused():
    # Half the records 1.0 better, half 0.9 worse: mean +0.05 (= margin), but the interval spans 0
    cand = [b - 1.0 if i % 2 else b + 0.9 for i, b in enumerate(BASE)]
    result = decide(POLICY, stats(BASE), stats(cand), [site("a", 5, 4.9), site("b", 5, 4.9)], seed=0)

    assert result.figures["improvement"] == pytest.approx(0.05)
    assert result.figures["ci_low"] < 0 < result.figures["ci_high"]
    assert result.decision == REFUSE and not result.figures["checks"]["confidence"]


def test_sites_whose_noised_sums_cannot_confirm_the_gain_refuse_unless_the_policy_rests_on_validation():
    # Prepare: clearly better on validation; at the sites 0.1 better but each sum noised with
    # std 10 over 50 records (noise std of the pooled mean ~0.14): the pooled interval spans 0.
    cand = [b - 0.5 for b in BASE]
    sites = [site("a", 5.0, 4.9, sum_std=10.0), site("b", 5.0, 4.9, sum_std=10.0)]

    # Execute
    strict = decide(POLICY, stats(BASE), stats(cand), sites, seed=0)
    on_validation = GateConfig(margin=0.05, min_sites=2, require_federated_confidence=False)
    lenient = decide(on_validation, stats(BASE), stats(cand), sites, seed=0)

    # Assert
    assert strict.decision == REFUSE and not strict.figures["checks"]["federated"]
    assert strict.figures["federated"]["ci_low"] < 0 < strict.figures["federated"]["ci_high"]
    assert lenient.decision == PUBLISH and lenient.figures["checks"]["federated"]


def test_too_few_sites_and_approval_policy():
    cand = [b - 0.5 for b in BASE]
    one_site = decide(POLICY, stats(BASE), stats(cand), [site("a", 5.0, 4.6)], seed=0)
    approval = GateConfig(margin=0.05, min_sites=1, require_approval=True)
    pending = decide(approval, stats(BASE), stats(cand), [site("a", 5.0, 4.6)], seed=0)

    assert one_site.decision == REFUSE and "1 site(s) evaluated the candidate; the policy needs 2" in one_site.reasons
    assert pending.decision == PENDING and pending.passed
    assert "fedretrain registry approve VERSION" in pending.reasons[-1]


def test_bootstrap_weights_records_by_tokens():
    # Record 1 (90 tokens) improves by 1.0, record 2 (10 tokens) worsens by 1.0: the
    # token-weighted improvement is (90 - 10) / 100 = 0.8; resamples range over [-1, 1].
    base, cand = stats([3.0, 3.0], [90, 10]), stats([2.0, 4.0], [90, 10])
    low, high = paired_bootstrap(base, cand, 0.95, 2000, seed=1)

    assert base.loss - cand.loss == pytest.approx(0.8)
    assert -1.0 <= low < 0.8 <= high <= 1.0


def test_pooled_interval_from_sums_matches_the_records():
    # Records' differences: site a [-0.1, -0.3], site b [-0.2, 0.0, -0.4]
    diffs = np.array([-0.1, -0.3, -0.2, 0.0, -0.4])
    sites = [
        SiteEvaluation("a", 2, diff_sum=-0.4, diff_sumsq=0.1, sum_std=0.0),
        SiteEvaluation("b", 3, diff_sum=-0.6, diff_sumsq=0.2, sum_std=0.0),
    ]

    pooled = pooled_interval(sites, 0.95)

    half = 1.959964 * diffs.std(ddof=1) / math.sqrt(5)
    assert pooled["improvement"] == pytest.approx(0.2)
    assert pooled["ci_low"] == pytest.approx(0.2 - half, rel=1e-5)
    assert pooled["ci_high"] == pytest.approx(0.2 + half, rel=1e-5)
    assert pooled_interval([], 0.95) is None


def test_pooled_interval_widens_by_the_sites_noise():
    # The same records, each site's sum noised with std 0.3 and 0.4: the mean's noise variance
    # is (0.09 + 0.16) / 5^2 = 0.01, added to the records' var / n.
    diffs = np.array([-0.1, -0.3, -0.2, 0.0, -0.4])
    sites = [
        SiteEvaluation("a", 2, diff_sum=-0.4, diff_sumsq=0.1, sum_std=0.3),
        SiteEvaluation("b", 3, diff_sum=-0.6, diff_sumsq=0.2, sum_std=0.4),
    ]

    pooled = pooled_interval(sites, 0.95)

    half = 1.959964 * math.sqrt(diffs.var(ddof=1) / 5 + 0.01)
    assert pooled["ci_low"] == pytest.approx(0.2 - half, rel=1e-5)


def test_a_robustness_failure_refuses_an_otherwise_clear_candidate_and_is_named():
    cand = [b - 0.5 for b in BASE]
    sites = [site("a", 5.0, 4.6), site("b", 5.2, 4.9)]
    failing = {"failures": ["robustness: on injection the candidate's loss is 7.1 (+0.3 nats, tolerance 0.1)"]}
    result = decide(POLICY, stats(BASE), stats(cand), sites, seed=0, robustness=failing)
    assert result.decision == REFUSE and result.figures["checks"]["robustness"] is False
    assert result.reasons == tuple(failing["failures"]) and result.figures["robustness"] is failing
    # Passing figures add the check and publish; without the suite there is no check at all.
    passed = decide(POLICY, stats(BASE), stats(cand), sites, seed=0, robustness={"failures": []})
    assert passed.decision == PUBLISH and passed.figures["checks"]["robustness"] is True
    assert "robustness" not in decide(POLICY, stats(BASE), stats(cand), sites, seed=0).figures["checks"]
