"""The exit status of a command that runs a cycle, from the cycle's summary."""

from __future__ import annotations

import pytest

from cli.exits import ABORTED, BUDGET_CODE, BUDGET_REFUSED, GATE_REFUSED, OK, ROLLED_BACK, cycle_exit_code
from client.handlers import ERROR_CODES
from fedretrain.errors import PrivacyBudgetExceeded


def refusal(site: str, server_round: int, code: int | None) -> dict:
    return {"node_id": 1, "site_id": site, "reason": "...", "code": code, "round": server_round}


@pytest.mark.parametrize(
    ("summary", "expected"),
    [
        ({"gate": {"decision": "publish"}, "published_version": 1}, OK),
        ({"gate": {"decision": "pending_approval"}, "pending_version": 2}, OK),
        ({"gate": {"decision": "refuse"}, "published_version": None}, GATE_REFUSED),
        # A staged rollout: rolled back at the canaries, or held there (pending, like an approval).
        (
            {"gate": {"decision": "publish"}, "published_version": None, "rollout": {"decision": "rollback"}},
            ROLLED_BACK,
        ),
        ({"gate": {"decision": "publish"}, "pending_version": 3, "rollout": {"decision": "hold"}}, OK),
        # The round that lost the quorum: every refusal in it was for the budget.
        (
            {"aborted": "the quorum is 2", "refusals": [refusal("a", 1, 4101), refusal("b", 2, 4102)]},
            BUDGET_REFUSED,
        ),
        ({"aborted": "the quorum is 2", "refusals": [refusal("a", 2, 4101), refusal("b", 2, 4102)]}, ABORTED),
        ({"aborted": "2 site(s) connected after 20 s, the quorum is 3", "refusals": []}, ABORTED),
        ({}, OK),  # a simulated scenario writes no cycle summary of its own
    ],
)
def test_each_way_a_cycle_ends_has_its_own_exit_status(summary, expected):
    assert cycle_exit_code(summary) == expected


def test_the_budget_code_is_the_one_sites_send():
    assert BUDGET_CODE == ERROR_CODES[PrivacyBudgetExceeded]
