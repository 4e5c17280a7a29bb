"""The mock NPCI switch over HTTP (``upi-engine npci-mock``): the switch port's calls, plus
the simulator's own controls (faults, balances, its journal of calls).

The engine's client of it is :class:`payments.npci.http.HttpSwitch`. Errors on the wire:
a 503 is a request refused before processing, a 429 a call refused under NPCI's API rules
(with ``Retry-After``).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import date, datetime
from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from core.errors import SwitchError, SwitchRateLimited
from core.metrics import CONTENT_TYPE_LATEST, exposition
from npcisim.mock import MockSwitch
from payments.npci.switch import DisputeNotice, PayRequest, RefundRequest, SwitchResult

__all__ = ["create_mock_app"]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PayBody(_Body):
    txn_id: str = Field(min_length=1, max_length=64)
    payer_vpa: str
    payee_vpa: str
    amount_paise: int = Field(ge=1)
    note: str | None = None


class RefundBody(_Body):
    refund_id: str = Field(min_length=1, max_length=64)
    original_txn_id: str
    payer_vpa: str
    payee_vpa: str
    amount_paise: int = Field(ge=1)


class FaultBody(_Body):
    extra_latency_ms: float = Field(default=0, ge=0)
    timeout_rate: float = Field(default=0, ge=0, le=1)
    error_rate: float = Field(default=0, ge=0, le=1)
    down: bool = False
    dispute_rate: float = Field(default=0, ge=0, le=1)
    late_success_rate: float = Field(default=0, ge=0, le=1)


class DisputeAnswerBody(_Body):
    accept: bool
    evidence: str | None = Field(default=None, max_length=20_000)
    documents: list[str] = Field(default_factory=list, max_length=20)


class SettlementDataBody(_Body):
    business_date: date
    refs: list[str] = Field(default_factory=list)


class RaiseDisputeBody(_Body):
    reason: str = Field(default="goods_not_received", min_length=1, max_length=64)


def _dispute(n: DisputeNotice) -> dict[str, Any]:
    return {
        "dispute_id": n.dispute_id,
        "txn_id": n.txn_id,
        "amount_paise": n.amount_paise,
        "reason": n.reason,
        "raised_at": n.raised_at.isoformat(),
        "respond_by": n.respond_by.isoformat(),
        "status": n.status,
        "changed_at": n.changed_at.isoformat(),
        "payer_bank": n.payer_bank,
        "payee_bank": n.payee_bank,
        "decided_at": n.decided_at.isoformat() if n.decided_at else None,
    }


def _result(r: SwitchResult) -> dict[str, Any]:
    return {
        "txn_id": r.txn_id,
        "response_code": r.response_code,
        "rrn": r.rrn,
        "payer_bank": r.payer_bank,
        "payee_bank": r.payee_bank,
        "known": r.known,
    }


def create_mock_app(
    switch: MockSwitch,
    on_start: Callable[[], Awaitable[None]] | None = None,
    on_stop: Callable[[], Awaitable[None]] | None = None,
) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if on_start:
            await on_start()
        yield
        await switch.close()  # the requests it received finish before the database goes
        if on_stop:
            await on_stop()

    app = FastAPI(title="mock NPCI switch", version="1", lifespan=lifespan)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/v1/pay")
    async def pay(body: PayBody) -> JSONResponse:
        try:
            result = await switch.pay(PayRequest(**body.model_dump()))
        except SwitchError as exc:
            return JSONResponse({"error": str(exc)}, status_code=503)
        return JSONResponse(_result(result))

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(exposition(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/transactions/{txn_id}")
    async def check_status(txn_id: str) -> JSONResponse:
        try:
            return JSONResponse(_result(await switch.check_status(txn_id)))
        except SwitchRateLimited as exc:
            retry_after = exc.retry_after_s or 0.0
            return JSONResponse(
                {
                    "error": "rate_limited",
                    "api": exc.api,
                    "reason": exc.reason,
                    "retry_after_s": retry_after,
                },
                status_code=429,
                headers={"Retry-After": str(math.ceil(retry_after))},
            )

    @app.get("/v1/transactions/{txn_id}/calls")
    async def calls(txn_id: str) -> dict[str, Any]:
        journal = await switch.calls(txn_id)
        return {
            "txn_id": txn_id,
            "calls": [
                {"api": c.api, "at": c.at.isoformat(), "outcome": c.outcome} for c in journal
            ],
        }

    @app.post("/v1/transactions/{txn_id}/reversal")
    async def reverse(txn_id: str) -> dict[str, Any]:
        r = await switch.reverse(txn_id)
        return {"txn_id": r.txn_id, "response_code": r.response_code, "reversed": r.reversed}

    @app.post("/v1/refunds")
    async def refund(body: RefundBody) -> dict[str, Any]:
        return _result(await switch.refund(RefundRequest(**body.model_dump())))

    @app.get("/v1/disputes")
    async def disputes(since: datetime, limit: int = 500) -> dict[str, Any]:
        found = await switch.dispute_updates(since, min(max(limit, 1), 1000))
        return {"disputes": [_dispute(n) for n in found]}

    @app.post("/v1/disputes/{dispute_id}/answer")
    async def answer(dispute_id: str, body: DisputeAnswerBody) -> JSONResponse:
        try:
            notice = await switch.answer_dispute(
                dispute_id, accept=body.accept, evidence=body.evidence, documents=body.documents
            )
        except SwitchError as exc:
            return JSONResponse({"error": str(exc)}, status_code=404)
        return JSONResponse(_dispute(notice))

    @app.post("/v1/transactions/{txn_id}/disputes")
    async def raise_dispute(txn_id: str, body: RaiseDisputeBody) -> JSONResponse:
        try:
            return JSONResponse(_dispute(await switch.raise_dispute(txn_id, body.reason)))
        except SwitchError as exc:
            return JSONResponse({"error": str(exc)}, status_code=409)

    @app.post("/v1/settlement-data")
    async def settlement_data(body: SettlementDataBody) -> dict[str, Any]:
        """A POST: the references of a day can be far more than a URL holds."""
        found = await switch.settlement_data(body.business_date, body.refs)
        return {
            "business_date": body.business_date.isoformat(),
            "rows": [r.__dict__ for r in found],
        }

    @app.get("/v1/accounts/{vpa}")
    async def account(vpa: str) -> dict[str, Any]:
        return {"vpa": vpa, "balance_paise": await switch.balance(vpa)}

    @app.get("/v1/faults")
    async def faults() -> dict[str, Any]:
        return {bank: f.__dict__ for bank, f in switch.faults.items()}

    @app.put("/v1/faults/{bank}")
    async def inject(bank: str, body: FaultBody) -> dict[str, Any]:
        return switch.inject(bank.upper(), **body.model_dump()).__dict__

    @app.delete("/v1/faults")
    async def clear_all() -> dict[str, str]:
        switch.clear_faults()
        return {"status": "cleared"}

    @app.delete("/v1/faults/{bank}")
    async def clear(bank: str) -> dict[str, str]:
        switch.clear_faults(bank.upper())
        return {"status": "cleared"}

    return app
