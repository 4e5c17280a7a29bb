"""The shared token buckets (api/ratelimit.py) on the real PostgreSQL: one statement per
take, and what every gateway process sees is one bucket."""

import asyncio

import pytest

from api.ratelimit import LEASE_S, ApiLimits, Rate, TokenBuckets, lease_size
from core.storage import Database

pytestmark = pytest.mark.postgres

SLOW = 0.001  # tokens per second: nothing comes back during a test


async def _rewind(db: Database, bucket: str, seconds: float) -> None:
    """Move the bucket's last count back, as if ``seconds`` had passed (no sleeping)."""
    async with db.raw_connection() as conn:
        await conn.execute(
            "UPDATE rate_limit_buckets SET refilled_at = refilled_at - make_interval(secs => $2)"
            " WHERE bucket = $1",
            bucket,
            seconds,
        )


async def test_a_bucket_gives_its_burst_then_refuses_with_the_wait(db):
    buckets = TokenBuckets(db, SLOW, burst=3)
    waits = [await buckets.take("merchant:m1") for _ in range(5)]
    assert waits[:3] == [0.0, 0.0, 0.0]
    # Empty: a token is back in (1 - what is left) / rate seconds, about 1,000 s here.
    assert all(990 < w <= 1000 for w in waits[3:]), waits
    assert TokenBuckets.retry_after(waits[3]) == "1000"
    # Another key has its own bucket.
    assert await buckets.take("merchant:m2") == 0.0


async def test_the_bucket_refills_at_the_rate_up_to_the_burst(db):
    buckets = TokenBuckets(db, 2.0, burst=4)
    assert [await buckets.take("k") for _ in range(4)] == [0.0] * 4
    assert await buckets.take("k") > 0
    await _rewind(db, "k", 1.0)  # 2 tokens back
    taken = [await buckets.take("k") for _ in range(3)]
    assert taken[:2] == [0.0, 0.0] and taken[2] > 0, taken
    await _rewind(db, "k", 3600.0)  # never more than the burst
    taken = [await buckets.take("k") for _ in range(5)]
    assert taken[:4] == [0.0] * 4 and taken[4] > 0, taken


async def test_concurrent_takes_from_several_pools_share_one_bucket(db_url):
    """Two gateway processes are two pools on one database: 60 takes at once from both,
    on a burst of 25, get exactly 25 tokens."""
    pools = [Database(db_url, pool_size=5), Database(db_url, pool_size=5)]
    try:
        gateways = [TokenBuckets(pool, SLOW, burst=25) for pool in pools]
        waits = await asyncio.gather(*(gateways[i % 2].take("merchant:hot") for i in range(60)))
        assert sum(1 for w in waits if w == 0.0) == 25
        assert all(w > 0 for w in waits if w != 0.0)
    finally:
        for pool in pools:
            await pool.close()


async def test_the_buckets_table_is_unlogged(db):
    """Rate-limit state is not payment state: no WAL, no flush at commit."""
    async with db.raw_connection() as conn:
        persistence = await conn.fetchval(
            "SELECT relpersistence::text FROM pg_class WHERE relname = 'rate_limit_buckets'"
        )
    assert persistence == "u"


def approx(tokens: float) -> object:
    return pytest.approx(tokens, abs=0.01)  # SLOW refills a few millionths meanwhile


async def _tokens(db: Database, bucket: str) -> float:
    async with db.raw_connection() as conn:
        return float(
            await conn.fetchval("SELECT tokens FROM rate_limit_buckets WHERE bucket = $1", bucket)
        )


async def test_a_full_bucket_lends_a_process_several_tokens_and_takes_back_the_rest(db):
    now = [0.0]
    buckets = TokenBuckets(db, SLOW, burst=640, monotonic=lambda: now[0])
    assert buckets.lease == lease_size(640) == 10
    assert await buckets.take("m") == 0.0
    assert await _tokens(db, "m") == approx(630)  # one spent, nine lent to this process
    assert [await buckets.take("m") for _ in range(4)] == [0.0] * 4
    assert await _tokens(db, "m") == approx(630)  # spent from the lease, no statement
    now[0] += LEASE_S  # the lease's time is up: its five tokens go back with the next take
    assert await buckets.take("m") == 0.0
    assert await _tokens(db, "m") == approx(630 + 5 - 10)


async def test_below_half_full_a_take_is_one_token(db):
    buckets = TokenBuckets(db, SLOW, burst=640)
    async with db.raw_connection() as conn:
        await conn.execute(
            "INSERT INTO rate_limit_buckets VALUES ('m', 325, now(), 0)"  # 325 - 10 < 320
        )
    assert await buckets.take("m") == 0.0
    assert await _tokens(db, "m") == approx(324)


async def test_leases_never_let_the_processes_take_more_than_the_bucket(db_url):
    """1,000 takes at once from two pools on a bucket of 640 that lends 10 at a time:
    exactly 640 accepted. Requests refused by the table spend what their process's other
    requests brought back as leases, so no lent token is left unspent."""
    pools = [Database(db_url, pool_size=5), Database(db_url, pool_size=5)]
    try:
        gateways = [TokenBuckets(pool, SLOW, burst=640) for pool in pools]
        waits = await asyncio.gather(*(gateways[i % 2].take("hot") for i in range(1000)))
        assert sum(1 for w in waits if w == 0.0) == 640
        assert await _tokens(pools[0], "hot") < 1
    finally:
        for pool in pools:
            await pool.close()


