"""The merchant gateway over HTTP against a real `upi-engine serve` (embedded default)."""

from __future__ import annotations

import concurrent.futures
import itertools
import json
import time

import httpx
import pytest

from tests.e2e.harness import cli, create_merchant, query, serving, wait_final

# One worker runs the whole module, so that its tests share one server.
pytestmark = [pytest.mark.e2e]

SHOP_NUMBERS = itertools.count(1)
GOOD = {"payer_vpa": "success@okhdfc", "amount_paise": 12_345, "merchant_order_id": "ord-1"}


@pytest.fixture(scope="module")
def shared_gateway(module_embedded_env):
    """One server for the module (a serve takes 10 s to start). Each test gets a merchant of
    its own (see `gateway`) and uses payers of its own, so that no test's payments count
    toward another's limits or fraud windows; `counts` looks only at what a request writes,
    not at the events the workers still write for earlier tests' payments."""
    env = {
        **module_embedded_env,
        "UPI_PAYER_DAILY_MAX_COUNT": "3",
        "UPI_PAYER_DAILY_MAX_AMOUNT_PAISE": "50000",
        # ₹4 lakh instead of the reported ₹6 lakh: reachable under the 3 payments a day.
        "UPI_CATEGORY_DAILY_LIMITS_PAISE": '{"jewellery": 40000000}',
    }
    with serving(env, ("all",)) as (server,):
        other = create_merchant(env, "other@ybl")
        with httpx.Client(base_url=server.url, timeout=10) as client:
            yield env, client, other


@pytest.fixture
def gateway(shared_gateway):
    env, client, other = shared_gateway
    # A collection VPA of the test's own: shop-<n>@okicici.
    vpa = f"shop-{next(SHOP_NUMBERS)}@okicici"
    return env, client, {**create_merchant(env, vpa), "vpa": vpa}, other


def auth(merchant, key: str | None = None) -> dict[str, str]:
    headers = {"Authorization": f"Bearer {merchant['api_key']}"}
    if key:
        headers["Idempotency-Key"] = key
    return headers


def counts(env) -> tuple[int, int, int]:
    """Payments, the events a request writes, idempotency keys."""
    [(payments, events, keys)] = query(
        env,
        "SELECT (SELECT count(*) FROM payments),"
        " (SELECT count(*) FROM outbox"
        "  WHERE event_type IN ('PaymentInitiated', 'RefundInitiated')),"
        " (SELECT count(*) FROM idempotency_keys)",
    )
    return payments, events, keys


BAD_INPUTS = [
    ("bad VPA", {**GOOD, "payer_vpa": "not-a-vpa"}, 422, "validation_error"),
    ("VPA with a bad handle", {**GOOD, "payer_vpa": "ravi@1bank"}, 422, "validation_error"),
    ("VPA too long", {**GOOD, "payer_vpa": "r" * 300 + "@ybl"}, 422, "validation_error"),
    ("zero amount", {**GOOD, "amount_paise": 0}, 422, "validation_error"),
    ("negative amount", {**GOOD, "amount_paise": -5}, 422, "validation_error"),
    ("fractional amount", {**GOOD, "amount_paise": 100.5}, 422, "validation_error"),
    ("amount as a string", {**GOOD, "amount_paise": "100"}, 422, "validation_error"),
    ("amount above any limit", {**GOOD, "amount_paise": 10**12}, 422, "validation_error"),
    ("above the MCC limit", {**GOOD, "amount_paise": 10_000_001}, 422, "amount_over_limit"),
    ("payee nobody registered", {**GOOD, "payee_vpa": "thief@okaxis"}, 422, "payee_not_allowed"),
    ("another merchant's VPA", {**GOOD, "payee_vpa": "other@ybl"}, 422, "payee_not_allowed"),
    ("not INR", {**GOOD, "currency": "USD"}, 422, "validation_error"),
    ("unknown field", {**GOOD, "tip": 5}, 422, "validation_error"),
    (
        "unknown device field",
        {**GOOD, "device": {"id": "d1", "imei": "x"}},
        422,
        "validation_error",
    ),
    (
        "latitude out of range",
        {**GOOD, "device": {"id": "d", "latitude": 91}},
        422,
        "validation_error",
    ),
    ("order id with spaces", {**GOOD, "merchant_order_id": "a b"}, 422, "validation_error"),
    (
        "missing order id",
        {k: v for k, v in GOOD.items() if k != "merchant_order_id"},
        422,
        "validation_error",
    ),
    ("note too long", {**GOOD, "note": "x" * 101}, 422, "validation_error"),
    ("body not an object", [1, 2], 422, "validation_error"),
]


