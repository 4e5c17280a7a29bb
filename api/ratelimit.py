"""Per-merchant rate limit: a token bucket per merchant, shared by all gateway processes.

SPEC §4 wants the limit shared by all gateway processes (the extra HTTP processes of one
``serve``, or gateways of their own on Kafka), so the buckets live in the database every
gateway already uses: one row per bucket in ``rate_limit_buckets``, an UNLOGGED table
(``api/migrations.py``): no WAL and no flush at commit. Rate-limit state is not payment
state; after a crash or a failover it starts empty, every bucket full.

A take from the table is one statement, on its own connection in its own implicit
transaction (autocommit), so the bucket's row is locked only while that statement runs:
it refills the bucket for the time since it was last counted (``least(burst, tokens +
elapsed x rate)``), takes tokens if there are, and returns how many and what is left. Time
is the database server's (``now()``, the statement's start), the one clock every gateway
shares; a take that started before the bucket's last count refills nothing.

Leases. One statement per request cost the benchmark (one merchant, ~500 requests/s,
nothing refused) 0.2 ms of CPU and 7 % of its throughput (docs/benchmarks.md, 2026-12-02
session 2). So while a bucket is more than half full, a process takes a lease of several
tokens at once (``burst / 64``, at most 32; 1, that is no lease, for bursts under 128, the
default 100 included) and spends it on its next requests for that merchant within
``LEASE_S``; tokens of a lease it did not spend go back to the bucket with its next take.
While a bucket lends, a process sends one take for it at a time and the requests that
arrive meanwhile wait for that take's lease; below half full every take is one token and
goes to the table at once, as without leases. Tokens are taken from the bucket before they
are spent, so the processes together never accept more than the one bucket allows; a
lease only holds up to ``lease - 1`` tokens a process may not use (for at most
``LEASE_S``) while the bucket is more than half full, far from refusing anything; and a
request refused by the table spends a lease that requests beside it brought back meanwhile.

A refused request gets 429 with ``Retry-After``: the seconds until a token is back,
rounded up, at least 1.

:class:`ApiLimits` is what the HTTP API applies (docs/security.md "Rate limits"): every
authenticated request takes a token from its principal's bucket of its role (a merchant's
reads and writes in two buckets, keyed by the merchant, whichever of its keys it uses), after
authentication, on the one take the merchant limit always made. A failed authentication (no
token, an unknown, expired or revoked one) takes one from its client address's bucket;
once that is empty the failure is answered 429, not 401, and this process remembers the
address's wait, so that further failures from it cost no statement until then. Only
failures count and only failures are refused: a valid token from that address still works
(an attacker sharing a NAT or a proxy with a merchant cannot lock the merchant out).
"""

from __future__ import annotations

import asyncio
import ipaddress
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from core.storage import Database

__all__ = ["LEASE_S", "ApiLimits", "Rate", "TokenBuckets", "client_address", "lease_size"]

LEASE_S = 0.5  # how long a process may spend a lease's tokens

# $1 bucket, $2 rate per second, $3 burst, $4 tokens given back, $5 the lease wanted.
# The bucket's tokens now, from the stored row ``b``, with what is given back:
_TOKENS = (
    "least($3::float8, b.tokens + $4::float8 + $2::float8"
    " * extract(epoch FROM greatest(now() - b.refilled_at, interval '0'))::float8)"
)


def _granted(tokens: str) -> str:
    """The lease while more than half the burst stays, else one token if there is one."""
    return (
        f"CASE WHEN {tokens} - $5::int >= $3::float8 / 2 THEN $5::int"
        f" WHEN {tokens} >= 1 THEN 1 ELSE 0 END"
    )


_TAKE = f"""
INSERT INTO rate_limit_buckets AS b (bucket, tokens, refilled_at, granted)
VALUES ($1, $3::float8 - {_granted("$3::float8")}, now(), {_granted("$3::float8")})
ON CONFLICT (bucket) DO UPDATE SET
    tokens = {_TOKENS} - {_granted(_TOKENS)},
    refilled_at = greatest(b.refilled_at, now()),
    granted = {_granted(_TOKENS)}
RETURNING granted, tokens
"""


