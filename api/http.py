"""The HTTP API (SPEC §4). Thin: routers build a command, call the service, map errors once."""

import asyncio
import base64
import binascii
import contextlib
import time
from collections.abc import AsyncIterator
from datetime import date
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends, FastAPI, Header, Path, Query, Request, Response
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.auth import Principal, Role, TokenCache, authenticate
from api.bootstrap import Engine, payment_limits, verification_policy
from api.bootstrap import Role as EngineRole
from api.problems import (
    CODES,
    RETRY_AFTER_S,
    Problem,
    install_problem_handlers,
    problem_response,
)
from api.ratelimit import ApiLimits, Rate, TokenBuckets
from api.schemas import (
    ID_PATTERN,
    ORDER_ID_PATTERN,
    ContestDisputeRequest,
    CosignatureIn,
    CreatePaymentRequest,
    CreateRefundRequest,
    DisputeList,
    DisputeStatusName,
    DisputeView,
    PaymentAccepted,
    PaymentList,
    PaymentView,
    RefundList,
    RefundView,
    VerificationRequest,
)
from api.telemetry import TraceRequests
from compliance import chain, ledger, witnesses
from compliance.audit import record_audit_access
from core.events import DeviceInfo
from core.metrics import CONTENT_TYPE_LATEST, HTTP_REQUESTS, LEDGER_VALID, exposition
from dr.status import dr_status
from payments import disputes, refunds, service
from payments.verification import verify
from settlement.run import closed_summary

__all__ = ["create_app", "metrics_response"]

_bearer = HTTPBearer(auto_error=False, description="API key or auditor/operator token")

_VERIFY_CACHE_S = 2.0  # GET /v1/audit/verify answers from a result this recent


