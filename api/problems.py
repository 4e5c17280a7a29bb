"""RFC 9457 problem details. Every error response is ``application/problem+json`` with a
stable ``code``; the codes are listed in :data:`CODES` (and in the merchant guide)."""

from __future__ import annotations

import re
from typing import Any

import asyncpg
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import SQLAlchemyError
from starlette.exceptions import HTTPException as StarletteHTTPException

from core.errors import (
    DisputeRejected,
    DomainError,
    IdempotencyConflict,
    InvalidTransition,
    LimitExceeded,
    NotFound,
    PayeeNotAllowed,
    RefundRejected,
    StorageError,
    VerificationRejected,
)
from core.storage import database_unavailable

__all__ = ["CODES", "RETRY_AFTER_S", "Problem", "install_problem_handlers", "unavailable_response"]

RETRY_AFTER_S = 2  # the embedded server is back within about that; a failover, a little more

CODES: dict[str, tuple[int, str]] = {
    "unauthenticated": (401, "Missing or invalid bearer token"),
    "forbidden": (403, "This token's role may not do this"),
    "not_found": (404, "No such resource"),
    "validation_error": (422, "The request is not valid"),
    "idempotency_key_missing": (400, "The Idempotency-Key header is required"),
    "idempotency_conflict": (409, "Idempotency-Key reused with a different request"),
    "invalid_transition": (409, "The payment is not in a state that allows this"),
    "payee_not_allowed": (422, "The payee VPA is not one of this merchant's registered VPAs"),
    "amount_over_limit": (422, "Amount above the per-transaction limit for this merchant category"),
    "payer_daily_count_exceeded": (422, "The payer reached the daily number of payments"),
    "payer_daily_amount_exceeded": (422, "The payer reached the daily amount"),
    "payer_category_daily_amount_exceeded": (
        422,
        "The payer reached the daily amount for this merchant category",
    ),
    "payment_not_refundable": (409, "Only SUCCESS payments can be refunded"),
    "refund_exceeds_payment": (422, "Refunds would exceed the payment amount"),
    "dispute_not_open": (409, "The dispute was answered or closed already"),
    "dispute_overdue": (
        409,
        "The dispute's respond_by has passed: it is accepted, not contestable",
    ),
    "verification_not_required": (409, "This payment was not stepped up: nothing to verify"),
    "verification_closed": (409, "The payment is no longer awaiting verification"),
    "verification_expired": (409, "The verification window (120 s by default) has closed"),
    "verification_failed": (422, "Wrong OTP; the payment fails after the last try"),
    "verification_unavailable": (
        503,
        "The step-up provider gave no verdict; this try is not counted, retry after Retry-After",
    ),
    "rate_limited": (429, "Too many requests for this merchant; see Retry-After"),
    "payload_too_large": (413, "The request body is larger than the API takes (64 KiB)"),
    "unsupported_media_type": (415, "Send JSON with Content-Type: application/json"),
    "method_not_allowed": (405, "Method not allowed"),
    "database_unavailable": (503, "The database is unavailable; retry after Retry-After"),
    "bus_unavailable": (503, "The event bus is unavailable; retry after Retry-After"),
    "internal_error": (500, "Unexpected error"),
}


class Problem(Exception):
    def __init__(
        self,
        code: str,
        detail: str | None = None,
        *,
        headers: dict[str, str] | None = None,
        **extra: Any,
    ) -> None:
        self.code = code
        self.status, self.title = CODES[code]
        self.detail = detail
        self.headers = headers or {}
        self.extra = extra


def problem_response(
    code: str, detail: str | None = None, headers: dict[str, str] | None = None, **extra: Any
) -> JSONResponse:
    status, title = CODES[code]
    body: dict[str, Any] = {
        "type": f"https://upi-engine.dev/problems/{code}",
        "title": title,
        "status": status,
        "code": code,
    }
    if detail:
        body["detail"] = detail
    body.update(extra)
    return JSONResponse(
        body, status_code=status, media_type="application/problem+json", headers=headers
    )


def unavailable_response(code: str, detail: str) -> JSONResponse:
    """503 for a dependency that is down (SPEC §4): the client retries after
    ``Retry-After`` seconds, with the same Idempotency-Key."""
    return problem_response(code, detail, headers={"Retry-After": str(RETRY_AFTER_S)})


def _documented_methods(app: FastAPI, path: str) -> set[str]:
    table: list[tuple[re.Pattern[str], set[str]]] | None = getattr(app.state, "allow_table", None)
    if table is None:
        table = []
        for template, operations in app.openapi().get("paths", {}).items():
            regex = re.compile("^" + re.sub(r"\\\{[^/]+?\\\}", "[^/]+", re.escape(template)) + "$")
            table.append((regex, {m.upper() for m in operations}))
        app.state.allow_table = table
    return {m for regex, methods in table if regex.match(path) for m in methods}


def install_problem_handlers(app: FastAPI) -> None:
    @app.exception_handler(Problem)
    async def _problem(_: Request, exc: Problem) -> JSONResponse:
        headers = dict(exc.headers)
        if exc.code == "unauthenticated":
            headers["WWW-Authenticate"] = "Bearer"
        return problem_response(exc.code, exc.detail, headers=headers or None, **exc.extra)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [
            {
                "loc": [str(p) for p in e.get("loc", ())],
                "msg": e.get("msg", ""),
                "type": e.get("type", ""),
            }
            for e in exc.errors()
        ]
        return problem_response("validation_error", "see errors", errors=errors)

    @app.exception_handler(DomainError)
    async def _domain(_: Request, exc: DomainError) -> JSONResponse:
        match exc:
            case NotFound():
                return problem_response("not_found", str(exc))
            case IdempotencyConflict():
                return problem_response("idempotency_conflict", str(exc))
            case InvalidTransition():
                return problem_response("invalid_transition", str(exc))
            case LimitExceeded():  # the limit it names, machine readable (limit_paise, ...)
                fields: dict[str, Any] = exc.limit_fields()
                return problem_response(exc.code, str(exc), **fields)
            case VerificationRejected(code="verification_unavailable"):
                return unavailable_response(exc.code, str(exc))
            case PayeeNotAllowed() | RefundRejected() | VerificationRejected() | DisputeRejected():
                return problem_response(exc.code, str(exc))
        return problem_response("validation_error", str(exc))

    @app.exception_handler(StorageError)
    async def _storage(_: Request, exc: StorageError) -> JSONResponse:
        return unavailable_response("database_unavailable", "database unavailable")

    async def _driver(request: Request, exc: Exception) -> JSONResponse:
        # A driver error that escaped the storage layer: still a 503 if it means the
        # database is unavailable; anything else is a bug, and a 500.
        if database_unavailable(exc):
            return unavailable_response("database_unavailable", "database unavailable")
        raise exc

    app.add_exception_handler(SQLAlchemyError, _driver)
    app.add_exception_handler(asyncpg.PostgresError, _driver)
    app.add_exception_handler(asyncpg.InterfaceError, _driver)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 405:
            # Starlette names only the first route that matched the path; a path can have
            # several routes (GET and POST), so list every method the API documents for it.
            methods = _documented_methods(request.app, request.url.path)
            if methods:
                exc.headers = {**(exc.headers or {}), "Allow": ", ".join(sorted(methods))}
        code = {
            401: "unauthenticated",
            403: "forbidden",
            404: "not_found",
            405: "method_not_allowed",
            415: "unsupported_media_type",
        }.get(exc.status_code, "validation_error")
        return problem_response(
            code, str(exc.detail) if exc.detail else None, headers=dict(exc.headers or {}) or None
        )
