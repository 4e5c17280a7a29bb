"""Sandbox payers (SPEC §5): VPAs whose local part fixes the outcome, whatever the handle.

The switch simulator gives the *switch* sandbox payers their fixed answers; the fraud
context lets them through (their outcome is the switch's to decide, and merchants test
their integration with them) and has its own two, which always step up or block, so that
the verification flow can be tried end to end.
"""

from __future__ import annotations

__all__ = ["FRAUD_SANDBOX_PAYERS", "SWITCH_SANDBOX_PAYERS", "sandbox_local_part"]

SWITCH_SANDBOX_PAYERS = frozenset(
    {
        "success",
        "insufficient",
        "wrongpin",
        "timeout-success",
        "timeout-failure",
        "bank-down",
        "dispute",
        "late-success",  # docs/npci.md: answered U30, debited late, reversed at settlement
    }
)
# Local part -> the fraud decision it always gets.
FRAUD_SANDBOX_PAYERS = {"fraud-stepup": "STEP_UP", "fraud-block": "BLOCK"}


def sandbox_local_part(vpa: str) -> str | None:
    local = vpa.split("@", 1)[0].lower()
    if local in SWITCH_SANDBOX_PAYERS or local in FRAUD_SANDBOX_PAYERS:
        return local
    return None
