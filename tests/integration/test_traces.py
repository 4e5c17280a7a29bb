"""One payment is one trace (SPEC §10), on the real PostgreSQL, through the HTTP API, the
outbox, the in-process bus, fraud, the switch, the ledger and settlement, held by the
SDK's in-memory exporter. Several payments at once share consumer batches; each keeps a
trace of its own."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from sqlalchemy import text

from api.auth import Role, issue_token
from api.bootstrap import Engine
from api.http import create_app
from core import tracing
from core.events import Envelope
from payments import service
from payments.domain import PaymentStatus
from payments.merchants import Merchant, insert_merchant
from tests.support import running_engine

pytestmark = pytest.mark.postgres

SCORERS = {
    "fraud.score.velocity",
    "fraud.score.location",
    "fraud.score.device",
    "fraud.score.model",
}


@pytest.fixture
def exporter() -> AsyncIterator[InMemorySpanExporter]:
    exported = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exported))
    tracing.use(provider)
    yield exported
    tracing.use(None)
    provider.shutdown()


@pytest.fixture
async def engine(db_url, exporter) -> AsyncIterator[Engine]:
    async with running_engine(db_url) as eng:
        yield eng


async def _api_key(engine: Engine) -> str:
    async with engine.db.transaction() as conn:
        await insert_merchant(conn, Merchant("mer_1", "Shop", "shop@okicici", "5411", None), b"x")
        return await issue_token(
            conn, principal_id="p_mer_1", role=Role.MERCHANT, name="shop", merchant_id="mer_1"
        )


def _one(spans: list[ReadableSpan], name: str, event_type: str | None) -> ReadableSpan:
    found = [
        s
        for s in spans
        if s.name == name
        and (event_type is None or s.attributes.get("upi.event_type") == event_type)
    ]
    assert len(found) == 1, (name, event_type, sorted(s.name for s in spans))
    return found[0]


def parent_of(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


def _hex(n: int, width: int) -> str:
    return format(n, f"0{width}x")


async def _spans_until(exporter, txns, timeout: float = 20.0) -> list[ReadableSpan]:
    """Every span, once each payment's settlement record of its success has ended."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        spans = list(exporter.get_finished_spans())
        settled = {
            s.attributes.get("upi.transaction_id")
            for s in spans
            if s.name == "settlement.record"
            and s.attributes.get("upi.event_type") == "PaymentSucceeded"
        }
        ledgered = {
            s.attributes.get("upi.transaction_id")
            for s in spans
            if s.name == "ledger.append"
            and s.attributes.get("upi.event_type") == "PaymentSucceeded"
        }
        if set(txns) <= settled & ledgered:
            return spans
        assert asyncio.get_running_loop().time() < deadline, sorted({s.name for s in spans})
        await asyncio.sleep(0.05)


async def test_each_payment_is_one_trace_from_the_request_to_settlement(engine, exporter):
    key = await _api_key(engine)
    app = create_app(engine, manage_engine=False)
    payers = ["success@okhdfc", "success@oksbi", "success@okaxis"]
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://engine"
    ) as client:

        async def pay(n: int, payer: str) -> str:
            r = await client.post(
                "/v1/payments",
                headers={"Authorization": f"Bearer {key}", "Idempotency-Key": f"k{n}"},
                json={"payer_vpa": payer, "amount_paise": 1000 + n, "merchant_order_id": f"o{n}"},
            )
            assert r.status_code == 202, r.text
            return str(r.json()["transaction_id"])

        txns = await asyncio.gather(*(pay(n, p) for n, p in enumerate(payers)))
    for txn in txns:
        deadline = asyncio.get_running_loop().time() + 20
        while not (
            await service.get_payment(engine.db, "mer_1", txn, engine.master_key)
        ).status.is_final:
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.02)
        assert (
            await service.get_payment(engine.db, "mer_1", txn, engine.master_key)
        ).status is PaymentStatus.SUCCESS

    spans = await _spans_until(exporter, txns)
    requests = [s for s in spans if s.name == "POST /v1/payments"]
    assert len(requests) == 3
    by_trace: dict[int, list[ReadableSpan]] = {}
    for span in spans:
        by_trace.setdefault(span.context.trace_id, []).append(span)
    for txn in txns:
        mine = [s for s in spans if s.attributes.get("upi.transaction_id") == txn]
        traces = {s.context.trace_id for s in mine}
        assert len(traces) == 1, f"{txn}'s spans are in {len(traces)} traces"
        [trace_id] = traces
        in_trace = by_trace[trace_id]
        # Nothing of another payment in this trace.
        assert {s.attributes.get("upi.transaction_id") for s in in_trace} <= {txn, None}

        def one(name: str, event_type: str | None = None, spans=in_trace) -> ReadableSpan:
            return _one(spans, name, event_type)

        request = one("POST /v1/payments")
        assert request.parent is None, "the request is the root"
        assert request.kind.name == "SERVER"
        assert request.attributes["http.response.status_code"] == 202
        fraud = one("fraud.assess")
        assert parent_of(fraud) == request.context.span_id
        assert fraud.attributes["fraud.decision"] == "ALLOW"
        scorers = [s for s in in_trace if s.name.startswith("fraud.score.")]
        assert {s.name for s in scorers} == SCORERS
        assert {parent_of(s) for s in scorers} == {fraud.context.span_id}
        switch = one("switch.pay")
        assert parent_of(switch) == fraud.context.span_id
        assert switch.attributes["upi.response_code"] == "00"
        assert switch.attributes["upi.bank"] in {"HDFC", "SBI", "AXIS"}
        # The ledger appends every event of the payment, each under the span that caused it.
        assert parent_of(one("ledger.append", "PaymentInitiated")) == request.context.span_id
        assert parent_of(one("ledger.append", "FraudAssessed")) == fraud.context.span_id
        assert parent_of(one("ledger.append", "PaymentSubmitted")) == fraud.context.span_id
        assert parent_of(one("ledger.append", "PaymentSucceeded")) == switch.context.span_id
        settled = one("settlement.record", "PaymentSucceeded")
        assert parent_of(settled) == switch.context.span_id
        # The outbox holds each event with its trace context: what the buses hand on.
        async with engine.db.connection() as conn:
            rows = (await conn.execute(text("SELECT envelope FROM outbox ORDER BY id"))).scalars()
            stored = [Envelope.from_bytes(bytes(raw)) for raw in rows]
        carried = {
            e.event_type: e.headers["traceparent"].split("-")[1]
            for e in stored
            if e.transaction_id == txn
        }
        assert set(carried) == {
            "PaymentInitiated",
            "FraudAssessed",
            "PaymentSubmitted",
            "PaymentSucceeded",
        }
        assert set(carried.values()) == {_hex(trace_id, 32)}
