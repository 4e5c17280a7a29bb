"""The HTTP API (SPEC §4). Thin: routers build a command, call the service, map errors once."""

import contextlib
import time
from collections.abc import AsyncIterator
from datetime import date
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends, FastAPI, Header, Path, Query, Request, Response
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.auth import Principal, Role, TokenCache, authenticate
from api.bootstrap import Engine, verification_policy
from api.bootstrap import Role as EngineRole
from api.problems import CODES, Problem, install_problem_handlers
from api.ratelimit import TokenBuckets
from api.schemas import (
    ID_PATTERN,
    ORDER_ID_PATTERN,
    CreatePaymentRequest,
    CreateRefundRequest,
    PaymentAccepted,
    PaymentList,
    PaymentView,
    RefundList,
    RefundView,
    VerificationRequest,
)
from compliance import ledger
from compliance.audit import record_audit_access
from core.events import DeviceInfo
from core.metrics import HTTP_REQUESTS
from dr.status import dr_status
from payments import refunds, service
from payments.limits import PayerDailyLimits
from payments.verification import verify
from settlement.run import closed_summary

__all__ = ["create_app"]

_bearer = HTTPBearer(auto_error=False, description="API key or auditor/operator token")


def _problem_doc(*codes: str) -> dict[int | str, dict[str, Any]]:
    return {
        CODES[c][0]: {
            "description": CODES[c][1],
            "content": {
                "application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}
            },
        }
        for c in codes
    }


