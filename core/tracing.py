"""Traces (SPEC §10): one payment is one trace, carried from event to event in the envelope.

The engine's code speaks only the OpenTelemetry *API*, through these helpers. Nothing is
traced until the composition root hands a tracer provider to :func:`use` (the SDK's,
exporting OTLP, when ``UPI_OTEL_ENDPOINT`` is set: :mod:`api.telemetry`; a test's, with
an in-memory exporter). Until then every helper returns at once after one global read: no
span objects, no context switches, and envelopes carry no headers, so their bytes are
what they were before tracing existed.

Propagation. The W3C trace context (``traceparent``, ``tracestate``) travels in
:attr:`core.events.Envelope.headers`, which is serialised with the envelope: so it
survives the outbox, both buses (the in-process bus hands the envelope on; Kafka carries
its bytes) and every redelivery. An event is wrapped with the context of the span that
caused it: the current span (the HTTP request's, for ``PaymentInitiated``), a span the
consumer opened for that event (:func:`headers_for`), or else its cause's context carried
on, so that a trace goes on through a step or a process that has no span of its own.

Spans of consumers continue a trace; they never start one: an event without a trace
context (background work, events written while tracing was off) gets no span. A batch
consumer opens one span per event of its batch (:func:`event_spans`), each in the trace
of its own event, so that one payment's spans never land in another payment's trace.

Attributes name transactions, banks and event types; never a VPA or other PII.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Iterable, Iterator, Mapping
from contextlib import AbstractContextManager
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, TypeVar

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer, TracerProvider
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

if TYPE_CHECKING:
    import uuid

    from core.events import Envelope

__all__ = [
    "TRACE_HEADERS",
    "SpanKind",
    "Status",
    "StatusCode",
    "child_span",
    "context_of",
    "continued",
    "current_headers",
    "enabled",
    "event_spans",
    "headers_for",
    "headers_of",
    "inject",
    "request_span",
    "span_for",
    "use",
]

TRACE_HEADERS = ("traceparent", "tracestate")
_PROPAGATOR = TraceContextTextMapPropagator()
_NO_SPAN: AbstractContextManager[None] = contextlib.nullcontext(None)
_NO_SPANS: Mapping[uuid.UUID, Span] = MappingProxyType({})
_NO_EVENT_SPANS: AbstractContextManager[Mapping[uuid.UUID, Span]] = contextlib.nullcontext(
    _NO_SPANS
)
_tracer: Tracer | None = None

E = TypeVar("E", bound="Envelope")


def use(provider: TracerProvider | None) -> None:
    """Trace with ``provider`` from now on (None: stop tracing)."""
    global _tracer
    _tracer = None if provider is None else provider.get_tracer("upi-engine")


def enabled() -> bool:
    return _tracer is not None


def context_of(headers: Mapping[str, str]) -> Context | None:
    """The trace context ``headers`` carry (W3C ``traceparent``), or None: also for a
    trace its root left unsampled (``UPI_OTEL_SAMPLE_RATIO``), whose steps then cost no
    span at all."""
    traceparent = headers.get("traceparent")
    if traceparent is None:
        return None
    return _context_of(traceparent, headers.get("tracestate"))


# One event's context is read by every consumer of it (five on the in-process bus) and by
# its redeliveries: parsed once. A Context is immutable, so sharing one is safe.
@functools.lru_cache(maxsize=8192)
def _context_of(traceparent: str, tracestate: str | None) -> Context | None:
    carrier = {"traceparent": traceparent}
    if tracestate is not None:
        carrier["tracestate"] = tracestate
    context = _PROPAGATOR.extract(carrier)
    parent = trace.get_current_span(context).get_span_context()
    return context if parent.is_valid and parent.trace_flags.sampled else None


def headers_of(span: Span) -> dict[str, str]:
    """The W3C headers that make an event a child of ``span``: what
    ``TraceContextTextMapPropagator.inject`` writes (version 00), without the context it
    builds to read the span back (a few are written per event)."""
    context = span.get_span_context()
    headers = {
        "traceparent": f"00-{context.trace_id:032x}-{context.span_id:016x}"
        f"-{context.trace_flags:02x}"
    }
    if context.trace_state:
        headers["tracestate"] = context.trace_state.to_header()
    return headers


def _sampled(span: Span) -> bool:
    context = span.get_span_context()
    return context.is_valid and bool(context.trace_flags.sampled)


def inject(headers: dict[str, str]) -> dict[str, str]:
    """Add the current span's trace context to ``headers`` (nothing while tracing is off,
    or no span is current, or its trace is not sampled: no consumer would continue it, so
    its events carry no headers, as with tracing off); returns ``headers``."""
    if _tracer is not None and _sampled(current := trace.get_current_span()):
        headers.update(headers_of(current))
    return headers


def current_headers() -> dict[str, str]:
    """The current span's trace headers: what :meth:`Envelope.wrap` gives an event by
    default. ``{}`` while tracing is off."""
    if _tracer is None:
        return {}
    return inject({})


def headers_for(cause: Envelope | None, span: Span | None = None) -> dict[str, str]:
    """The trace headers of an event caused by ``cause``: those of ``span`` (the span a
    consumer opened for the cause), else of the current span, else the cause's own,
    carried on."""
    if _tracer is not None:
        if span is not None and span.get_span_context().is_valid:
            return headers_of(span) if _sampled(span) else {}
        current = trace.get_current_span()
        if current.get_span_context().is_valid:
            return headers_of(current) if _sampled(current) else {}
    if cause is None or not cause.headers:
        return {}
    return {k: v for k in TRACE_HEADERS if (v := cause.headers.get(k))}


def continued(envelope: E, span: Span | None) -> E:
    """``envelope`` as the events it causes should see it after ``span``: carrying the
    span's context (unchanged while tracing is off or without a span)."""
    if span is None or not span.get_span_context().is_valid:
        return envelope
    return dataclasses.replace(envelope, headers={**envelope.headers, **headers_of(span)})


