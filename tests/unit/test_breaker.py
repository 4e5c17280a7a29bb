from core.clock import FakeClock
from payments.npci.breaker import BankBreakers, BreakerPolicy, BreakerState, CircuitBreaker

POLICY = BreakerPolicy(window=10, min_calls=4, failure_rate=0.5, cooldown_s=5)


def breaker() -> tuple[CircuitBreaker, FakeClock]:
    clock = FakeClock()
    return CircuitBreaker(POLICY, clock), clock


def test_opens_at_the_failure_rate_once_enough_calls_are_seen():
    b, _ = breaker()
    for ok in (False, False, False):
        assert b.allow()
        b.record(ok)
    assert b.state is BreakerState.CLOSED  # 3 calls < min_calls
    b.allow()
    b.record(True)  # 3 of 4 failed
    assert b.state is BreakerState.OPEN and not b.allow()


def test_ordinary_traffic_with_few_failures_stays_closed():
    b, _ = breaker()
    for i in range(50):
        assert b.allow()
        b.record(i % 5 != 0)  # 20% failures
    assert b.state is BreakerState.CLOSED


def test_half_open_lets_one_probe_and_closes_on_success():
    b, clock = breaker()
    for _ in range(4):
        b.allow()
        b.record(False)
    assert not b.allow()
    clock.advance(5)
    assert b.allow() and b.state is BreakerState.HALF_OPEN
    assert not b.allow()  # a second caller while the probe is out fails fast
    b.record(True)
    assert b.state is BreakerState.CLOSED and b.allow()
    assert b.transitions == [BreakerState.OPEN, BreakerState.HALF_OPEN, BreakerState.CLOSED]


def test_failed_probe_reopens_for_another_cooldown():
    b, clock = breaker()
    for _ in range(4):
        b.allow()
        b.record(False)
    clock.advance(5)
    assert b.allow()
    b.record(False)
    assert b.state is BreakerState.OPEN
    clock.advance(4.9)
    assert not b.allow()
    clock.advance(0.2)
    assert b.allow()


def test_breakers_are_per_bank():
    banks = BankBreakers(POLICY, FakeClock())
    for _ in range(4):
        banks["AXIS"].allow()
        banks["AXIS"].record(False)
    assert banks["AXIS"].state is BreakerState.OPEN
    assert banks["HDFC"].allow()
    assert banks.states() == {"AXIS": BreakerState.OPEN, "HDFC": BreakerState.CLOSED}


def test_the_gauge_follows_each_bank_breaker_closed_open_half_open_closed():
    """``upi_switch_breaker_state{bank}``: 0 closed, 1 half-open, 2 open (SPEC §10)."""
    from prometheus_client import REGISTRY

    from payments.npci_handler import show_breaker_state

    def gauge(bank: str) -> float | None:
        return REGISTRY.get_sample_value("upi_switch_breaker_state", {"bank": bank})

    clock = FakeClock()
    moves: list[tuple[str, BreakerState]] = []

    def seen(bank: str, state: BreakerState) -> None:
        moves.append((bank, state))
        show_breaker_state(bank, state)

    banks = BankBreakers(POLICY, clock, seen)
    assert gauge("GAUGEBANK") is None
    b = banks["GAUGEBANK"]
    assert gauge("GAUGEBANK") == 0  # shown closed from its first use
    for _ in range(4):
        b.allow()
        b.record(False)
    assert gauge("GAUGEBANK") == 2
    assert banks["OTHERBANK"].allow() and gauge("OTHERBANK") == 0  # per bank
    clock.advance(5)
    assert b.allow()
    assert gauge("GAUGEBANK") == 1
    b.record(False)
    assert gauge("GAUGEBANK") == 2
    clock.advance(5)
    b.allow()
    b.record(True)
    assert gauge("GAUGEBANK") == 0
    assert [s for bank, s in moves if bank == "GAUGEBANK"] == [
        BreakerState.CLOSED,
        BreakerState.OPEN,
        BreakerState.HALF_OPEN,
        BreakerState.OPEN,
        BreakerState.HALF_OPEN,
        BreakerState.CLOSED,
    ]
