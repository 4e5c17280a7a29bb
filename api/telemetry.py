"""Tracing for a process of the engine: the OpenTelemetry SDK, exporting OTLP/HTTP.

Off unless ``UPI_OTEL_ENDPOINT`` is set: then :func:`start_tracing` gives
:mod:`core.tracing` an SDK tracer provider whose spans go, in batches and off the event
loop, to ``<endpoint>/v1/traces`` (an OpenTelemetry Collector, Jaeger, Tempo…), under the
service name ``UPI_OTEL_SERVICE_NAME``, for the share ``UPI_OTEL_SAMPLE_RATIO`` of the
payments (each one traced whole or not at all). The SDK is imported here only, and only then: the
rest of the engine uses the API (``core/tracing.py``), which costs nothing while off.

:class:`TraceRequests` is the HTTP request's span (``POST /v1/payments``), the root of a
payment's trace (docs/observability.md).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from core import tracing
from core.config import Settings
from core.errors import ConfigError

__all__ = ["TraceRequests", "start_tracing", "traces_url"]

_CARRIED = (b"traceparent", b"tracestate")
_QUEUED_SPANS = 16_384  # a few seconds of spans at the engine's peak, a few MB


def traces_url(endpoint: str) -> str:
    """OTLP/HTTP's traces URL under ``endpoint`` (a collector's base URL, as
    ``OTEL_EXPORTER_OTLP_ENDPOINT``; one ending in ``/v1/traces`` is taken as it is)."""
    endpoint = endpoint.rstrip("/")
    return endpoint if endpoint.endswith("/v1/traces") else endpoint + "/v1/traces"


def start_tracing(settings: Settings, roles: list[str]) -> Callable[[], None] | None:
    """Trace this process to ``UPI_OTEL_ENDPOINT``, if set; returns what flushes and stops
    the exporter (None: tracing is left as it was, off unless a test turned it on)."""
    if not settings.otel_endpoint:
        return None
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    except ImportError as exc:  # installed without its dependencies
        raise ConfigError(
            f"UPI_OTEL_ENDPOINT: the OTLP exporter is not installed ({exc.name})"
        ) from None

    class HashedOnce(Resource):
        """The SDK's ``Resource``, its hash computed once. The OTLP encoder groups every
        exported span by resource in a dict, and ``Resource.__hash__`` JSON-encodes the
        attributes at each call: profiled under load, a third of the exporter's time (a
        resource is not changed once made)."""

        def __init__(self, attributes: Any, schema_url: str | None = None) -> None:
            super().__init__(attributes, schema_url)
            self._hash = super().__hash__()

        def __hash__(self) -> int:
            return self._hash

    made = Resource.create(
        {
            "service.name": settings.otel_service_name,
            "service.instance.id": f"{os.uname().nodename}:{os.getpid()}",
            "upi.roles": ",".join(sorted(roles)),
        }
    )
    resource = HashedOnce(made.attributes, made.schema_url)
    # A share of the payments (their requests) is traced whole; the others cost no span.
    sampler = ParentBased(TraceIdRatioBased(settings.otel_sample_ratio))
    provider = TracerProvider(resource=resource, sampler=sampler)
    provider.add_span_processor(
        BatchSpanProcessor(
            OTLPSpanExporter(endpoint=traces_url(settings.otel_endpoint)),
            # The SDK's queue (2,048 spans) overflows, dropping spans, within half a second
            # of a busy engine (~13 spans a payment); a batch per 512 spans as by default.
            max_queue_size=_QUEUED_SPANS,
            max_export_batch_size=512,
        )
    )
    tracing.use(provider)

    def stop() -> None:
        tracing.use(None)
        provider.shutdown()  # exports what is still queued

    return stop


class TraceRequests:
    """The span of each HTTP request, named ``METHOD /route`` once routed, as plain ASGI
    (like the request timing: no task of its own). While tracing is off, one check."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not tracing.enabled():
            await self.app(scope, receive, send)
            return
        method = scope["method"]
        remote = {
            k.decode("latin-1"): v.decode("latin-1")
            for k, v in scope.get("headers") or ()
            if k in _CARRIED
        }
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        with tracing.request_span(method, remote, {"http.request.method": method}) as span:
            try:
                await self.app(scope, receive, send_status)
            finally:
                if span is not None:
                    route = getattr(scope.get("route"), "path", None)
                    if route is not None:
                        span.update_name(f"{method} {route}")
                        span.set_attribute("http.route", route)
                    span.set_attribute("http.response.status_code", status)
                    if status >= 500:
                        span.set_status(tracing.Status(tracing.StatusCode.ERROR))