def lease_size(burst: int) -> int:
    """Tokens a process takes at once from a bucket more than half full."""
    return max(1, min(32, burst // 64))


@dataclass
class _Lease:
    tokens: int  # taken from the bucket, not yet spent
    until: float  # monotonic time after which they go back


class TokenBuckets:
    """Token buckets of ``burst`` tokens refilled at ``rate_per_s``, one per key, in the
    database; this process's leases on them."""

    def __init__(
        self,
        db: Database,
        rate_per_s: float,
        burst: int,
        *,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.db = db
        self.rate = float(rate_per_s)
        self.burst = float(burst)
        self.lease = lease_size(burst)
        self._monotonic = monotonic
        self._leases: dict[str, _Lease] = {}
        # While a bucket lends, one take per key at a time goes to the table and the
        # requests beside it wait for its lease: else each would bring a lease of its own.
        self._asking: dict[str, asyncio.Event] = {}
        self._one_at_a_time: set[str] = set()  # keys whose last take got a single token

    def _spend(self, key: str, *, expired_too: bool) -> bool:
        lease = self._leases.get(key)
        if lease is None or not (expired_too or self._monotonic() < lease.until):
            return False
        lease.tokens -= 1
        if not lease.tokens:
            del self._leases[key]
        return True

    async def take(self, key: str) -> float:
        """Take one token from ``key``'s bucket; returns 0 when taken, else the seconds
        until one is back."""
        while True:
            if self._spend(key, expired_too=False):
                return 0.0
            asking = self._asking.get(key)
            if asking is None or key in self._one_at_a_time:
                break
            await asking.wait()  # its lease may serve this request too
        expired = self._leases.pop(key, None)  # its tokens go back with this take
        back = expired.tokens if expired is not None else 0
        mine = None
        if self.lease > 1 and key not in self._asking:
            mine = self._asking[key] = asyncio.Event()
        try:
            async with self.db.raw_connection() as conn:
                row = await conn.fetchrow(
                    _TAKE, key, self.rate, self.burst, float(back), self.lease
                )
        finally:
            if mine is not None:
                del self._asking[key]
                mine.set()
        granted = int(row["granted"])
        if granted > 1:
            self._one_at_a_time.discard(key)
            held = self._leases.setdefault(key, _Lease(0, 0.0))
            held.tokens += granted - 1
            held.until = self._monotonic() + LEASE_S
        elif self.lease > 1:
            self._one_at_a_time.add(key)  # near the limit: every take on its own, at once
        # Refused, but requests of this process that went to the table meanwhile brought a
        # lease back: its tokens were taken from the bucket for requests such as this one.
        if granted or self._spend(key, expired_too=True):
            return 0.0
        return max(0.0, (1 - float(row["tokens"])) / self.rate)

    @staticmethod
    def retry_after(wait_s: float) -> str:
        return str(max(1, math.ceil(wait_s)))


@dataclass(frozen=True)
class Rate:
    per_s: float
    burst: int


_ADDRESS_WAITS_MAX = 10_000  # addresses whose refusal this process remembers


def _address_key(host: str) -> str:
    """An address's bucket: IPv4 as is, IPv6 by its /64 (one subscriber's usual share, which
    it could otherwise walk through address by address)."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host  # not an IP (a test client's name, a Unix socket): itself
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


def client_address(
    scope: Mapping[str, Any], trusted: Iterable[ipaddress.IPv4Network | ipaddress.IPv6Network]
) -> str:
    """The client's address: the connection's peer, unless that peer is a trusted proxy;
    then the last ``X-Forwarded-For`` address that is not itself a trusted proxy (every
    address left of it could have been written by the client)."""
    client = scope.get("client")
    peer = client[0] if client else "unknown"
    networks = tuple(trusted)
    if not networks:
        return peer

    def is_trusted(host: str) -> bool:
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return False
        return any(address in network for network in networks)

    if not is_trusted(peer):
        return peer
    forwarded = [
        value.decode("latin-1")
        for name, value in scope.get("headers") or ()
        if name == b"x-forwarded-for"
    ]
    hops = [h.strip() for h in ",".join(forwarded).split(",") if h.strip()]
    for hop in reversed(hops):
        try:
            ipaddress.ip_address(hop)
        except ValueError:
            return peer  # a malformed hop: the proxy's word is no longer clear
        if not is_trusted(hop):
            return hop
    return hops[0] if hops else peer


class ApiLimits:
    """The HTTP API's limits: a bucket per principal of each role, and one per client
    address for failed authentications; all in ``rate_limit_buckets``."""

    def __init__(
        self,
        db: Database,
        *,
        merchant: Rate,
        merchant_read: Rate,
        auditor: Rate,
        operator: Rate,
        auth_failures: Rate,
        trusted_proxies: Iterable[str] = (),
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        def buckets(rate: Rate) -> TokenBuckets:
            return TokenBuckets(db, rate.per_s, rate.burst, monotonic=monotonic)

        self._roles = {
            ("merchant", False): buckets(merchant),
            ("merchant", True): buckets(merchant_read),
            ("auditor", False): buckets(auditor),
            ("operator", False): buckets(operator),
        }
        self._failures = buckets(auth_failures)
        self._trusted = tuple(ipaddress.ip_network(p, strict=False) for p in trusted_proxies)
        self._monotonic = monotonic
        self._refused_until: dict[str, float] = {}  # address -> monotonic time

    async def take(self, role: str, principal: str, *, read: bool = False) -> float:
        """One request of ``principal`` (a merchant id, or an auditor's or operator's
        principal id): 0 when allowed, else the seconds to wait. ``read``: a merchant's
        GET, from the merchant's read bucket (other roles have one bucket)."""
        reading = read and role == "merchant"
        bucket = "merchant-read" if reading else role
        return await self._roles[(role, reading)].take(f"{bucket}:{principal}")

    def address(self, scope: Mapping[str, Any]) -> str:
        return client_address(scope, self._trusted)

    async def failed_authentication(self, scope: Mapping[str, Any]) -> float:
        """A failed authentication from the request's client: 0 while its address has
        failures left (answer 401), else the seconds to wait (answer 429)."""
        key = _address_key(self.address(scope))
        now = self._monotonic()
        until = self._refused_until.get(key)
        if until is not None:
            if now < until:
                return until - now
            del self._refused_until[key]
        wait = await self._failures.take(f"auth-failure:{key}")
        if wait > 0:
            if len(self._refused_until) >= _ADDRESS_WAITS_MAX:
                self._refused_until.clear()  # crude and rare: each asks the table again
            self._refused_until[key] = now + wait
        return wait
