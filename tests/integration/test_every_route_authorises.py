"""Every route the API publishes, with every role and without a token (issue 20, OWASP API1
and API5), on the real PostgreSQL: the routes come from the live OpenAPI document, so a
new route is checked the day it is added (and fails here until it says whose it is).

- without a token, or with an unknown one: 401;
- with a role the route is not for: 403;
- a merchant asking for another merchant's payment, refunds, verification or dispute: 404,
  the same answer as for one that does not exist (nothing tells them apart);
- its owner gets past authorisation (whatever the answer after that)."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from sqlalchemy import text

from api.auth import Role, issue_token
from api.bootstrap import Engine
from api.http import create_app
from payments.merchants import Merchant, insert_merchant
from tests.support import running_engine

pytestmark = pytest.mark.postgres

# Whose each part of the API is. A route under none of these fails the test: say whose.
OWNER = {
    "/v1/payments": Role.MERCHANT,
    "/v1/disputes": Role.MERCHANT,
    "/v1/audit/": Role.AUDITOR,
    "/v1/settlements/": Role.OPERATOR,
    "/v1/dr/": Role.OPERATOR,
}
# Open on purpose: probes and the scrape (in production on the internal listener only).
OPEN = {"/healthz", "/readyz", "/metrics"}
# A well-formed body for each POST, so that what is judged is the principal, not the body.
BODIES = {
    "/v1/payments": {"payer_vpa": "route.check@okhdfc", "amount_paise": 100},
    "/v1/payments/{transaction_id}/verification": {"otp": "123456"},
    "/v1/payments/{transaction_id}/refunds": {"amount_paise": 1},
    "/v1/disputes/{dispute_id}/accept": {},
    "/v1/disputes/{dispute_id}/contest": {"evidence": "delivered", "documents": ["awb-1"]},
    "/v1/audit/cosignatures": {},
}


@pytest.fixture
async def engine(db_url) -> AsyncIterator[Engine]:
    # This walk fails authentication on purpose, far more than 20 times from one address.
    async with running_engine(
        db_url, auth_failure_burst=10_000, auditor_rate_burst=10_000, operator_rate_burst=10_000
    ) as eng:
        yield eng


async def _status(
    client: httpx.AsyncClient,
    method: str,
    url: str,
    body: dict[str, object] | None,
    token: str | None,
    key: str,
) -> int:
    headers = {"Idempotency-Key": key}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    return (await client.request(method.upper(), url, json=body, headers=headers)).status_code


def _owner(path: str) -> Role:
    found = [role for prefix, role in OWNER.items() if path.startswith(prefix)]
    assert found, f"{path}: no owner in OWNER; say whose it is"
    return found[0]


async def test_every_route_refuses_the_wrong_principal_and_hides_others_resources(engine):
    tokens: dict[str, str] = {}
    async with engine.db.transaction() as conn:
        for merchant_id, vpa in (("mer_a", "a-shop@okicici"), ("mer_b", "b-shop@okicici")):
            await insert_merchant(conn, Merchant(merchant_id, "Shop", vpa, "5411", None), b"x")
            tokens[merchant_id] = await issue_token(
                conn,
                principal_id=f"p_{merchant_id}",
                role=Role.MERCHANT,
                name=merchant_id,
                merchant_id=merchant_id,
            )
        for role in (Role.AUDITOR, Role.OPERATOR):
            tokens[role.value] = await issue_token(
                conn, principal_id=f"p_{role.value}", role=role, name=role.value
            )
    app = create_app(engine, manage_engine=False)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://engine"
    ) as client:
        r = await client.post(
            "/v1/payments",
            json={"payer_vpa": "owner.a@okhdfc", "amount_paise": 1000, "merchant_order_id": "a1"},
            headers={"Authorization": f"Bearer {tokens['mer_a']}", "Idempotency-Key": "a1"},
        )
        assert r.status_code == 202, r.text
        txn = r.json()["transaction_id"]
        # A dispute of merchant A's, as the dispute watcher records one from the switch.
        now = datetime.now(UTC)
        async with engine.db.transaction() as conn:
            await conn.execute(
                text(
                    "INSERT INTO disputes (dispute_id, transaction_id, merchant_id, amount_paise,"
                    " reason, status, raised_at, respond_by, payer_bank, payee_bank, created_at,"
                    " updated_at) VALUES ('dsp_a', :t, 'mer_a', 1000, 'goods not received',"
                    " 'OPEN', :n, :r, 'HDFC', 'ICICI', :n, :n)"
                ),
                {"t": txn, "n": now, "r": now + timedelta(days=5)},
            )
        ids = {
            "transaction_id": txn,
            "dispute_id": "dsp_a",
            "height": "1",
            "business_date": now.date().isoformat(),
        }
        spec = (await client.get("/openapi.json")).json()
        checked = 0
        for path, operations in spec["paths"].items():
            for method, operation in operations.items():
                url = re.sub(r"\{(\w+)\}", lambda m: ids[m.group(1)], path)
                body = BODIES.get(path) if method == "post" else None
                if body is None and method == "post":
                    raise AssertionError(f"POST {path}: no body in BODIES")

                async def call(
                    token: str | None,
                    key: str = "k",
                    at: str = url,
                    m: str = method,
                    b: dict[str, object] | None = body,
                ) -> int:
                    return await _status(client, m, at, b, token, f"{key}-{m}-{at}")

                if path in OPEN:
                    assert "security" not in operation, path
                    continue
                assert operation.get("security"), f"{method} {path} takes no token"
                owner = _owner(path)
                where = f"{method.upper()} {path}"
                assert await call(None) == 401, where
                assert await call("upi_sk_" + "x" * 43) == 401, where
                for role, token in (
                    (Role.MERCHANT, tokens["mer_a"]),
                    (Role.AUDITOR, tokens["auditor"]),
                    (Role.OPERATOR, tokens["operator"]),
                ):
                    status = await call(token, key=role.value)
                    if role is owner:
                        assert status not in (401, 403), f"{where}: its owner got {status}"
                    else:
                        assert status == 403, f"{where} as {role.value}: {status}"
                if owner is Role.MERCHANT and re.search(r"\{(transaction|dispute)_id\}", path):
                    # Merchant B with A's id, and with an id that does not exist: both 404.
                    assert await call(tokens["mer_b"], key="b") == 404, where
                    missing = re.sub(r"\{\w+\}", "UPI00000000000000000000000000000000", path)
                    assert await call(tokens["mer_b"], key="b0", at=missing) == 404, where
                checked += 1
    assert checked >= 19, checked  # every secured route of SPEC §4 was walked
