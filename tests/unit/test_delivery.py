"""Retry, dead-letter and ordering rules shared by both bus backends, driven through the
in-process bus with an in-memory dead-letter sink."""

import asyncio
from collections.abc import Sequence
from datetime import UTC, datetime

import asyncpg

from core.bus.base import DeadLetter, Subscription
from core.bus.delivery import RetryPolicy
from core.bus.memory import MemoryBus
from core.errors import PoisonMessage, StorageError
from core.events import Envelope, PaymentInitiated

FAST = RetryPolicy(max_attempts=3, base_delay=0.001, max_delay=0.002)


class Letters:
    def __init__(self) -> None:
        self.items: list[DeadLetter] = []

    async def dead_letter(self, letter: DeadLetter) -> None:
        self.items.append(letter)


def env(n: int, key: str) -> Envelope:
    event = PaymentInitiated(
        transaction_id=f"UPI{n}",
        merchant_id="m",
        merchant_order_id=str(n),
        payer_vpa="alice@ybl",
        payee_vpa="bob@ybl",
        amount_paise=n + 1,
        initiated_at=datetime(2026, 1, 1, tzinfo=UTC),
    )
    return Envelope.wrap(event, partition_key=key)


async def test_same_key_in_order_different_keys_concurrently():
    seen: dict[str, list[int]] = {}
    running = 0
    peak = 0

    async def handler(e: Envelope) -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.005)
        seen.setdefault(e.partition_key, []).append(e.payload["amount_paise"])
        running -= 1

    bus = MemoryBus(Letters(), FAST)
    bus.subscribe(Subscription("c", ("payments",), handler))
    batch = [env(i, f"k{i % 4}") for i in range(40)]
    await bus.publish(batch)
    await bus.stop()
    assert sorted(seen) == ["k0", "k1", "k2", "k3"]
    for key, amounts in seen.items():
        assert amounts == sorted(amounts), key
    assert sum(len(v) for v in seen.values()) == 40
    assert peak > 1


async def test_transient_failure_is_retried_then_succeeds():
    calls = 0

    async def flaky(e: Envelope) -> None:
        nonlocal calls
        calls += 1
        if calls < 3:
            raise ConnectionError("switch hiccup")

    letters = Letters()
    bus = MemoryBus(letters, FAST)
    bus.subscribe(Subscription("c", ("payments",), flaky))
    await bus.publish([env(1, "k")])
    await bus.stop()
    assert calls == 3 and letters.items == []


async def test_persistent_failure_is_dead_lettered_with_reason_and_next_one_runs():
    handled: list[str] = []

    async def handler(e: Envelope) -> None:
        if e.transaction_id == "UPI1":
            raise RuntimeError("cannot handle this one")
        handled.append(e.transaction_id or "")

    letters = Letters()
    bus = MemoryBus(letters, FAST)
    bus.subscribe(Subscription("c", ("payments",), handler))
    await bus.publish([env(1, "k"), env(2, "k")])
    await bus.stop()
    assert handled == ["UPI2"]
    [letter] = letters.items
    assert letter.attempts == 3 and "cannot handle this one" in letter.reason
    assert letter.event_type == "PaymentInitiated" and letter.consumer == "c"
    assert Envelope.from_bytes(letter.raw).transaction_id == "UPI1"


async def test_poison_is_not_retried():
    calls = 0

    async def handler(e: Envelope) -> None:
        nonlocal calls
        calls += 1
        raise PoisonMessage("bad payload")

    letters = Letters()
    bus = MemoryBus(letters, FAST)
    bus.subscribe(Subscription("c", ("payments",), handler))
    await bus.publish([env(1, "k")])
    await bus.stop()
    assert calls == 1 and letters.items[0].attempts == 1


async def test_event_type_filter_and_topic_routing():
    got: list[str] = []

    async def handler(e: Envelope) -> None:
        got.append(e.event_type)

    bus = MemoryBus(Letters(), FAST)
    bus.subscribe(Subscription("c", ("payments",), handler, event_types=frozenset({"Other"})))
    bus.subscribe(Subscription("d", ("fraud",), handler))
    await bus.publish([env(1, "k")])
    await bus.stop()
    assert got == []


async def test_batches_keep_each_keys_order_across_publishes_and_take_what_is_waiting():
    seen: list[tuple[str, int]] = []
    sizes: list[int] = []
    gate = asyncio.Event()

    async def batch(es) -> None:
        await gate.wait()
        sizes.append(len(es))
        seen.extend((e.partition_key, e.payload["amount_paise"]) for e in es)

    async def one(e: Envelope) -> None:
        raise AssertionError("the batch handler takes them")

    bus = MemoryBus(Letters(), FAST)
    bus.subscribe(Subscription("c", ("payments",), one, batch_handler=batch))
    await bus.start()
    published = [asyncio.create_task(bus.publish([env(i, f"k{i % 3}") for i in range(10)]))]
    await asyncio.sleep(0.01)  # the consumer took the first publish and waits at the gate
    published += [
        asyncio.create_task(bus.publish([env(10 * p + i, f"k{i % 3}") for i in range(10)]))
        for p in range(1, 5)
    ]
    await asyncio.sleep(0.01)
    gate.set()
    await asyncio.gather(*published)
    await bus.stop()
    assert len(seen) == 50
    for key in ("k0", "k1", "k2"):
        amounts = [a for k, a in seen if k == key]
        assert amounts == sorted(amounts), key
    assert sizes == [10, 40]  # what waited behind the first batch went as one