class _RequestTiming:
    """HTTP latency by method, route and status (``HTTP_REQUESTS``), as plain ASGI: a
    ``BaseHTTPMiddleware`` runs every request in a task of its own, a third of the
    gateway's CPU per request before any work was done (docs/benchmarks.md)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = scope.get("route")
            HTTP_REQUESTS.labels(
                scope["method"], getattr(route, "path", "unmatched"), str(status)
            ).observe(time.perf_counter() - start)


def create_app(engine: Engine, *, manage_engine: bool = True) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if manage_engine:
            await engine.start()
        try:
            yield
        finally:
            if manage_engine:
                await engine.stop()

    app = FastAPI(
        title="upi-engine",
        version="0.1.0",
        description="UPI payment event engine: collect money from a payer's VPA.",
        lifespan=lifespan,
    )
    install_problem_handlers(app)
    limits = service.PaymentLimits(
        mcc_overrides=dict(engine.settings.mcc_limits_paise),
        payer_daily=PayerDailyLimits(
            max_count=engine.settings.payer_daily_max_count,
            max_amount_paise=engine.settings.payer_daily_max_amount_paise,
        ),
    )

    verification = verification_policy(engine.settings)

    app.add_middleware(_RequestTiming)
    tokens = TokenCache()

    async def principal(
        creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    ) -> Principal:
        if creds is None:
            raise Problem("unauthenticated")
        found = await authenticate(engine.db, creds.credentials, tokens)
        if found is None:
            raise Problem("unauthenticated")
        return found

    async def merchant(who: Annotated[Principal, Depends(principal)]) -> Principal:
        if who.role is not Role.MERCHANT or who.merchant_id is None:
            raise Problem("forbidden", "merchant API key required")
        return who

    buckets = TokenBuckets(engine.settings.merchant_rate_per_s, engine.settings.merchant_rate_burst)

    async def rate_limited_merchant(who: Annotated[Principal, Depends(merchant)]) -> Principal:
        assert who.merchant_id is not None
        wait = buckets.take(who.merchant_id)
        if wait > 0:
            retry_after = TokenBuckets.retry_after(wait)
            raise Problem(
                "rate_limited",
                f"retry after {retry_after} s",
                headers={"Retry-After": retry_after},
            )
        return who

    async def json_body(request: Request) -> Any:
        """The raw JSON body, for the idempotency hash (the model validates it separately)."""
        try:
            return orjson.loads(await request.body())
        except orjson.JSONDecodeError:
            return None  # the body model reports the error as a 422 problem

    ops = APIRouter(tags=["operations"])

    @ops.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @ops.get("/readyz", responses=_problem_doc("service_unavailable"))
    async def readyz() -> Response:
        checks = await engine.ready()
        ok = all(checks.values())
        return JSONResponse(
            {"status": "ready" if ok else "not_ready", "checks": checks},
            status_code=200 if ok else 503,
        )

    @ops.get(
        "/metrics",
        response_class=Response,
        responses={200: {"content": {CONTENT_TYPE_LATEST.split(";")[0]: {}}}},
    )
    async def metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    app.include_router(ops)

    payments = APIRouter(prefix="/v1/payments", tags=["payments"])
    auth_errors = ("unauthenticated", "forbidden")
    idempotency_key_header = Header(
        alias="Idempotency-Key",
        pattern=r"^[\x21-\x7e]+$",
        min_length=1,
        max_length=255,
        description="Required. The same key with the same body replays the first response.",
    )

    @payments.post(
        "",
        status_code=202,
        response_model=PaymentAccepted,
        responses=_problem_doc(
            *auth_errors,
            "validation_error",
            "idempotency_key_missing",
            "idempotency_conflict",
            "payee_not_allowed",
            "amount_over_limit",
            "payer_daily_count_exceeded",
            "payer_daily_amount_exceeded",
            "rate_limited",
        ),
    )
    async def create_payment(
        body: CreatePaymentRequest,
        raw: Annotated[Any, Depends(json_body)],
        who: Annotated[Principal, Depends(rate_limited_merchant)],
        idempotency_key: Annotated[str | None, idempotency_key_header] = None,
    ) -> JSONResponse:
        """Collect money from a payer's VPA. Answers 202 at once; the final status follows
        (poll ``GET /v1/payments/{id}`` or receive the webhook)."""
        if not idempotency_key:
            raise Problem("idempotency_key_missing")
        assert who.merchant_id is not None
        cmd = service.InitiatePayment(
            merchant_id=who.merchant_id,
            idempotency_key=idempotency_key,
            request_hash=service.request_hash(raw),
            payer_vpa=body.payer_vpa,
            payee_vpa=body.payee_vpa,
            amount_paise=body.amount_paise,
            merchant_order_id=body.merchant_order_id,
            note=body.note,
            device=DeviceInfo(**body.device.model_dump()) if body.device else None,
        )
        result = await service.initiate_payment(engine.db, cmd, engine.clock, limits)
        if not result.replayed:
            engine.outbox_committed()
        headers = {"Idempotent-Replayed": "true"} if result.replayed else None
        return JSONResponse(result.body, status_code=result.status_code, headers=headers)

    @payments.get(
        "/{transaction_id}",
        response_model=PaymentView,
        responses=_problem_doc(*auth_errors, "not_found"),
    )
    async def get_payment(
        transaction_id: Annotated[str, Path(max_length=64, pattern=ID_PATTERN)],
        who: Annotated[Principal, Depends(merchant)],
    ) -> PaymentView:
        assert who.merchant_id is not None
        payment = await service.get_payment(engine.db, who.merchant_id, transaction_id)
        return PaymentView.of(payment)

    @payments.get(
        "", response_model=PaymentList, responses=_problem_doc(*auth_errors, "validation_error")
    )
    async def list_payments(
        who: Annotated[Principal, Depends(merchant)],
        merchant_order_id: Annotated[
            str, Query(min_length=1, max_length=64, pattern=ORDER_ID_PATTERN)
        ],
        limit: Annotated[int, Query(ge=1, le=200)] = 50,
        cursor: Annotated[str | None, Query(max_length=64, pattern=ID_PATTERN)] = None,
    ) -> PaymentList:
        """Payments of one merchant order, oldest first; pass ``next_cursor`` for more."""
        assert who.merchant_id is not None
        found = await service.list_payments(
            engine.db, who.merchant_id, merchant_order_id, limit=limit + 1, after=cursor
        )
        page = found[:limit]
        next_cursor = page[-1].transaction_id if len(found) > limit else None
        return PaymentList(items=[PaymentView.of(p) for p in page], next_cursor=next_cursor)

    @payments.post(
        "/{transaction_id}/verification",
        status_code=202,
        response_model=PaymentView,
        responses=_problem_doc(
            *auth_errors,
            "not_found",
            "validation_error",
            "verification_not_required",
            "verification_closed",
            "verification_expired",
            "verification_failed",
            "rate_limited",
        ),
    )
    async def verify_payment(
        transaction_id: Annotated[str, Path(max_length=64, pattern=ID_PATTERN)],
        body: VerificationRequest,
        raw: Annotated[Any, Depends(json_body)],
        who: Annotated[Principal, Depends(rate_limited_merchant)],
    ) -> PaymentView:
        """Complete a ``STEP_UP``: the payer's OTP (mock: ``123456``, see the merchant guide)
        within the window (120 s). Then the payment goes to the switch. Asking again after
        success answers the same; three wrong OTPs fail the payment (``Z6``)."""
        assert who.merchant_id is not None
        payment = await verify(
            engine.db, who.merchant_id, transaction_id, body.otp, engine.clock, verification
        )
        engine.outbox_committed()
        return PaymentView.of(payment)

    @payments.post(
        "/{transaction_id}/refunds",
        status_code=202,
        response_model=RefundView,
        responses=_problem_doc(
            *auth_errors,
            "not_found",
            "validation_error",
            "idempotency_key_missing",
            "idempotency_conflict",
            "payment_not_refundable",
            "refund_exceeds_payment",
            "rate_limited",
        ),
    )
    async def create_refund(
        transaction_id: Annotated[str, Path(max_length=64, pattern=ID_PATTERN)],
        body: CreateRefundRequest,
        raw: Annotated[Any, Depends(json_body)],
        who: Annotated[Principal, Depends(rate_limited_merchant)],
        idempotency_key: Annotated[str | None, idempotency_key_header] = None,
    ) -> JSONResponse:
        """Refund a ``SUCCESS`` payment, partly or fully; credited to the payer via the switch."""
        if not idempotency_key:
            raise Problem("idempotency_key_missing")
        assert who.merchant_id is not None
        view, replayed = await refunds.request_refund(
            engine.db,
            merchant_id=who.merchant_id,
            transaction_id=transaction_id,
            amount_paise=body.amount_paise,
            idempotency_key=idempotency_key,
            request_hash=service.request_hash(raw),
            clock=engine.clock,
        )
        if not replayed:
            engine.outbox_committed()
        headers = {"Idempotent-Replayed": "true"} if replayed else None
        return JSONResponse(view, status_code=202, headers=headers)

    @payments.get(
        "/{transaction_id}/refunds",
        response_model=RefundList,
        responses=_problem_doc(*auth_errors, "not_found"),
    )
    async def get_refunds(
        transaction_id: Annotated[str, Path(max_length=64, pattern=ID_PATTERN)],
        who: Annotated[Principal, Depends(merchant)],
    ) -> RefundList:
        assert who.merchant_id is not None
        found = await refunds.list_refunds(engine.db, who.merchant_id, transaction_id)
        return RefundList(items=[RefundView.model_validate(r.view()) for r in found])

    audit = APIRouter(prefix="/v1/audit", tags=["audit"])

    async def auditor(who: Annotated[Principal, Depends(principal)]) -> Principal:
        if who.role is not Role.AUDITOR:
            raise Problem("forbidden", "auditor token required")
        return who

    async def audited(who: Principal, action: str, resource: str) -> None:
        await record_audit_access(
            engine.db,
            engine.clock,
            principal_id=who.principal_id,
            principal_name=who.name,
            action=action,
            resource=resource,
        )
        engine.outbox_committed()

    @audit.get("/transactions/{transaction_id}", responses=_problem_doc(*auth_errors))
    async def audit_transaction(
        transaction_id: Annotated[str, Path(max_length=64, pattern=ID_PATTERN)],
        who: Annotated[Principal, Depends(auditor)],
    ) -> dict[str, Any]:
        """The transaction's ledger entries, decrypted, with RFC 6962 inclusion proofs in the
        tree of the latest checkpoint."""
        await audited(who, "read_transaction", transaction_id)
        return await ledger.transaction_audit(engine.db, engine.master_key, transaction_id)

    @audit.get("/ledger", responses=_problem_doc(*auth_errors, "validation_error"))
    async def audit_ledger(
        who: Annotated[Principal, Depends(auditor)],
        from_height: Annotated[int, Query(ge=0)] = 0,
        limit: Annotated[int, Query(ge=1, le=10_000)] = 1_000,
    ) -> dict[str, Any]:
        """Export-format lines (entries and checkpoints) from ``from_height``."""
        await audited(who, "read_ledger", f"{from_height}+{limit}")
        return {"lines": await ledger.ledger_page(engine.db, from_height, limit)}

    @audit.get("/verify", responses=_problem_doc(*auth_errors))
    async def audit_verify(who: Annotated[Principal, Depends(auditor)]) -> dict[str, Any]:
        """Recompute the chain, Merkle roots and checkpoint signatures."""
        await audited(who, "verify", "ledger")
        return (await ledger.verify_ledger(engine.db, engine.clock, full=True)).to_dict()

    @audit.get("/checkpoints/latest", responses=_problem_doc(*auth_errors, "not_found"))
    async def audit_latest_checkpoint(
        who: Annotated[Principal, Depends(auditor)],
    ) -> dict[str, Any]:
        await audited(who, "read_checkpoint", "latest")
        checkpoint = await ledger.latest_checkpoint(engine.db)
        if checkpoint is None:
            raise Problem("not_found", "no checkpoint yet")
        return checkpoint.to_export()

    @audit.get("/public-keys", responses=_problem_doc(*auth_errors))
    async def audit_public_keys(who: Annotated[Principal, Depends(auditor)]) -> dict[str, str]:
        """Checkpoint verification keys (PEM) by ``signing_key_id``."""
        await audited(who, "read_public_keys", "ledger")
        return await ledger.public_key_pems(engine.db)

    operations = APIRouter(prefix="/v1", tags=["operators"])

    async def operator(who: Annotated[Principal, Depends(principal)]) -> Principal:
        if who.role is not Role.OPERATOR:
            raise Problem("forbidden", "operator token required")
        return who

    @operations.get(
        "/settlements/{business_date}",
        responses=_problem_doc(*auth_errors, "not_found", "validation_error"),
    )
    async def get_settlement(
        business_date: date, _: Annotated[Principal, Depends(operator)]
    ) -> dict[str, Any]:
        """The summary of a closed business date (``upi-engine settlement run`` closes it)."""
        summary = await closed_summary(engine.db, business_date)
        if summary is None:
            raise Problem("not_found", f"{business_date} is not closed")
        return summary

    @operations.get("/dr/status", responses=_problem_doc(*auth_errors))
    async def get_dr_status(_: Annotated[Principal, Depends(operator)]) -> dict[str, Any]:
        """This database's DR view: primary or standby, the standbys streaming from it
        (synchronous or not, replay lag), the last failover; and the orchestrator's routing
        table when ``UPI_DR_STATE_FILE`` names it."""
        async with engine.db.connection() as conn:
            return await dr_status(conn, engine.settings.dr_state_file)

    if EngineRole.GATEWAY in engine.roles:
        app.include_router(payments)
        app.include_router(audit)
        app.include_router(operations)

    original_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = original_openapi()
        schema.setdefault("components", {}).setdefault("schemas", {})["Problem"] = {
            "type": "object",
            "required": ["type", "title", "status", "code"],
            "properties": {
                "type": {"type": "string"},
                "title": {"type": "string"},
                "status": {"type": "integer"},
                "code": {"type": "string", "enum": sorted(CODES)},
                "detail": {"type": "string"},
            },
        }
        # Every error is a problem document, including FastAPI's own 422s.
        problem = {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}
        for operations in schema.get("paths", {}).values():
            for operation in operations.values():
                for status, response in operation.get("responses", {}).items():
                    if status.startswith(("4", "5")):
                        response["content"] = problem
        schema["components"]["schemas"].pop("HTTPValidationError", None)
        schema["components"]["schemas"].pop("ValidationError", None)
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app