def span_for(
    cause: Envelope | Mapping[str, str] | None,
    name: str,
    *,
    kind: SpanKind = SpanKind.INTERNAL,
    attributes: Mapping[str, Any] | None = None,
    start_trace: bool = False,
) -> AbstractContextManager[Span | None]:
    """A span made current for the ``with`` block, child of the trace context of
    ``cause`` (an envelope or carrier headers). Without one it starts a trace only if
    ``start_trace`` (the HTTP request); else, and while tracing is off, the block runs
    with no span (``None``). An exception leaving the block is recorded on the span."""
    tracer = _tracer
    if tracer is None:
        return _NO_SPAN
    headers = cause if cause is None or isinstance(cause, Mapping) else cause.headers
    parent = context_of(headers) if headers else None
    if parent is None and not start_trace:
        return _NO_SPAN
    return tracer.start_as_current_span(
        name, context=parent, kind=kind, attributes=dict(attributes or {})
    )


def request_span(
    name: str, remote: Mapping[str, str], attributes: Mapping[str, Any] | None = None
) -> AbstractContextManager[Span | None]:
    """The span of a request from outside (the public API), current for the block: it
    starts a trace of the engine's own, *linked* to the caller's context if the request
    carried one (a caller does not choose the engine's trace ids). None while off."""
    tracer = _tracer
    if tracer is None:
        return _NO_SPAN
    caller = context_of(remote) if remote else None
    links = [trace.Link(trace.get_current_span(caller).get_span_context())] if caller else []
    return tracer.start_as_current_span(
        name,
        context=Context(),  # a root, whatever is current
        kind=SpanKind.SERVER,
        attributes=dict(attributes or {}),
        links=links,
    )


def event_spans(
    envelopes: Iterable[Envelope], name: str, **attributes: Any
) -> AbstractContextManager[Mapping[uuid.UUID, Span]]:
    """One span per traced event of a batch, by event id, for the ``with`` block: each
    the child of its own event's context, so each payment's span stays in its own trace
    (the batch's size is an attribute). None is made current. An exception leaving the
    block marks them all failed. Empty while tracing is off."""
    tracer = _tracer
    if tracer is None:
        return _NO_EVENT_SPANS
    return _event_spans(tracer, envelopes, name, attributes)


@contextlib.contextmanager
def _event_spans(
    tracer: Tracer, envelopes: Iterable[Envelope], name: str, attributes: dict[str, Any]
) -> Iterator[Mapping[uuid.UUID, Span]]:
    batch = list(envelopes)
    spans: dict[uuid.UUID, Span] = {}
    for envelope in batch:
        parent = context_of(envelope.headers) if envelope.headers else None
        if parent is None or envelope.event_id in spans:
            continue
        spans[envelope.event_id] = tracer.start_span(
            name,
            context=parent,
            kind=SpanKind.CONSUMER,
            attributes={
                **attributes,
                "upi.batch_size": len(batch),
                "upi.event_type": envelope.event_type,
                "upi.transaction_id": envelope.transaction_id or "",
            },
        )
    try:
        yield spans
    except BaseException as exc:
        for span in spans.values():
            span.record_exception(exc)
            span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"[:200]))
        raise
    finally:
        for span in spans.values():
            span.end()


def child_span(
    parent: Span,
    name: str,
    start_ns: int,
    end_ns: int,
    attributes: Mapping[str, Any] | None = None,
) -> None:
    """A finished child of ``parent`` over ``[start_ns, end_ns]`` (``time.time_ns()``):
    for work timed in a batch and told per payment (a fraud scorer's job)."""
    tracer = _tracer
    if tracer is None:
        return
    span = tracer.start_span(
        name,
        context=trace.set_span_in_context(parent),
        start_time=start_ns,
        attributes=dict(attributes or {}),
    )
    span.end(end_time=end_ns)
