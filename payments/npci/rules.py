"""NPCI's API rules for check-status, and the engine's plan within them (SPEC §5).

NPCI's circular of 21 May 2025, in force from 1 August 2025 (as reported), limits the
check-status API (ReqChkTxn) per transaction:

* the first check-status comes at least 90 s after the transaction (its pay request);
* at most 3 check-status calls within 2 hours.

:class:`CheckStatusRule` is that rule; the mock switch enforces it (a refused call is a
rate-limit answer, counted in ``npci_mock_api_violations_total``). :class:`CheckStatusPlan`
is when the engine's deemed resolver asks, checked against the rule when it is built, so
that a plan that would break it cannot be configured. Both are pure.

``UPI_NPCI_TIME_SCALE`` multiplies every NPCI timer and window at once: :meth:`scaled`
gives the same rule or plan on a faster (or slower) clock, so tests run NPCI's real
timetable, never a relaxed one.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum

__all__ = [
    "CHECK_STATUS_RULE",
    "DEFAULT_CHECK_STATUS_PLAN_S",
    "CheckStatusPlan",
    "CheckStatusRule",
    "Refusal",
    "plan_problem",
]

# When the resolver asks, in seconds after the pay leg closed: 90 s, 5 min, 15 min; then
# it reverses. Three calls, all within 2 hours.
DEFAULT_CHECK_STATUS_PLAN_S = (90.0, 300.0, 900.0)


class Refusal(StrEnum):
    """Why the switch refused a check-status."""

    TOO_EARLY = "too_early"  # before first_after_s after the pay request
    OVER_BUDGET = "over_budget"  # max_calls already answered within window_s


@dataclass(frozen=True)
class CheckStatusRule:
    """NPCI's limits on check-status for one transaction (as reported)."""

    first_after_s: float = 90.0
    max_calls: int = 3
    window_s: float = 7200.0

    def scaled(self, scale: float) -> CheckStatusRule:
        return CheckStatusRule(self.first_after_s * scale, self.max_calls, self.window_s * scale)

    def refusal(
        self, requested_at: datetime | None, answered: Sequence[datetime], now: datetime
    ) -> Refusal | None:
        """None if a check-status at ``now`` is allowed, else why not.

        ``requested_at``: when the switch received the transaction's pay request (None: it
        never did; there is nothing to count the 90 s from). ``answered``: the earlier
        check-status calls of this transaction the switch answered (refused ones do not
        count: they were not served).
        """
        if requested_at is not None and now < requested_at + timedelta(seconds=self.first_after_s):
            return Refusal.TOO_EARLY
        since = now - timedelta(seconds=self.window_s)
        if sum(1 for at in answered if at >= since) >= self.max_calls:
            return Refusal.OVER_BUDGET
        return None


CHECK_STATUS_RULE = CheckStatusRule()


@dataclass(frozen=True)
class CheckStatusPlan:
    """When the deemed resolver asks check-status: ``offsets_s`` after the pay leg closed.

    The pay leg closes ``pay_timeout_s`` after the payment was submitted: the latest
    moment its request can have reached the switch, so the first check is at least
    ``first_after_s`` after the pay request whenever that arrived. Each later check is
    planned from the one before (``offsets_s[k] - offsets_s[k-1]`` after it), so a late
    check never brings the next one closer. After the last, the budget is spent: reverse.
    """

    offsets_s: tuple[float, ...] = DEFAULT_CHECK_STATUS_PLAN_S
    rule: CheckStatusRule = CHECK_STATUS_RULE

    def __post_init__(self) -> None:
        problem = plan_problem(self.offsets_s, self.rule)
        if problem is not None:
            raise ValueError(problem)

    def scaled(self, scale: float) -> CheckStatusPlan:
        return CheckStatusPlan(tuple(o * scale for o in self.offsets_s), self.rule.scaled(scale))

    @property
    def calls(self) -> int:
        return len(self.offsets_s)

    def first_check_at(self, pay_leg_closed_at: datetime) -> datetime:
        return pay_leg_closed_at + timedelta(seconds=self.offsets_s[0])

    def next_check_at(self, calls_made: int, last_call_at: datetime) -> datetime | None:
        """After ``calls_made`` check-status calls (the last at ``last_call_at``), when to
        ask again; None: the budget is spent, reverse."""
        if calls_made >= self.calls:
            return None
        if calls_made <= 0:
            raise ValueError("the first check is planned from the pay leg")
        gap = self.offsets_s[calls_made] - self.offsets_s[calls_made - 1]
        return last_call_at + timedelta(seconds=gap)


def plan_problem(
    offsets_s: Sequence[float], rule: CheckStatusRule = CHECK_STATUS_RULE
) -> str | None:
    """What is wrong with a plan of check-status times under ``rule``; None if nothing."""
    if not offsets_s:
        return "needs at least one check-status time"
    if len(offsets_s) > rule.max_calls:
        return f"at most {rule.max_calls} check-status calls (NPCI's limit)"
    if offsets_s[0] < rule.first_after_s:
        return f"the first check-status must be at least {rule.first_after_s:g} s (NPCI's rule)"
    if any(b <= a for a, b in itertools.pairwise(offsets_s)):
        return "check-status times must increase"
    return None
