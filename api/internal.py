"""The internal listener of ``upi-engine serve`` (``UPI_INTERNAL_PORT``, docs/security.md).

In production (``UPI_ENV=production``) the public port answers 404 for ``/docs``,
``/redoc``, ``/openapi.json`` and ``/metrics``; this listener serves them, on
``UPI_INTERNAL_HOST`` (``127.0.0.1`` by default), for operators and Prometheus only. In the
sandbox the public port keeps them, and this listener runs too if a port is given.

It is a second, small ASGI app in the serve's main process, on the same event loop as the
public server, and stops with it. Only the main process runs it: ``/metrics`` already adds
up every process of the serve (:mod:`api.serve_metrics`), so the extra gateway processes
need no listener of their own. ``/healthz`` and ``/readyz`` stay on the public port, where
load balancers look for them.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Generator
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse

from api.http import metrics_response

if TYPE_CHECKING:
    import uvicorn

__all__ = ["create_internal_app", "internal_socket", "run_with_internal"]


def create_internal_app(public: FastAPI) -> FastAPI:
    """``/metrics``, and the public API's ``/openapi.json``, ``/docs`` and ``/redoc``."""
    app = FastAPI(title="upi-engine internal", openapi_url=None, docs_url=None, redoc_url=None)
    app.add_api_route("/metrics", metrics_response, methods=["GET"], name="metrics")

    @app.get("/openapi.json")
    async def openapi() -> JSONResponse:
        return JSONResponse(public.openapi())

    @app.get("/docs")
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url="/openapi.json", title=f"{public.title} - docs")

    @app.get("/redoc")
    async def redoc() -> HTMLResponse:
        return get_redoc_html(openapi_url="/openapi.json", title=f"{public.title} - ReDoc")

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app


def internal_socket(host: str, port: int) -> socket.socket:
    """The internal listener's socket, bound now, so that a port in use stops ``serve`` with
    a configuration error before anything starts (``OSError``)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.create_server((host, port), family=family)
    sock.set_inheritable(False)  # extra gateway processes do not get it
    return sock


def run_with_internal(
    server: uvicorn.Server,
    sockets: list[socket.socket] | None,
    internal: FastAPI,
    internal_sock: socket.socket,
) -> None:
    """Run ``server`` (which handles the signals) and, beside it on its loop, the internal
    app on ``internal_sock``, stopped once ``server`` has shut down."""
    import uvicorn

    class InternalServer(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Generator[None, None, None]:
            yield  # the public server's signal handling stops both

    side = InternalServer(
        uvicorn.Config(internal, lifespan="off", log_config=None, access_log=False)
    )

    async def both() -> None:
        task = asyncio.create_task(side.serve(sockets=[internal_sock]), name="internal-listener")
        try:
            await server.serve(sockets=sockets)
        finally:
            side.should_exit = True
            await task

    factory: Any = server.config.get_loop_factory()
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(both())
