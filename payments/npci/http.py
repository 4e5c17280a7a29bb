"""The mock switch over HTTP (``upi-engine npci-mock``) and the client the engine uses when
``UPI_NPCI_URL`` is set.

Errors on the wire map onto the port's contract: a 503 or a refused connection means the
request was not processed (:class:`~core.errors.SwitchError`, safe to ask check-status and
resend); a read timeout or a dropped connection means we do not know
(:class:`~core.errors.SwitchTimeout`: the payment is deemed, never resent).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from core.errors import SwitchError, SwitchTimeout
from payments.npci.mock import Faults, MockSwitch
from payments.npci.switch import (
    PayRequest,
    RefundRequest,
    ReversalResult,
    SwitchResult,
)

__all__ = ["HttpSwitch", "create_mock_app"]


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

    @app.get("/v1/transactions/{txn_id}")
    async def check_status(txn_id: str) -> dict[str, Any]:
        return _result(await switch.check_status(txn_id))

    @app.post("/v1/transactions/{txn_id}/reversal")
    async def reverse(txn_id: str) -> dict[str, Any]:
        r = await switch.reverse(txn_id)
        return {"txn_id": r.txn_id, "response_code": r.response_code, "reversed": r.reversed}

    @app.post("/v1/refunds")
    async def refund(body: RefundBody) -> dict[str, Any]:
        return _result(await switch.refund(RefundRequest(**body.model_dump())))

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


class HttpSwitch:
    """The switch port over HTTP. Timeouts are the caller's (the NPCI leg timeouts)."""

    def __init__(self, base_url: str, *, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self._client = httpx.AsyncClient(
            base_url=base_url,
            timeout=httpx.Timeout(None, connect=5.0),
            transport=transport,
            limits=httpx.Limits(max_connections=200, max_keepalive_connections=50),
        )

    async def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        try:
            response = await self._client.request(method, path, json=body)
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            raise SwitchError(f"switch unreachable: {exc!r}") from exc
        except httpx.HTTPError as exc:  # sent, then lost: we cannot know what happened
            raise SwitchTimeout(f"no answer from the switch: {exc!r}") from exc
        if response.status_code == 503:
            raise SwitchError(f"switch refused: {response.text[:200]}")
        if response.status_code >= 500:
            raise SwitchTimeout(f"switch failed with {response.status_code}")
        if response.status_code >= 400:
            raise SwitchError(f"switch rejected the request: {response.status_code}")
        return response.json()

    async def pay(self, request: PayRequest) -> SwitchResult:
        return SwitchResult(**await self._call("POST", "/v1/pay", request.__dict__))

    async def check_status(self, txn_id: str) -> SwitchResult:
        return SwitchResult(**await self._call("GET", f"/v1/transactions/{txn_id}"))

    async def reverse(self, txn_id: str) -> ReversalResult:
        return ReversalResult(**await self._call("POST", f"/v1/transactions/{txn_id}/reversal"))

    async def refund(self, request: RefundRequest) -> SwitchResult:
        return SwitchResult(**await self._call("POST", "/v1/refunds", request.__dict__))

    async def inject(self, bank: str, faults: Faults) -> None:
        await self._call("PUT", f"/v1/faults/{bank}", faults.__dict__)

    async def clear_faults(self) -> None:
        await self._call("DELETE", "/v1/faults")

    async def balance(self, vpa: str) -> int:
        return int((await self._call("GET", f"/v1/accounts/{vpa}"))["balance_paise"])

    async def close(self) -> None:
        await self._client.aclose()