def test_bad_input_gets_a_problem_and_leaves_nothing_behind(gateway):
    env, client, merchant, _ = gateway
    before = counts(env)
    for i, (what, body, status, code) in enumerate(BAD_INPUTS):
        r = client.post("/v1/payments", json=body, headers=auth(merchant, f"bad-{i}"))
        assert r.status_code == status, (what, r.text)
        assert r.headers["content-type"] == "application/problem+json", what
        assert r.json()["code"] == code, (what, r.json())
    r = client.post(
        "/v1/payments",
        content=b"{not json",
        headers={**auth(merchant, "bad-json"), "content-type": "application/json"},
    )
    assert r.status_code == 422 and r.json()["code"] == "validation_error"
    r = client.post("/v1/payments", json=GOOD, headers=auth(merchant))
    assert r.status_code == 400 and r.json()["code"] == "idempotency_key_missing"
    assert counts(env) == before, "a refused request left a payment, an event or a key"


def test_roles_and_ownership(gateway):
    env, client, merchant, other = gateway
    mine = {**GOOD, "payer_vpa": "owner.roles@okhdfc"}
    r = client.post("/v1/payments", json=mine, headers=auth(merchant, "own-1"))
    txn = r.json()["transaction_id"]
    assert client.get(f"/v1/payments/{txn}").status_code == 401
    assert (
        client.get(f"/v1/payments/{txn}", headers={"Authorization": "Bearer nope"}).json()["code"]
        == "unauthenticated"
    )
    auditor = json.loads(cli(env, "auditor", "create", "--name", "Asha", "--json").stdout)
    operator = json.loads(cli(env, "operator", "create", "--name", "Om", "--json").stdout)
    for token in (auditor["token"], operator["token"]):
        r = client.get(f"/v1/payments/{txn}", headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 403 and r.json()["code"] == "forbidden"
    r = client.get(f"/v1/payments/{txn}", headers=auth(other))
    assert r.status_code == 404 and r.json()["code"] == "not_found"
    assert client.get(f"/v1/payments/{txn}", headers=auth(merchant)).status_code == 200
    # Tokens are stored only as hashes.
    stored = query(env, "SELECT encode(token_hash, 'hex') FROM credentials")
    assert len(stored) >= 4 and all(len(h) == 64 for (h,) in stored)
    for token in (auditor["token"], operator["token"], merchant["api_key"]):
        for table in ("credentials", "principals"):
            assert not query(
                env, f"SELECT 1 FROM {table} WHERE {table}::text LIKE '%{token[-12:]}%'"
            )


def test_idempotency_replay_conflict_and_concurrency(gateway):
    env, client, merchant, _ = gateway
    first = client.post("/v1/payments", json=GOOD, headers=auth(merchant, "idem-1"))
    again = client.post("/v1/payments", json=GOOD, headers=auth(merchant, "idem-1"))
    assert first.status_code == again.status_code == 202
    assert again.json() == first.json() and again.headers["idempotent-replayed"] == "true"
    other = client.post(
        "/v1/payments", json={**GOOD, "amount_paise": 1}, headers=auth(merchant, "idem-1")
    )
    assert other.status_code == 409 and other.json()["code"] == "idempotency_conflict"

    body = {**GOOD, "payer_vpa": "racer@okaxis"}
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        results = list(
            pool.map(
                lambda _: httpx.post(
                    f"{client.base_url}/v1/payments",
                    json=body,
                    headers=auth(merchant, "idem-race"),
                    timeout=10,
                ),
                range(2),
            )
        )
    assert [r.status_code for r in results] == [202, 202]
    assert results[0].json()["transaction_id"] == results[1].json()["transaction_id"]
    [(n,)] = query(
        env,
        "SELECT count(*) FROM payments p JOIN idempotency_keys k USING (transaction_id)"
        " WHERE k.idempotency_key = 'idem-race'",
    )
    assert n == 1


def test_a_merchant_collects_only_into_its_registered_vpas(gateway):
    env, client, merchant, other = gateway
    mid = merchant["merchant_id"]
    registrations = "SELECT count(*) FROM outbox WHERE event_type = 'MerchantVpaRegistered'"
    [(registered_before,)] = query(env, registrations)
    before = counts(env)
    extra = {**GOOD, "payer_vpa": "payee.test@oksbi", "payee_vpa": "shop2@okicici"}
    refused = client.post("/v1/payments", json=extra, headers=auth(merchant, "payee-1"))
    assert refused.status_code == 422, refused.text
    assert refused.headers["content-type"] == "application/problem+json"
    problem = refused.json()
    assert problem["code"] == "payee_not_allowed"
    assert "merchant add-vpa" in problem["detail"] and "shop2@okicici" not in problem["detail"]
    assert counts(env) == before, "a refused payment left a payment, an event or a key"

    added = cli(env, "merchant", "add-vpa", "--merchant", mid, "--vpa", "Shop2@OKICICI", "--json")
    assert added.returncode == 0, added.stderr
    assert json.loads(added.stdout) == {
        "merchant_id": mid,
        "vpa": "shop2@okicici",
        "registered": True,
    }
    again = cli(env, "merchant", "add-vpa", "--merchant", mid, "--vpa", "shop2@okicici")
    assert again.returncode == 0 and "already registered" in again.stdout
    assert "shop2@okicici" not in again.stdout  # masked

    # The refused request's key was not used up: the same request now goes through.
    r = client.post("/v1/payments", json=extra, headers=auth(merchant, "payee-1"))
    assert r.status_code == 202 and "idempotent-replayed" not in r.headers, r.text
    paid = wait_final(client, r.json()["transaction_id"], auth(merchant))
    assert paid["status"] == "SUCCESS" and paid["payee_vpa"] == "sh***p2@okicici"
    [(payee,)] = query(
        env, f"SELECT payee_vpa FROM payments WHERE transaction_id = '{paid['transaction_id']}'"
    )
    assert payee == "shop2@okicici"

    # A wrong payee, then the corrected body under the same key.
    wrong = {**GOOD, "payer_vpa": "success@okaxis", "payee_vpa": "shop3@okicici"}
    r = client.post("/v1/payments", json=wrong, headers=auth(merchant, "payee-2"))
    assert r.status_code == 422 and r.json()["code"] == "payee_not_allowed"
    fixed = {**wrong, "payee_vpa": "shop2@okicici"}
    r = client.post("/v1/payments", json=fixed, headers=auth(merchant, "payee-2"))
    assert r.status_code == 202, r.text
    assert wait_final(client, r.json()["transaction_id"], auth(merchant))["status"] == "SUCCESS"

    # Another merchant can neither collect into it nor register it.
    r = client.post("/v1/payments", json=extra, headers=auth(other, "theirs-1"))
    assert r.status_code == 422 and r.json()["code"] == "payee_not_allowed"
    taken = cli(
        env, "merchant", "add-vpa", "--merchant", other["merchant_id"], "--vpa", "shop2@okicici"
    )
    assert taken.returncode == 2 and "another merchant" in taken.stderr
    dup = cli(env, "merchant", "create", "--name", "Copycat", "--vpa", merchant["vpa"])
    assert dup.returncode == 2 and "another merchant" in dup.stderr
    nobody = cli(env, "merchant", "add-vpa", "--merchant", "mer_nobody", "--vpa", "x1@ybl")
    assert nobody.returncode == 2 and "no merchant mer_nobody" in nobody.stderr
    bad = cli(env, "merchant", "add-vpa", "--merchant", mid, "--vpa", "not-a-vpa")
    assert bad.returncode == 2 and "--vpa" in bad.stderr
    owners = f"'{mid}', '{other['merchant_id']}'"
    assert sorted(
        query(env, f"SELECT vpa, merchant_id FROM merchant_vpas WHERE merchant_id IN ({owners})")
    ) == sorted(
        [(merchant["vpa"], mid), ("shop2@okicici", mid), ("other@ybl", other["merchant_id"])]
    )
    [(registered,)] = query(env, registrations)
    assert registered == registered_before + 1  # add-vpa, once; nothing for the refusals


def test_get_list_and_pagination_with_masked_vpas(gateway):
    _, client, merchant, _ = gateway
    txns = []
    for i, payer in enumerate(["priya.sharma@ybl", "rahul.k@okicici", "success@oksbi"]):
        r = client.post(
            "/v1/payments",
            json={**GOOD, "payer_vpa": payer, "merchant_order_id": "pg-1"},
            headers=auth(merchant, f"pg-{i}"),
        )
        txns.append(r.json()["transaction_id"])
    page1 = client.get(
        "/v1/payments", params={"merchant_order_id": "pg-1", "limit": 2}, headers=auth(merchant)
    ).json()
    assert len(page1["items"]) == 2 and page1["next_cursor"]
    page2 = client.get(
        "/v1/payments",
        params={"merchant_order_id": "pg-1", "limit": 2, "cursor": page1["next_cursor"]},
        headers=auth(merchant),
    ).json()
    assert len(page2["items"]) == 1 and page2["next_cursor"] is None
    # The same pages by after/next_after, the shape of every list.
    assert page1["next_after"] == page1["next_cursor"] and page2["next_after"] is None
    again = client.get(
        "/v1/payments",
        params={"merchant_order_id": "pg-1", "limit": 2, "after": page1["next_after"]},
        headers=auth(merchant),
    ).json()
    assert again["items"] == page2["items"]
    listed = [p["transaction_id"] for p in page1["items"] + page2["items"]]
    assert sorted(listed) == sorted(txns)
    views = page1["items"] + page2["items"]
    assert {v["payer_vpa"] for v in views} == {"pr***ma@ybl", "ra***.k@okicici", "su***ss@oksbi"}
    assert all("@" in v["payee_vpa"] and "***" in v["payee_vpa"] for v in views)


def test_refunds_partial_full_never_more_and_idempotent(gateway):
    env, client, merchant, _ = gateway
    r = client.post(
        "/v1/payments",
        json={**GOOD, "payer_vpa": "meera.iyer@ybl", "amount_paise": 10_000},
        headers=auth(merchant, "refund-pay"),
    )
    txn = r.json()["transaction_id"]
    assert wait_final(client, txn, auth(merchant))["status"] == "SUCCESS"
    balance = "SELECT balance_paise FROM npci_sim.accounts WHERE vpa = 'meera.iyer@ybl'"
    [(before,)] = query(env, balance)

    part = client.post(
        f"/v1/payments/{txn}/refunds", json={"amount_paise": 4_000}, headers=auth(merchant, "rf-1")
    )
    assert part.status_code == 202 and part.json()["status"] == "PENDING"
    replay = client.post(
        f"/v1/payments/{txn}/refunds", json={"amount_paise": 4_000}, headers=auth(merchant, "rf-1")
    )
    assert replay.json()["refund_id"] == part.json()["refund_id"]
    too_much = client.post(
        f"/v1/payments/{txn}/refunds", json={"amount_paise": 6_001}, headers=auth(merchant, "rf-2")
    )
    assert too_much.status_code == 422 and too_much.json()["code"] == "refund_exceeds_payment"
    rest = client.post(
        f"/v1/payments/{txn}/refunds", json={"amount_paise": 6_000}, headers=auth(merchant, "rf-3")
    )
    assert rest.status_code == 202
    one_more = client.post(
        f"/v1/payments/{txn}/refunds", json={"amount_paise": 1}, headers=auth(merchant, "rf-4")
    )
    assert one_more.json()["code"] == "refund_exceeds_payment"

    import time

    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        items = client.get(f"/v1/payments/{txn}/refunds", headers=auth(merchant)).json()["items"]
        if all(i["status"] == "SUCCESS" for i in items):
            break
        time.sleep(0.1)
    assert [i["amount_paise"] for i in items] == [4_000, 6_000]
    url = f"/v1/payments/{txn}/refunds"
    first = client.get(url, params={"limit": 1}, headers=auth(merchant)).json()
    assert [i["amount_paise"] for i in first["items"]] == [4_000]
    assert first["next_after"] == part.json()["refund_id"]
    rest_page = client.get(
        url, params={"limit": 1, "after": first["next_after"]}, headers=auth(merchant)
    ).json()
    assert [i["amount_paise"] for i in rest_page["items"]] == [6_000]
    assert rest_page["next_after"] is None
    assert client.get(url, params={"limit": 201}, headers=auth(merchant)).status_code == 422
    assert all(i["status"] == "SUCCESS" and len(i["rrn"]) == 12 for i in items)
    [(after,)] = query(env, balance)
    assert after == before + 10_000  # credited back, once each
    events = query(
        env,
        "SELECT event_type FROM outbox WHERE event_type LIKE 'Refund%'"
        f" AND convert_from(envelope, 'UTF8')::jsonb->>'transaction_id' = '{txn}'",
    )
    assert sorted(e for (e,) in events) == sorted(["RefundInitiated"] * 2 + ["RefundSucceeded"] * 2)

    failed = client.post(
        "/v1/payments",
        json={**GOOD, "payer_vpa": "insufficient@ybl"},
        headers=auth(merchant, "refund-failed"),
    )
    ftxn = failed.json()["transaction_id"]
    assert wait_final(client, ftxn, auth(merchant))["status"] == "FAILED"
    r = client.post(
        f"/v1/payments/{ftxn}/refunds", json={"amount_paise": 1}, headers=auth(merchant, "rf-5")
    )
    assert r.status_code == 409 and r.json()["code"] == "payment_not_refundable"


def test_a_refund_reason_is_validated_stored_and_returned(gateway):
    env, client, merchant, _ = gateway
    r = client.post(
        "/v1/payments",
        json={**GOOD, "payer_vpa": "kiran.rao@okaxis", "amount_paise": 5_000},
        headers=auth(merchant, "reason-pay"),
    )
    txn = r.json()["transaction_id"]
    assert wait_final(client, txn, auth(merchant))["status"] == "SUCCESS"
    url = f"/v1/payments/{txn}/refunds"

    def refunds_and_keys() -> tuple[int, int]:
        [(refunds, keys)] = query(
            env,
            "SELECT (SELECT count(*) FROM refunds), (SELECT count(*) FROM idempotency_keys)",
        )
        return refunds, keys

    before = refunds_and_keys()
    for bad in ("angry", "CUSTOMER_REQUEST", 5, ""):
        refused = client.post(
            url, json={"amount_paise": 100, "reason": bad}, headers=auth(merchant, "rr-1")
        )
        assert refused.status_code == 422, refused.text
        assert refused.headers["content-type"].startswith("application/problem+json")
        problem = refused.json()
        assert problem["code"] == "validation_error"
        assert ["body", "reason"] in [e["loc"] for e in problem["errors"]], problem
    assert refunds_and_keys() == before  # nothing recorded, the key not spent

    body = {"amount_paise": 100, "reason": "duplicate", "note": "charged twice"}
    made = client.post(url, json=body, headers=auth(merchant, "rr-1"))
    assert made.status_code == 202, made.text
    assert (made.json()["reason"], made.json()["note"]) == ("duplicate", "charged twice")
    replay = client.post(url, json=body, headers=auth(merchant, "rr-1"))
    assert replay.json() == made.json()
    other = client.post(url, json={**body, "reason": "other"}, headers=auth(merchant, "rr-1"))
    assert other.status_code == 409 and other.json()["code"] == "idempotency_conflict"
    plain = client.post(url, json={"amount_paise": 200}, headers=auth(merchant, "rr-2"))
    assert plain.status_code == 202 and plain.json()["reason"] is None

    items = client.get(url, headers=auth(merchant)).json()["items"]
    assert [(i["amount_paise"], i["reason"], i["note"]) for i in items] == [
        (100, "duplicate", "charged twice"),
        (200, None, None),
    ]
    stored = query(
        env,
        "SELECT refund_reason, note FROM refunds"
        f" WHERE transaction_id = '{txn}' ORDER BY amount_paise",
    )
    assert [tuple(row) for row in stored] == [("duplicate", "charged twice"), (None, None)]


def test_payer_daily_limits(gateway):
    _, client, merchant, _ = gateway
    payer = {**GOOD, "payer_vpa": "daily.user@okaxis", "amount_paise": 10_000}
    for i in range(3):
        r = client.post("/v1/payments", json=payer, headers=auth(merchant, f"daily-{i}"))
        assert r.status_code == 202, r.text
    r = client.post("/v1/payments", json=payer, headers=auth(merchant, "daily-3"))
    assert r.status_code == 422 and r.json()["code"] == "payer_daily_count_exceeded"
    big = {**GOOD, "payer_vpa": "big.spender@okaxis", "amount_paise": 40_000}
    assert client.post("/v1/payments", json=big, headers=auth(merchant, "big-1")).status_code == 202
    r = client.post(
        "/v1/payments", json={**big, "amount_paise": 10_001}, headers=auth(merchant, "big-2")
    )
    assert r.status_code == 422 and r.json()["code"] == "payer_daily_amount_exceeded"
    assert (r.json()["category"], r.json()["limit_paise"]) == (None, 50_000)


def test_a_jeweller_takes_two_lakh_a_payment_and_the_problems_name_the_limits(gateway):
    """Issue 15, part 5: MCC 5944 (jewellery) takes ₹2 lakh a payment, as reported from 15
    September 2025. The fixture's general day (₹500 a payer) does not apply: jewellery has
    its own day, here ₹4 lakh (UPI_CATEGORY_DAILY_LIMITS_PAISE)."""
    env, client, _, _ = gateway
    jeweller = create_merchant(env, "jewels@okicici", "--mcc", "5944")
    gold = {"payer_vpa": "gold.buyer@okaxis", "merchant_order_id": "gold-1"}
    before = counts(env)
    r = client.post(
        "/v1/payments", json={**gold, "amount_paise": 2_00_000_01}, headers=auth(jeweller, "g-1")
    )
    assert r.status_code == 422, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    problem = r.json()
    assert problem["code"] == "amount_over_limit"
    assert (problem["category"], problem["limit_paise"]) == ("jewellery", 2_00_000_00)
    assert "₹2,00,000 (20000000 paise)" in problem["detail"], problem["detail"]
    assert "₹2,00,000.01 (20000001 paise)" in problem["detail"], problem["detail"]
    assert counts(env) == before, "a refused payment left a payment, an event or a key"
    for i in range(1, 3):  # the same first key, corrected, then one more: ₹4 lakh in all
        body = {**gold, "amount_paise": 2_00_000_00, "merchant_order_id": f"gold-{i}"}
        r = client.post("/v1/payments", json=body, headers=auth(jeweller, f"g-{i}"))
        assert r.status_code == 202, r.text
    r = client.post(
        "/v1/payments",
        json={**gold, "amount_paise": 1, "merchant_order_id": "gold-3"},
        headers=auth(jeweller, "g-3"),
    )
    assert r.status_code == 422, r.text
    problem = r.json()
    assert problem["code"] == "payer_category_daily_amount_exceeded"
    assert (problem["category"], problem["limit_paise"]) == ("jewellery", 4_00_000_00)
    [(stored,)] = query(env, "SELECT count(*) FROM payments WHERE payee_vpa = 'jewels@okicici'")
    assert stored == 2


def test_rate_limit_answers_429_with_retry_after(embedded_env):
    env = {**embedded_env, "UPI_MERCHANT_RATE_PER_S": "0.5", "UPI_MERCHANT_RATE_BURST": "2"}
    with serving(env, ("all",)) as (server,), httpx.Client(base_url=server.url) as client:
        merchant = create_merchant(env)
        codes = [
            client.post(
                "/v1/payments",
                json={**GOOD, "payer_vpa": f"user{i}@ybl"},
                headers=auth(merchant, f"rl-{i}"),
            )
            for i in range(3)
        ]
        assert [c.status_code for c in codes] == [202, 202, 429]
        assert codes[2].json()["code"] == "rate_limited"
        assert int(codes[2].headers["retry-after"]) >= 1
        [(n,)] = query(env, "SELECT count(*) FROM payments")
        assert n == 2


def test_every_role_and_failed_authentications_are_rate_limited(embedded_env):
    """Small buckets that hardly refill: an auditor over its limit gets 429 with
    Retry-After (another auditor does not), an operator too; a merchant's reads do not
    take from its writes; 20 failed authentications from one address, then 429 for the
    next failures, while a valid token from that address still works."""
    slow = "0.001"
    env = {
        **embedded_env,
        "UPI_AUDITOR_RATE_PER_S": slow,
        "UPI_AUDITOR_RATE_BURST": "3",
        "UPI_OPERATOR_RATE_PER_S": slow,
        "UPI_OPERATOR_RATE_BURST": "2",
        "UPI_MERCHANT_READ_RATE_PER_S": slow,
        "UPI_MERCHANT_READ_RATE_BURST": "2",
        "UPI_AUTH_FAILURE_RATE_PER_S": slow,
    }
    with serving(env, ("all",)) as (server,), httpx.Client(base_url=server.url) as client:
        merchant = create_merchant(env)
        tokens = {
            who: json.loads(cli(env, role, "create", "--name", who, "--json").stdout)["token"]
            for who, role in (("a1", "auditor"), ("a2", "auditor"), ("op", "operator"))
        }

        def get(path: str, token: str) -> httpx.Response:
            return client.get(path, headers={"Authorization": f"Bearer {token}"})

        verifies = [get("/v1/audit/verify", tokens["a1"]) for _ in range(4)]
        assert [r.status_code for r in verifies] == [200, 200, 200, 429]
        assert verifies[3].json()["code"] == "rate_limited"
        assert int(verifies[3].headers["retry-after"]) >= 900  # a token per 1,000 s
        assert get("/v1/audit/checkpoints/latest", tokens["a1"]).status_code == 429
        assert get("/v1/audit/verify", tokens["a2"]).status_code == 200
        operator = [get("/v1/dr/status", tokens["op"]).status_code for _ in range(3)]
        assert operator == [200, 200, 429]

        paid = client.post("/v1/payments", json=GOOD, headers=auth(merchant, "rl-read"))
        txn = paid.json()["transaction_id"]
        reads = [client.get(f"/v1/payments/{txn}", headers=auth(merchant)) for _ in range(3)]
        assert [r.status_code for r in reads] == [200, 200, 429]
        again = client.post(
            "/v1/payments", json={**GOOD, "merchant_order_id": "o2"}, headers=auth(merchant, "w2")
        )
        assert again.status_code == 202, again.text  # the writes' bucket is its own

        bad = [get(f"/v1/payments/{txn}", f"upi_sk_guess{i}") for i in range(20)]
        assert {r.status_code for r in bad} == {401}
        over = get(f"/v1/payments/{txn}", "upi_sk_guess20")
        assert over.status_code == 429 and over.json()["code"] == "rate_limited"
        assert "failed authentications" in over.json()["detail"]
        assert int(over.headers["retry-after"]) >= 1
        assert client.get("/v1/audit/verify").status_code == 429  # no token is a failure too
        # A valid token from the same address still works: only failures are refused.
        valid = client.post(
            "/v1/payments", json={**GOOD, "merchant_order_id": "o3"}, headers=auth(merchant, "w3")
        )
        assert valid.status_code == 202, valid.text


def test_ledger_and_cli_listings_are_paginated(gateway):
    env, client, merchant, _ = gateway
    for i in range(2):
        client.post(
            "/v1/payments",
            json={**GOOD, "payer_vpa": f"ledger{i}@ybl", "merchant_order_id": f"lp-{i}"},
            headers=auth(merchant, f"lp-{i}"),
        )
    auditor = json.loads(cli(env, "auditor", "create", "--name", "Ana", "--json").stdout)
    headers = {"Authorization": f"Bearer {auditor['token']}"}

    def entries(page: dict) -> list[int]:
        return [x["height"] for x in page["lines"] if x["type"] == "entry"]

    deadline = time.monotonic() + 20
    while len(entries(client.get("/v1/audit/ledger", headers=headers).json())) < 3:
        assert time.monotonic() < deadline, "the ledger writer never caught up"
        time.sleep(0.2)  # within the auditor's rate limit
    page = client.get("/v1/audit/ledger", params={"limit": 2}, headers=headers).json()
    assert entries(page) == [0, 1] and page["next_after"] == 1
    following = client.get(
        "/v1/audit/ledger", params={"limit": 2, "after": 1}, headers=headers
    ).json()
    assert entries(following)[0] == 2

    # token list: three credentials at least (two merchants and the auditor), a page of 2.
    first = json.loads(cli(env, "token", "list", "--limit", "2", "--json").stdout)
    assert len(first["credentials"]) == 2 and first["next_after"]
    assert first["next_after"] == first["credentials"][-1]["credential_id"]
    rest = json.loads(
        cli(
            env, "token", "list", "--limit", "1000", "--after", first["next_after"], "--json"
        ).stdout
    )
    ids = [c["credential_id"] for c in first["credentials"] + rest["credentials"]]
    everything = json.loads(cli(env, "token", "list", "--json").stdout)
    assert ids == [c["credential_id"] for c in everything["credentials"]] and len(ids) >= 3
    assert rest["next_after"] is None
    listed = json.loads(cli(env, "webhooks", "list", "--limit", "5", "--json").stdout)
    assert listed["deliveries"] == [] and listed["next_after"] is None
    witnesses = json.loads(cli(env, "ledger", "witnesses", "--limit", "5", "--json").stdout)
    assert witnesses == {"witnesses": [], "next_after": None}


def test_openapi_is_complete_and_docs_work(gateway):
    _, client, _, _ = gateway
    spec = client.get("/openapi.json").json()
    paths = spec["paths"]
    for path, methods in {
        "/v1/payments": {"post", "get"},
        "/v1/payments/{transaction_id}": {"get"},
        "/v1/payments/{transaction_id}/refunds": {"post", "get"},
        "/healthz": {"get"},
        "/readyz": {"get"},
        "/metrics": {"get"},
    }.items():
        assert methods <= set(paths[path]), path
    assert spec["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    post = paths["/v1/payments"]["post"]
    for status in ("401", "403", "409", "422", "429"):
        assert status in post["responses"], status
    assert "Problem" in spec["components"]["schemas"]
    assert client.get("/docs").status_code == 200


def test_a_body_over_64_kib_is_refused_before_authentication(gateway):
    """Issue 20, part 4: 413 problem+json at once, by Content-Length or as a chunked body
    arrives, token or not; nothing is recorded; a body under the cap goes on as before."""
    env, client, merchant, _ = gateway
    before = counts(env)
    big = b'{"payer_vpa": "' + b"a" * 70_000 + b'"}'
    for headers in ({}, {"Authorization": "Bearer nope"}, auth(merchant, "big-1")):
        r = client.post(
            "/v1/payments",
            content=big,
            headers={**headers, "Content-Type": "application/json"},
        )
        assert r.status_code == 413, r.text
        assert r.headers["content-type"].startswith("application/problem+json")
        assert r.json()["code"] == "payload_too_large"

    def chunked():
        for _ in range(40):
            yield b"x" * 4096  # 160 KiB, no Content-Length

    r = client.post("/v1/payments", content=chunked(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["code"] == "payload_too_large"
    assert counts(env) == before

    # Under the cap: authentication decides, then validation, as always.
    small = json.dumps(
        {**GOOD, "payer_vpa": "chunky@okhdfc", "merchant_order_id": "o" * 60}
    ).encode()
    assert client.post("/v1/payments", content=small).status_code == 401

    def small_chunks():
        yield small[:10]
        yield small[10:]

    r = client.post(
        "/v1/payments",
        content=small_chunks(),
        headers={**auth(merchant, "chunked-ok"), "Content-Type": "application/json"},
    )
    assert r.status_code == 202, r.text