async def test_requests_arriving_together_share_one_lease(db):
    """100 requests of one process at once on a bucket that lends 32: one take goes to the
    table at a time and the others spend its lease, so 4 leases (128 tokens) are taken,
    not one per request (3,200 before the bucket fell to half)."""
    buckets = TokenBuckets(db, SLOW, burst=6400)
    assert buckets.lease == 32
    waits = await asyncio.gather(*(buckets.take("m") for _ in range(100)))
    assert waits == [0.0] * 100
    assert await _tokens(db, "m") == approx(6400 - 4 * 32)


def test_lease_sizes():
    """No lease for small bursts (the default 100 included): exact, one statement a take."""
    assert [lease_size(b) for b in (1, 100, 127, 128, 640, 2048, 10**6)] == [1, 1, 1, 2, 10, 32, 32]


def _limits(db: Database, *, now: list[float] | None = None, **rates: Rate) -> ApiLimits:
    one = Rate(SLOW, 2)
    clock = now if now is not None else [0.0]
    return ApiLimits(
        db,
        merchant=rates.get("merchant", one),
        merchant_read=rates.get("merchant_read", one),
        auditor=rates.get("auditor", one),
        operator=rates.get("operator", one),
        auth_failures=rates.get("auth_failures", one),
        monotonic=lambda: clock[0],
    )


async def test_every_role_has_its_own_buckets_per_principal(db):
    """A merchant's writes and reads, an auditor, an operator: each its own burst, per
    principal; one empty bucket refuses nobody else."""
    limits = _limits(
        db,
        merchant=Rate(SLOW, 3),
        merchant_read=Rate(SLOW, 5),
        auditor=Rate(SLOW, 2),
        operator=Rate(SLOW, 4),
    )

    async def allowed(n: int, role: str, who: str, *, read: bool = False) -> list[bool]:
        return [await limits.take(role, who, read=read) == 0.0 for _ in range(n)]

    assert await allowed(4, "merchant", "mer_1") == [True] * 3 + [False]
    assert await allowed(6, "merchant", "mer_1", read=True) == [True] * 5 + [False]
    assert await allowed(1, "merchant", "mer_2") == [True]
    assert await allowed(3, "auditor", "aud_1") == [True, True, False]
    assert await allowed(1, "auditor", "aud_2") == [True]
    assert await allowed(1, "auditor", "aud_1", read=True) == [False]  # one auditor bucket
    assert await allowed(5, "operator", "op_1") == [True] * 4 + [False]
    async with db.raw_connection() as conn:
        buckets = {r["bucket"] for r in await conn.fetch("SELECT bucket FROM rate_limit_buckets")}
    assert buckets == {
        "merchant:mer_1",
        "merchant-read:mer_1",
        "merchant:mer_2",
        "auditor:aud_1",
        "auditor:aud_2",
        "operator:op_1",
    }


async def test_failed_authentications_are_limited_per_address_and_remembered(db):
    now = [0.0]
    limits = _limits(db, now=now, auth_failures=Rate(SLOW, 3))
    first = {"client": ("203.0.113.7", 50000), "headers": []}
    other = {"client": ("203.0.113.8", 50000), "headers": []}
    waits = [await limits.failed_authentication(first) for _ in range(4)]
    assert waits[:3] == [0.0] * 3 and waits[3] > 900, waits
    assert await limits.failed_authentication(other) == 0.0
    # Refused: this process asks the table no more until the wait is over.
    async with db.raw_connection() as conn:
        await conn.execute("DELETE FROM rate_limit_buckets WHERE bucket LIKE 'auth-failure:%'")
    now[0] += 10
    assert waits[3] - 11 < await limits.failed_authentication(first) < waits[3]
    async with db.raw_connection() as conn:
        assert not await conn.fetchval(
            "SELECT count(*) FROM rate_limit_buckets WHERE bucket = 'auth-failure:203.0.113.7'"
        )
    # IPv6 clients share their /64: walking addresses in it gains nothing.
    v6 = [{"client": (f"2001:db8:1:2::{i:x}", 1), "headers": []} for i in range(1, 5)]
    waits = [await limits.failed_authentication(s) for s in v6]
    assert waits[:3] == [0.0] * 3 and waits[3] > 0, waits


async def test_failed_authentications_are_shared_by_the_processes(db_url):
    pools = [Database(db_url, pool_size=2), Database(db_url, pool_size=2)]
    try:
        gateways = [_limits(pool, auth_failures=Rate(SLOW, 5)) for pool in pools]
        scope = {"client": ("198.51.100.1", 1), "headers": []}
        waits = [await gateways[i % 2].failed_authentication(scope) for i in range(8)]
        assert sum(1 for w in waits if w == 0.0) == 5, waits
    finally:
        for pool in pools:
            await pool.close()