async def test_parallel_batches_let_a_slow_batch_be_overtaken_and_one_batch_is_not():
    release_first = asyncio.Event()
    done: list[int] = []

    async def batch(es) -> None:
        first = es[0].payload["amount_paise"]
        if first == 1:
            await release_first.wait()
        done.append(first)

    async def one(e: Envelope) -> None:
        raise AssertionError("the batch handler takes them")

    for parallel, overtaken in ((2, True), (1, False)):
        done.clear()
        release_first.clear()
        bus = MemoryBus(Letters(), FAST, max_batch=1)
        sub = Subscription("c", ("payments",), one, batch_handler=batch, parallel_batches=parallel)
        bus.subscribe(sub)
        await bus.start()
        slow = asyncio.create_task(bus.publish([env(0, "a")]))  # amount 1
        fast = asyncio.create_task(bus.publish([env(1, "b")]))  # amount 2
        await asyncio.sleep(0.05)
        assert (done == [2]) is overtaken
        release_first.set()
        await asyncio.gather(slow, fast)
        await bus.stop()
        assert sorted(done) == [1, 2]


async def test_a_poison_event_in_a_batch_is_dead_lettered_alone_and_the_rest_applied():
    applied: list[str] = []
    batch_calls = 0

    def check(e: Envelope) -> None:
        if e.transaction_id == "UPI3":
            raise PoisonMessage("cannot decode this one")

    async def batch(es) -> None:
        nonlocal batch_calls
        batch_calls += 1
        for e in es:
            check(e)
        applied.extend(e.transaction_id or "" for e in es)

    async def one(e: Envelope) -> None:
        check(e)
        applied.append(e.transaction_id or "")

    letters = Letters()
    bus = MemoryBus(letters, FAST)
    bus.subscribe(Subscription("c", ("payments",), one, batch_handler=batch))
    await bus.publish([env(i, f"k{i}") for i in range(6)])
    await bus.stop()
    assert applied == ["UPI0", "UPI1", "UPI2", "UPI4", "UPI5"]
    assert batch_calls == 1  # a poison batch is not retried as a whole
    [letter] = letters.items
    assert letter.attempts == 1 and "cannot decode" in letter.reason


async def test_database_outage_is_waited_out_not_dead_lettered():
    # More failures than max_attempts, all saying the database is unavailable: an outage
    # is no fault of the event, so it is never dead-lettered, and applied once it is back.
    failures = {"single": 7, "batch": 7}
    applied: dict[str, list[int]] = {"single": [], "batch": []}

    async def single(e: Envelope) -> None:
        if failures["single"]:
            failures["single"] -= 1
            raise StorageError("database unreachable: [Errno 111] Connection refused")
        applied["single"].append(e.payload["amount_paise"])

    async def batch(envelopes: Sequence[Envelope]) -> None:
        if failures["batch"]:
            failures["batch"] -= 1
            # A driver error that escaped the storage layer counts the same.
            raise asyncpg.CannotConnectNowError("the database system is starting up")
        applied["batch"].extend(e.payload["amount_paise"] for e in envelopes)

    letters = Letters()
    bus = MemoryBus(letters, FAST)
    bus.subscribe(Subscription("one", ("payments",), single))
    bus.subscribe(Subscription("many", ("payments",), batch, batch_handler=batch))
    await bus.publish([env(1, "k"), env(2, "k")])
    await bus.stop()
    assert letters.items == []
    assert applied == {"single": [2, 3], "batch": [2, 3]}
    assert failures == {"single": 0, "batch": 0}


async def test_an_ordinary_error_still_dead_letters_after_max_attempts():
    async def broken(envelopes: Sequence[Envelope]) -> None:
        raise ValueError("a bug, not an outage")

    letters = Letters()
    bus = MemoryBus(letters, FAST)
    bus.subscribe(Subscription("c", ("payments",), broken, batch_handler=broken))
    await bus.publish([env(1, "k")])
    await bus.stop()
    assert [(d.consumer, d.attempts) for d in letters.items] == [("c", 3)]


async def test_a_consumers_dead_letters_are_exported_at_zero_from_its_start():
    # So that Prometheus's increase() sees the first dead letter (UpiDeadLetters).
    from prometheus_client import generate_latest

    async def handler(e: Envelope) -> None:
        return None

    bus = MemoryBus(Letters(), FAST)
    bus.subscribe(Subscription("zero-at-start", ("payments",), handler))
    await bus.stop()
    assert b'upi_dead_letters_total{consumer="zero-at-start"} 0.0' in generate_latest()
