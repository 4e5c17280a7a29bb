"""A circuit breaker per bank: closed → open → half-open → closed. Pure (clock injected).

Closed: calls go through; the last ``window`` outcomes are kept. When at least
``min_calls`` of them are known and the failure share reaches ``failure_rate``, the breaker
opens. Open: calls fail fast (the NPCI handler declines with ``U90``/``U91``, NPCI's own
"deemed high response time" declines) until ``cooldown_s`` has passed. Half-open: one probe
call at a time goes through; a success closes the breaker, a failure opens it again.

Each move is told to ``on_move(bank, state)``, if given: the NPCI handler shows it as the
gauge ``upi_switch_breaker_state{bank}`` (:data:`STATE_LEVELS`: 0 closed, 1 half-open,
2 open).

Failures are what says a bank is unwell: timeouts, transport errors, "bank unavailable"
answers. An ordinary decline (insufficient funds, wrong PIN) is a success for the breaker.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum

from core.clock import Clock

__all__ = [
    "STATE_LEVELS",
    "BankBreakers",
    "BreakerMoved",
    "BreakerPolicy",
    "BreakerState",
    "CircuitBreaker",
]


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


# The breaker's state as a number (the gauge's value): the higher, the less goes through.
STATE_LEVELS = {BreakerState.CLOSED: 0, BreakerState.HALF_OPEN: 1, BreakerState.OPEN: 2}
BreakerMoved = Callable[[str, BreakerState], None]


@dataclass(frozen=True)
class BreakerPolicy:
    window: int = 20
    min_calls: int = 10
    failure_rate: float = 0.5
    cooldown_s: float = 10.0


@dataclass
class CircuitBreaker:
    policy: BreakerPolicy
    clock: Clock
    state: BreakerState = BreakerState.CLOSED
    _outcomes: deque[bool] = field(default_factory=deque)
    _opened_at: float = 0.0
    _probe_in_flight: bool = False
    transitions: list[BreakerState] = field(default_factory=list)
    bank: str = ""
    on_move: BreakerMoved | None = None

    def _now(self) -> float:
        return self.clock.now().timestamp()

    def allow(self) -> bool:
        """May a call go through now? (In half-open, only one probe at a time.)"""
        if self.state is BreakerState.OPEN:
            if self._now() - self._opened_at < self.policy.cooldown_s:
                return False
            self._move(BreakerState.HALF_OPEN)
        if self.state is BreakerState.HALF_OPEN:
            if self._probe_in_flight:
                return False
            self._probe_in_flight = True
        return True

    def record(self, ok: bool) -> None:
        if self.state is BreakerState.HALF_OPEN:
            self._probe_in_flight = False
            if ok:
                self._outcomes.clear()
                self._move(BreakerState.CLOSED)
            else:
                self._open()
            return
        if self.state is BreakerState.OPEN:
            return  # a late answer of a call started before the breaker opened
        self._outcomes.append(ok)
        while len(self._outcomes) > self.policy.window:
            self._outcomes.popleft()
        failures = self._outcomes.count(False)
        if (
            len(self._outcomes) >= self.policy.min_calls
            and failures / len(self._outcomes) >= self.policy.failure_rate
        ):
            self._open()

    def _open(self) -> None:
        self._opened_at = self._now()
        self._outcomes.clear()
        self._move(BreakerState.OPEN)

    def _move(self, state: BreakerState) -> None:
        if state is not self.state:
            self.state = state
            self.transitions.append(state)
            if self.on_move is not None:
                self.on_move(self.bank, state)


class BankBreakers:
    """One breaker per bank, created on first use (closed: told to ``on_move`` too)."""

    def __init__(
        self, policy: BreakerPolicy, clock: Clock, on_move: BreakerMoved | None = None
    ) -> None:
        self._policy = policy
        self._clock = clock
        self._on_move = on_move
        self._breakers: dict[str, CircuitBreaker] = {}

    def __getitem__(self, bank: str) -> CircuitBreaker:
        breaker = self._breakers.get(bank)
        if breaker is None:
            breaker = self._breakers[bank] = CircuitBreaker(
                self._policy, self._clock, bank=bank, on_move=self._on_move
            )
            if self._on_move is not None:
                self._on_move(bank, breaker.state)
        return breaker

    def states(self) -> dict[str, BreakerState]:
        return {bank: b.state for bank, b in self._breakers.items()}
