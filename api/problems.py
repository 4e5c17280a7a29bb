"""RFC 9457 problem details. Every error response is ``application/problem+json`` with a
stable ``code``; the codes are listed in :data:`CODES` (and in the merchant guide)."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from core.errors import DomainError, IdempotencyConflict, InvalidTransition, NotFound, StorageError

__all__ = ["CODES", "Problem", "install_problem_handlers"]

CODES: dict[str, tuple[int, str]] = {
    "unauthenticated": (401, "Missing or invalid bearer token"),
    "forbidden": (403, "This token's role may not do this"),
    "not_found": (404, "No such resource"),
    "validation_error": (422, "The request is not valid"),
    "idempotency_key_missing": (400, "The Idempotency-Key header is required"),
    "idempotency_conflict": (409, "Idempotency-Key reused with a different request"),
    "invalid_transition": (409, "The payment is not in a state that allows this"),
    "method_not_allowed": (405, "Method not allowed"),
    "service_unavailable": (503, "A dependency is unavailable; retry later"),
    "internal_error": (500, "Unexpected error"),
}


class Problem(Exception):
    def __init__(self, code: str, detail: str | None = None, **extra: Any) -> None:
        self.code = code
        self.status, self.title = CODES[code]
        self.detail = detail
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


def install_problem_handlers(app: FastAPI) -> None:
    @app.exception_handler(Problem)
    async def _problem(_: Request, exc: Problem) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.code == "unauthenticated" else None
        return problem_response(exc.code, exc.detail, headers=headers, **exc.extra)

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
        return problem_response("validation_error", str(exc))

    @app.exception_handler(StorageError)
    async def _storage(_: Request, exc: StorageError) -> JSONResponse:
        return problem_response(
            "service_unavailable", "database unavailable", headers={"Retry-After": "1"}
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {
            401: "unauthenticated",
            403: "forbidden",
            404: "not_found",
            405: "method_not_allowed",
        }.get(exc.status_code, "validation_error")
        return problem_response(code, str(exc.detail) if exc.detail else None)
