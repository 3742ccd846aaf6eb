"""Privacy accounting pinned to values published by opacus' own tests.

Golden values (opacus tests/accountants_test.py): sigma=1.5, q=0.04 over
int(90 / 0.04) = 2250 steps at delta=1e-5 gives RDP epsilon 7.32911117143;
over int(90 // 0.04) = 2249 steps PRV gives 6.777395712150674; and the sigma for
epsilon=8 over the same 90 epochs (2250 steps) is 1.416.
"""

from __future__ import annotations

import math

import pytest

from fedretrain.privacy.accountants import ACCOUNTANTS, accountant_class
from fedretrain.privacy.accounting import epsilon_for_history, noise_multiplier_for_target


def test_rdp_epsilon_matches_opacus_golden_value() -> None:
    # Prepare: opacus' RDP test case.
    history = [(1.5, 0.04, 2250)]

    # Execute
    epsilon = epsilon_for_history(history, delta=1e-5, accountant="rdp")

    # Assert
    assert epsilon == pytest.approx(7.32911117143, abs=1e-7)


def test_prv_epsilon_matches_opacus_golden_value() -> None:
    # Prepare: opacus' PRV test case steps int(90 // 0.04) = 2249 times.
    history = [(1.5, 0.04, 2249)]

    # Execute
    epsilon = epsilon_for_history(history, delta=1e-5, accountant="prv")

    # Assert
    assert epsilon == pytest.approx(6.777395712150674, abs=1e-4)


def test_rdp_with_kept_per_step_curves_is_opacus_rdp_to_the_last_bit() -> None:
    # A ledger's mixed history (train rounds, evaluations, a release without sampling),
    # asked twice so the second answer comes from the kept curves.
    from opacus.accountants import RDPAccountant

    history = [(1.1, 0.125, 12), (0.9, 0.1, 24), (8.0, 1.0, 1), (1.1, 0.125, 7)]
    direct = RDPAccountant()
    direct.history = [(1.1, 0.125, 19), (0.9, 0.1, 24), (8.0, 1.0, 1)]

    first, second = (epsilon_for_history(history, delta=1e-5) for _ in range(2))

    assert first == second == direct.get_epsilon(delta=1e-5)


def test_split_history_composes_to_the_same_epsilon_as_one_entry() -> None:
    # Prepare: the golden run of 2250 steps, cut into three rounds in mixed order.
    split = [(1.5, 0.04, 1000), (1.5, 0.04, 250), (1.5, 0.04, 1000)]

    # Execute
    epsilon = epsilon_for_history(split, delta=1e-5)

    # Assert: composition only counts steps per (sigma, q), so it is the golden value.
    assert epsilon == pytest.approx(7.32911117143, abs=1e-7)


def test_empty_history_spends_nothing() -> None:
    # Execute / Assert
    assert epsilon_for_history([], delta=1e-5) == 0.0
    assert epsilon_for_history([(1.0, 0.1, 0)], delta=1e-5, accountant="prv") == 0.0


@pytest.mark.parametrize("accountant", sorted(ACCOUNTANTS))
def test_steps_without_noise_have_no_finite_epsilon(accountant: str) -> None:
    # Prepare: sigma = 0 means the clipped gradients are released as they are.
    history = [(1.0, 0.1, 10), (0.0, 0.1, 1)]

    # Execute
    epsilon = epsilon_for_history(history, delta=1e-5, accountant=accountant)

    # Assert
    assert epsilon == math.inf


def test_more_steps_always_cost_more() -> None:
    # Prepare
    base = [(1.0, 0.05, 100)]

    # Execute
    before = epsilon_for_history(base, delta=1e-5)
    after = epsilon_for_history([*base, (2.0, 0.05, 10)], delta=1e-5)

    # Assert
    assert 0 < before < after


@pytest.mark.parametrize("name", ["gdp", "RDP", ""])
def test_unknown_accountant_is_refused_with_the_valid_names(name: str) -> None:
    # gdp is opacus' CLT approximation, not an upper bound: deliberately not offered.
    with pytest.raises(ValueError, match="valid accountants: prv, rdp"):
        accountant_class(name)
    with pytest.raises(ValueError, match="valid accountants: prv, rdp"):
        epsilon_for_history([(1.0, 0.1, 1)], delta=1e-5, accountant=name)
    with pytest.raises(ValueError, match="valid accountants: prv, rdp"):
        noise_multiplier_for_target(1.0, 1e-5, 0.1, 10, accountant=name)


@pytest.mark.parametrize("delta", [0.0, 1.0, -1e-5])
def test_delta_outside_the_open_unit_interval_is_refused(delta: float) -> None:
    with pytest.raises(ValueError, match="delta"):
        epsilon_for_history([(1.0, 0.1, 1)], delta=delta)


def test_noise_multiplier_matches_opacus_golden_value() -> None:
    # Prepare: epsilon 8 over 90 epochs at q=0.04, i.e. int(90 / 0.04) = 2250 steps.
    # Execute
    sigma = noise_multiplier_for_target(8.0, 1e-5, sample_rate=0.04, steps=2250)

    # Assert: opacus asserts assertAlmostEqual(sigma, 1.416, places=4).
    assert round(sigma - 1.416, 4) == 0


@pytest.mark.parametrize(
    ("target", "sample_rate", "steps", "accountant"),
    [(1.0, 0.01, 300, "rdp"), (4.0, 0.05, 100, "rdp"), (1.0, 0.01, 300, "prv")],
)
def test_noise_for_target_stays_within_and_close_to_the_target(
    target: float, sample_rate: float, steps: int, accountant: str
) -> None:
    # Execute
    sigma = noise_multiplier_for_target(target, 1e-5, sample_rate, steps, accountant)
    spent = epsilon_for_history([(sigma, sample_rate, steps)], 1e-5, accountant)

    # Assert: never above the target; opacus' search stops within 0.01 of it.
    assert target - 0.01 <= spent <= target


def test_noise_for_target_refuses_bad_inputs() -> None:
    with pytest.raises(ValueError, match="target_epsilon"):
        noise_multiplier_for_target(0.0, 1e-5, 0.1, 10)
    with pytest.raises(ValueError, match="sample_rate"):
        noise_multiplier_for_target(1.0, 1e-5, 1.5, 10)
    with pytest.raises(ValueError, match="steps"):
        noise_multiplier_for_target(1.0, 1e-5, 0.1, 0)
