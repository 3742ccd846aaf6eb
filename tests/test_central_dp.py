"""A cycle with client-level DP at the coordinator: its epsilon in the summary and in the signed manifest.

A real cycle (server/cycle/run.py) of two virtual sites on the embedded model, answered in
this process by the sites' real ClientApp (tests/test_ready.py's ``cycle``).
"""

from __future__ import annotations

import json

import pytest
from opacus.accountants import RDPAccountant
from test_ready import cycle

from server.cycle.report import format_summary


@pytest.mark.usefixtures("instruction_identity", "keep_global_random_state")
def test_a_cycle_with_central_dp_records_the_coordinators_epsilon(tmp_path):
    # Prepare: fixed clipping at a norm of 1 with sigma 1e-4 (noise of 5e-5 on the mean: next to
    # nothing), a quorum of 2, one round: the cycle publishes as it would without, and the
    # point is the accounting. The gate rests on the validation set.
    summary, federation = cycle(
        tmp_path,
        lambda root: None,
        (
            "strategy.central_dp.clipping=fixed",
            "strategy.max_update_norm_ratio=null",
            "strategy.central_dp.noise_multiplier=0.0001",
            "strategy.central_dp.clipping_norm=1",
            "gate.require_federated_confidence=false",
        ),
    )

    # Assert: one Gaussian release a round, no amplification: opacus' RDP at delta 1e-5.
    accountant = RDPAccountant()
    accountant.history = [(0.0001, 1.0, 1)]
    expected = accountant.get_epsilon(delta=1e-5)
    central = summary["central_dp"]
    assert central["epsilon"] == pytest.approx(expected) and central["quorum"] == 2
    assert "coordinator (central DP)" in format_summary(summary)
    assert summary["published_version"] == 1, summary["gate"]
    manifest = json.loads(
        (federation / "coordinator" / "registry" / "versions" / "000001" / "manifest.json").read_text()
    )
    assert manifest["run"]["central_dp"]["epsilon"] == pytest.approx(expected)
    assert all(site["epsilon"] > 0 for site in manifest["sites"].values())  # the sites' own, beside it
