"""Exit codes of the commands that run a cycle (``fedretrain simulate``, ``fedretrain
coordinator run --wait``), so that a script or a scheduler can tell a published version from
the ways a cycle ends with nothing published. The README lists them ("Exit codes").
"""

from __future__ import annotations

from typing import Any

OK = 0  # the cycle published a version, or left one pending (approval, or held by its staged rollout)
FAILED = 1  # the Flower run failed (its ServerApp crashed or was stopped)
ERROR = 2  # a bad argument, file or setting, or a refused command: nothing ran
ABORTED = 3  # a round lost its quorum (sites refused, fell silent or left): nothing published
GATE_REFUSED = 4  # the cycle ran, and the publish gate refused the candidate: nothing published
BUDGET_REFUSED = 5  # a round lost its quorum because sites refused for their privacy budget
ROLLED_BACK = 6  # the gate passed, the canaries' live traffic did not: rolled back there, nothing published

# The error code of a site's PrivacyBudgetExceeded refusal (client/handlers.py).
BUDGET_CODE = 4102


def cycle_exit_code(summary: dict[str, Any]) -> int:
    """The exit code for a cycle's ``summary.json`` (an empty dict: a simulated scenario, OK)."""
    if summary.get("aborted"):
        refusals = summary.get("refusals") or []
        last = max((r.get("round", 0) for r in refusals), default=0)
        codes = {r.get("code") for r in refusals if r.get("round", 0) == last}
        return BUDGET_REFUSED if codes == {BUDGET_CODE} else ABORTED
    gate = summary.get("gate")
    if gate and gate.get("decision") not in ("publish", "pending_approval"):
        return GATE_REFUSED
    if (summary.get("rollout") or {}).get("decision") == "rollback":
        return ROLLED_BACK
    return OK