def _problem_doc(*codes: str) -> dict[int | str, dict[str, Any]]:
    """One response per status; a status with several codes (422) names each of them."""
    by_status: dict[int, list[str]] = {}
    for c in dict.fromkeys(codes):
        by_status.setdefault(CODES[c][0], []).append(c)
    return {
        status: {
            "description": CODES[group[0]][1]
            if len(group) == 1
            else "; ".join(f"`{c}`: {CODES[c][1]}" for c in group),
            "content": {
                "application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}
            },
        }
        for status, group in by_status.items()
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


MAX_BODY_BYTES = 64 * 1024


class _BodyLimit:
    """Refuses a request body over ``MAX_BODY_BYTES`` with 413 before anything reads it,
    authentication included: by its Content-Length at once, or, when it has none, as the
    bytes arrive (at most the limit is ever held)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or ()).get(b"content-length")
        too_large = problem_response(
            "payload_too_large", f"at most {MAX_BODY_BYTES} bytes", headers={"Connection": "close"}
        )
        if declared is not None:
            if not declared.isdigit() or int(declared) > MAX_BODY_BYTES:
                await too_large(scope, receive, send)
                return
            await self.app(scope, receive, send)
            return
        if scope["method"] in ("GET", "HEAD", "DELETE", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        # No length given (chunked): read up to the limit here, then hand the body on.
        chunks: list[Message] = []
        size = 0
        while True:
            message = await receive()
            chunks.append(message)
            if message["type"] != "http.request":
                break
            size += len(message.get("body", b""))
            if size > MAX_BODY_BYTES:
                await too_large(scope, receive, send)
                return
            if not message.get("more_body", False):
                break

        async def replay() -> Message:
            return chunks.pop(0) if chunks else await receive()

        await self.app(scope, replay, send)


# GET /metrics: every process's metrics of this serve, added up (api/serve_metrics.py).
# (No docstring: it would become the operation's description.)
async def metrics_response() -> Response:
    return Response(exposition(), media_type=CONTENT_TYPE_LATEST)


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

    # Production (UPI_ENV) serves the docs, the OpenAPI text and the metrics only on the
    # internal listener (api/internal.py): here they are 404.
    public_only = engine.settings.production
    app = FastAPI(
        title="upi-engine",
        version="0.1.0",
        description="UPI payment event engine: collect money from a payer's VPA.",
        lifespan=lifespan,
        docs_url=None if public_only else "/docs",
        redoc_url=None if public_only else "/redoc",
        openapi_url=None if public_only else "/openapi.json",
    )
    install_problem_handlers(app)
    limits = payment_limits(engine.settings)

    verification = verification_policy(engine.settings)

    app.add_middleware(_BodyLimit)
    app.add_middleware(TraceRequests)  # the request's span, while tracing is on
    app.add_middleware(_RequestTiming)  # outermost: it times the 413s too
    tokens = TokenCache()
    settings = engine.settings
    limited = ApiLimits(
        engine.db,
        merchant=Rate(settings.merchant_rate_per_s, settings.merchant_rate_burst),
        merchant_read=Rate(settings.merchant_read_rate_per_s, settings.merchant_read_rate_burst),
        auditor=Rate(settings.auditor_rate_per_s, settings.auditor_rate_burst),
        operator=Rate(settings.operator_rate_per_s, settings.operator_rate_burst),
        auth_failures=Rate(settings.auth_failure_rate_per_s, settings.auth_failure_burst),
        trusted_proxies=settings.trusted_proxies,
    )

    def rate_limited(wait: float, why: str) -> Problem:
        retry_after = TokenBuckets.retry_after(wait)
        return Problem(
            "rate_limited",
            f"{why}; retry after {retry_after} s",
            headers={"Retry-After": retry_after},
        )

    async def principal(
        request: Request,
        creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    ) -> Principal:
        """The caller, within its role's rate limit (api/ratelimit.py ApiLimits): one take
        per request, the one the merchant limit always made; a failure counts against the
        client's address, and over its limit is 429 rather than 401."""
        found = None
        if creds is not None:
            found = await authenticate(engine.db, creds.credentials, tokens)
        if found is None:
            if (wait := await limited.failed_authentication(request.scope)) > 0:
                raise rate_limited(wait, "too many failed authentications from this address")
            raise Problem("unauthenticated")
        wait = await limited.take(
            found.role.value,
            found.merchant_id or found.principal_id,
            read=request.method in ("GET", "HEAD"),
        )
        if wait > 0:
            raise rate_limited(wait, f"{found.role.value} rate limit")
        return found

    async def merchant(who: Annotated[Principal, Depends(principal)]) -> Principal:
        if who.role is not Role.MERCHANT or who.merchant_id is None:
            raise Problem("forbidden", "merchant API key required")
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

    @ops.get("/readyz", responses={503: {"description": "Not ready: see `missing`"}})
    async def readyz() -> Response:
        """200 when every dependency answers; else 503, and ``missing`` names what is
        missing (``database``, ``bus``, ``relay_running``)."""
        checks = await engine.ready()
        missing = [name for name, ok in checks.items() if not ok]
        if not missing:
            return JSONResponse({"status": "ready", "checks": checks})
        return JSONResponse(
            {"status": "not_ready", "checks": checks, "missing": missing},
            status_code=503,
            headers={"Retry-After": str(RETRY_AFTER_S)},
        )

    if not public_only:
        ops.add_api_route(
            "/metrics",
            metrics_response,
            name="metrics",
            methods=["GET"],
            response_class=Response,
            responses={200: {"content": {CONTENT_TYPE_LATEST.split(";")[0]: {}}}},
        )

    app.include_router(ops)

    payments = APIRouter(prefix="/v1/payments", tags=["payments"])
    auth_errors = ("unauthenticated", "forbidden", "rate_limited")  # every authenticated route
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
            "payer_category_daily_amount_exceeded",
            "rate_limited",
            "database_unavailable",
            "bus_unavailable",
        ),
    )
    async def create_payment(
        body: CreatePaymentRequest,
        raw: Annotated[Any, Depends(json_body)],
        who: Annotated[Principal, Depends(merchant)],
        idempotency_key: Annotated[str | None, idempotency_key_header] = None,
    ) -> JSONResponse:
        """Collect money from a payer's VPA. Answers 202 at once; the final status follows
        (poll ``GET /v1/payments/{id}`` or receive the webhook)."""
        if not idempotency_key:
            raise Problem("idempotency_key_missing")
        if engine.bus_unavailable():
            # The payment would be stored, but nothing would happen to it until the bus is
            # back, past NPCI's timers: better the merchant retries (same key) later.
            raise Problem(
                "bus_unavailable",
                "the event bus is unreachable",
                headers={"Retry-After": str(RETRY_AFTER_S)},
            )
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
            partition_key=engine.master_key.partition_key(body.payer_vpa.value),
        )
        result = await service.initiate_payment(
            engine.db, cmd, engine.clock, limits, master=engine.master_key
        )
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
        payment = await service.get_payment(
            engine.db, who.merchant_id, transaction_id, engine.master_key
        )
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
        after: Annotated[str | None, Query(max_length=64, pattern=ID_PATTERN)] = None,
        cursor: Annotated[
            str | None, Query(max_length=64, pattern=ID_PATTERN, description="Same as after")
        ] = None,
    ) -> PaymentList:
        """Payments of one merchant order, oldest first; the next page with
        ``after=next_after`` (``cursor=next_cursor``, the older names, still work)."""
        assert who.merchant_id is not None
        found = await service.list_payments(
            engine.db,
            who.merchant_id,
            merchant_order_id,
            engine.master_key,
            limit=limit + 1,
            after=after or cursor,
        )
        page = found[:limit]
        more = page[-1].transaction_id if len(found) > limit else None
        return PaymentList(
            items=[PaymentView.of(p) for p in page], next_after=more, next_cursor=more
        )

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
            "verification_unavailable",
            "rate_limited",
        ),
    )
    async def verify_payment(
        transaction_id: Annotated[str, Path(max_length=64, pattern=ID_PATTERN)],
        body: VerificationRequest,
        raw: Annotated[Any, Depends(json_body)],
        who: Annotated[Principal, Depends(merchant)],
    ) -> PaymentView:
        """Complete a ``STEP_UP``: the payer's OTP (mock: ``123456``, see the merchant guide)
        within the window (120 s). Then the payment goes to the switch. Asking again after
        success answers the same; three wrong OTPs fail the payment (``Z6``)."""
        assert who.merchant_id is not None
        payment = await verify(
            engine.db,
            who.merchant_id,
            transaction_id,
            body.otp,
            engine.clock,
            verification,
            engine.verifier,
            master=engine.master_key,
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
        who: Annotated[Principal, Depends(merchant)],
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
            reason=body.reason,
            note=body.note,
            idempotency_key=idempotency_key,
            request_hash=service.request_hash(raw),
            clock=engine.clock,
            master=engine.master_key,
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
        limit: Annotated[int, Query(ge=1, le=200)] = 50,
        after: Annotated[str | None, Query(max_length=64, pattern=ID_PATTERN)] = None,
    ) -> RefundList:
        """The payment's refunds, oldest first; the next page with ``after=next_after``."""
        assert who.merchant_id is not None
        found = await refunds.list_refunds(
            engine.db,
            who.merchant_id,
            transaction_id,
            engine.master_key,
            limit=limit + 1,
            after=after,
        )
        page = found[:limit]
        return RefundList(
            items=[RefundView.model_validate(r.view()) for r in page],
            next_after=page[-1].refund_id if len(found) > limit else None,
        )

    disputes_api = APIRouter(prefix="/v1/disputes", tags=["disputes"])

    @disputes_api.get(
        "",
        response_model=DisputeList,
        responses=_problem_doc(*auth_errors, "validation_error"),
    )
    async def list_disputes(
        who: Annotated[Principal, Depends(merchant)],
        status: DisputeStatusName | None = None,
        limit: Annotated[int, Query(ge=1, le=200)] = 50,
        after: Annotated[str | None, Query(max_length=64, pattern=ID_PATTERN)] = None,
    ) -> DisputeList:
        """The merchant's disputes, newest first; the next page with ``after=next_after``."""
        assert who.merchant_id is not None
        found = await disputes.list_disputes(
            engine.db,
            who.merchant_id,
            status=disputes.DisputeStatus(status) if status else None,
            limit=limit,
            after=after,
        )
        return DisputeList(
            items=[DisputeView.model_validate(d.view()) for d in found],
            next_after=found[-1].dispute_id if len(found) == limit else None,
        )

    @disputes_api.get(
        "/{dispute_id}",
        response_model=DisputeView,
        responses=_problem_doc(*auth_errors, "not_found"),
    )
    async def get_dispute(
        dispute_id: Annotated[str, Path(max_length=64, pattern=ID_PATTERN)],
        who: Annotated[Principal, Depends(merchant)],
    ) -> DisputeView:
        assert who.merchant_id is not None
        found = await disputes.get_dispute(engine.db, who.merchant_id, dispute_id)
        return DisputeView.model_validate(found.view())

    @disputes_api.post(
        "/{dispute_id}/accept",
        response_model=DisputeView,
        responses=_problem_doc(*auth_errors, "not_found", "dispute_not_open", "rate_limited"),
    )
    async def accept_dispute(
        dispute_id: Annotated[str, Path(max_length=64, pattern=ID_PATTERN)],
        who: Annotated[Principal, Depends(merchant)],
    ) -> DisputeView:
        """Accept the payer's complaint: a chargeback, debited from the next payout."""
        assert who.merchant_id is not None
        found = await disputes.accept_dispute(engine.db, who.merchant_id, dispute_id, engine.clock)
        engine.outbox_committed()
        return DisputeView.model_validate(found.view())

    @disputes_api.post(
        "/{dispute_id}/contest",
        response_model=DisputeView,
        responses=_problem_doc(
            *auth_errors,
            "not_found",
            "validation_error",
            "dispute_not_open",
            "dispute_overdue",
            "rate_limited",
        ),
    )
    async def contest_dispute(
        dispute_id: Annotated[str, Path(max_length=64, pattern=ID_PATTERN)],
        body: ContestDisputeRequest,
        who: Annotated[Principal, Depends(merchant)],
    ) -> DisputeView:
        """Contest with evidence before ``respond_by``; the switch decides WON or LOST."""
        assert who.merchant_id is not None
        found = await disputes.contest_dispute(
            engine.db,
            engine.master_key,
            who.merchant_id,
            dispute_id,
            evidence=body.evidence,
            documents=body.documents,
            clock=engine.clock,
        )
        engine.outbox_committed()
        return DisputeView.model_validate(found.view())

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
        tree of the latest published checkpoint."""
        await audited(who, "read_transaction", transaction_id)
        return await ledger.transaction_audit(
            engine.db,
            engine.master_key,
            transaction_id,
            witnesses_required=engine.settings.ledger_witnesses_required,
        )

    @audit.get("/ledger", responses=_problem_doc(*auth_errors, "validation_error"))
    async def audit_ledger(
        who: Annotated[Principal, Depends(auditor)],
        from_height: Annotated[int, Query(ge=0)] = 0,
        limit: Annotated[int, Query(ge=1, le=10_000)] = 1_000,
        after: Annotated[int | None, Query(ge=0, description="A page's next_after")] = None,
    ) -> dict[str, Any]:
        """Export-format lines (entries and checkpoints) from ``from_height``, at most
        ``limit`` entries; the next page with ``after=next_after`` (the last entry's height;
        null when the page was not full), that is ``from_height=next_after+1``."""
        if after is not None:
            from_height = after + 1
        await audited(who, "read_ledger", f"{from_height}+{limit}")
        lines = await ledger.ledger_page(engine.db, from_height, limit)
        heights = [line["height"] for line in lines if line.get("type") == "entry"]
        return {"lines": lines, "next_after": heights[-1] if len(heights) == limit else None}

    verifying = asyncio.Lock()
    verified: list[tuple[float, dict[str, Any]]] = []  # the last result and when

    @audit.get("/verify", responses=_problem_doc(*auth_errors))
    async def audit_verify(who: Annotated[Principal, Depends(auditor)]) -> dict[str, Any]:
        """Check the chain, Merkle roots, checkpoint signatures and the stored tree, from the
        last checkpoint verified before (``ledger verify --full`` rechecks everything).
        One runs at a time in a process; requests meanwhile, and for 2 s after, get its
        result."""
        await audited(who, "verify", "ledger")
        asked = time.monotonic()
        async with verifying:
            if verified and verified[0][0] >= asked - _VERIFY_CACHE_S:
                return verified[0][1]
            result = await ledger.verify_ledger(engine.db, engine.clock, full=False)
            LEDGER_VALID.set(1 if result.valid else 0)
            body = {
                **result.to_dict(),
                # Entries known good now, this run's and those verified before it.
                "entries": (result.head_height + 1)
                if result.valid and result.head_height is not None
                else result.entries,
                "checked": result.entries,
            }
            verified[:] = [(time.monotonic(), body)]
            return body

    witnesses_required = engine.settings.ledger_witnesses_required

    def checkpoint_view(
        checkpoint: chain.Checkpoint, cosignatures: list[chain.Cosignature]
    ) -> dict[str, Any]:
        return {
            **checkpoint.to_export(),
            "cosignatures": [c.to_export() for c in cosignatures],
            "published": len(cosignatures) >= witnesses_required,
        }

    @audit.get("/checkpoints/latest", responses=_problem_doc(*auth_errors, "not_found"))
    async def audit_latest_checkpoint(
        who: Annotated[Principal, Depends(auditor)],
        published: Annotated[bool, Query()] = False,
    ) -> dict[str, Any]:
        """The newest signed checkpoint, with its cosignatures; ``published=true``: the
        newest one cosigned by ``UPI_LEDGER_WITNESSES_REQUIRED`` witnesses."""
        await audited(who, "read_checkpoint", "latest")
        checkpoint = await ledger.latest_checkpoint(
            engine.db, witnesses_required=witnesses_required if published else 0
        )
        found = await ledger.checkpoint_at(engine.db, checkpoint.height) if checkpoint else None
        if found is None:
            raise Problem("not_found", "no checkpoint yet")
        return checkpoint_view(*found)

    @audit.get("/checkpoints/{height}", responses=_problem_doc(*auth_errors, "not_found"))
    async def audit_checkpoint(
        height: Annotated[int, Path(ge=1)], who: Annotated[Principal, Depends(auditor)]
    ) -> dict[str, Any]:
        """The signed checkpoint of that height, with its cosignatures."""
        found = await ledger.checkpoint_at(engine.db, height)
        if found is None:
            raise Problem("not_found", f"no checkpoint of height {height}")
        return checkpoint_view(*found)

    @audit.get("/consistency", responses=_problem_doc(*auth_errors, "validation_error"))
    async def audit_consistency(
        who: Annotated[Principal, Depends(auditor)],
        first: Annotated[int, Query(ge=1)],
        second: Annotated[int, Query(ge=1)],
    ) -> dict[str, Any]:
        """RFC 9162 §2.1.4 proof that the tree of ``second`` entries extends the tree of
        ``first`` entries (hashes as hex); reads O(log n) stored nodes."""
        try:
            proof = await ledger.consistency_proof(engine.db, first, second)
        except ledger.ProofUnavailable as exc:
            raise Problem("validation_error", str(exc)) from None
        return {"first": first, "second": second, "proof": [h.hex() for h in proof]}

    @audit.post(
        "/cosignatures",
        status_code=201,
        responses=_problem_doc(*auth_errors, "not_found", "validation_error"),
    )
    async def audit_cosign(
        body: CosignatureIn, who: Annotated[Principal, Depends(auditor)], response: Response
    ) -> dict[str, Any]:
        """A registered witness's cosignature of a checkpoint (SPEC §6); 201 when stored,
        200 when that witness had cosigned it already."""
        try:
            cosignature = chain.Cosignature(
                body.height,
                body.witness_key_id,
                body.cosigned_at,
                base64.b64decode(body.signature, validate=True),
            )
            new = await witnesses.record_cosignature(engine.db, engine.clock.now(), cosignature)
        except witnesses.UnknownWitness:
            raise Problem(
                "forbidden", f"{body.witness_key_id} is not a registered witness"
            ) from None
        except witnesses.UnknownCheckpoint:
            raise Problem("not_found", f"no checkpoint of height {body.height}") from None
        except (witnesses.BadCosignature, binascii.Error) as exc:
            raise Problem("validation_error", str(exc)) from None
        if not new:
            response.status_code = 200
        return {"height": body.height, "witness_key_id": body.witness_key_id, "stored": new}

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
        app.include_router(disputes_api)
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
                # The limit a payment went over (amount_over_limit, payer_*_exceeded):
                # the merchant category (null: the general limits) and the limit itself.
                "category": {"type": ["string", "null"]},
                "limit_paise": {"type": "integer"},
                "limit_count": {"type": "integer"},
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
