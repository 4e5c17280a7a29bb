"""The gateway's token cache: a known token is looked up once per TTL, an unknown one
every time, and a token that stops being valid stops working once its entry expires."""

import contextlib
import hashlib
import time
from types import SimpleNamespace

from api.auth import Principal, Role, TokenCache, authenticate


class FakeDb:
    """Answers the principals lookup from a dict of token hash -> principal row."""

    def __init__(self) -> None:
        self.rows: dict[bytes, SimpleNamespace] = {}
        self.lookups = 0

    @contextlib.asynccontextmanager
    async def connection(self):
        db = self

        class Conn:
            async def execute(self, _sql, params):
                db.lookups += 1
                row = db.rows.get(params["h"])
                return SimpleNamespace(first=lambda: row)

        yield Conn()


def add(db: FakeDb, token: str) -> None:
    digest = hashlib.sha256(token.encode()).digest()
    db.rows[digest] = SimpleNamespace(
        principal_id="pri_1",
        role="merchant",
        name="Shop",
        merchant_id="mer_1",
        token_hash=digest,
        credential_id="cred_1",
        stale=False,
    )


async def test_known_token_is_looked_up_once_per_ttl_and_revocation_takes_effect():
    db, cache = FakeDb(), TokenCache(ttl_s=0.2)
    add(db, "upi_sk_good")
    expected = Principal("pri_1", Role.MERCHANT, "Shop", "mer_1")
    for _ in range(5):
        assert await authenticate(db, "upi_sk_good", cache) == expected  # type: ignore[arg-type]
    assert db.lookups == 1
    db.rows.clear()  # revoked
    assert await authenticate(db, "upi_sk_good", cache) == expected  # type: ignore[arg-type]
    time.sleep(0.25)
    assert await authenticate(db, "upi_sk_good", cache) is None  # type: ignore[arg-type]
    assert db.lookups == 2


async def test_unknown_tokens_are_not_cached():
    db, cache = FakeDb(), TokenCache(ttl_s=60)
    for _ in range(3):
        assert await authenticate(db, "upi_sk_nope", cache) is None  # type: ignore[arg-type]
    assert db.lookups == 3
    add(db, "upi_sk_nope")  # created since: works at once
    assert await authenticate(db, "upi_sk_nope", cache) is not None  # type: ignore[arg-type]
