"""The trace context in the envelope (core/tracing.py): serialised only when present, old
envelopes still decode, and with tracing on each event of a batch keeps its own trace."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime

import orjson
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from core import tracing
from core.errors import PoisonMessage
from core.events import Envelope, PaymentInitiated


def initiated(n: int = 1) -> PaymentInitiated:
    return PaymentInitiated(
        transaction_id=f"UPI{n}",
        merchant_id="m",
        merchant_order_id=str(n),
        payer_vpa="alice@ybl",
        payee_vpa="bob@ybl",
        amount_paise=100,
        initiated_at=datetime(2026, 1, 1, tzinfo=UTC),
    )


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    exported = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exported))
    tracing.use(provider)
    try:
        yield exported
    finally:
        tracing.use(None)
        provider.shutdown()


def test_off_an_envelope_has_no_headers_and_its_bytes_have_no_headers_key():
    assert not tracing.enabled()
    env = Envelope.wrap(initiated(), partition_key="k")
    assert env.headers == {}
    assert "headers" not in orjson.loads(env.to_bytes())
    with tracing.span_for(env, "x", start_trace=True) as span:
        assert span is None
    with tracing.event_spans([env], "x") as spans:
        assert dict(spans) == {}


def test_headers_round_trip_and_an_envelope_without_them_still_decodes():
    env = Envelope.wrap(
        initiated(),
        partition_key="k",
        headers={"traceparent": "00-" + "1" * 32 + "-" + "2" * 16 + "-01"},
    )
    again = Envelope.from_bytes(env.to_bytes())
    assert again == env and again.headers == env.headers
    stored_before = orjson.loads(env.to_bytes())
    del stored_before["headers"]
    assert Envelope.from_dict(stored_before).headers == {}
    with pytest.raises(PoisonMessage):
        Envelope.from_dict({**stored_before, "headers": {"traceparent": 7}})


def test_an_event_wrapped_in_a_span_carries_its_context(exporter):
    with tracing.span_for(None, "request", start_trace=True) as span:
        assert span is not None
        env = Envelope.wrap(initiated(), partition_key="k")
    parent = tracing.context_of(env.headers)
    assert parent is not None
    [finished] = exporter.get_finished_spans()
    assert env.headers["traceparent"].split("-")[1] == format(finished.context.trace_id, "032x")


def test_each_event_of_a_batch_gets_a_span_in_its_own_trace(exporter):
    envelopes = []
    for n in range(3):
        with tracing.span_for(None, f"request {n}", start_trace=True):
            envelopes.append(Envelope.wrap(initiated(n), partition_key="k"))
    untraced = Envelope.wrap(initiated(9), partition_key="k")  # before tracing: no span
    with tracing.event_spans([*envelopes, untraced], "consume") as spans:
        assert set(spans) == {e.event_id for e in envelopes}
        caused = [tracing.headers_for(e, spans[e.event_id]) for e in envelopes]
    finished = {s.name: s for s in exporter.get_finished_spans()}
    consumed = [s for s in exporter.get_finished_spans() if s.name == "consume"]
    assert len(consumed) == 3
    for n in range(len(envelopes)):
        request = finished[f"request {n}"]
        [mine] = [s for s in consumed if s.attributes["upi.transaction_id"] == f"UPI{n}"]
        assert mine.context.trace_id == request.context.trace_id
        assert mine.parent is not None and mine.parent.span_id == request.context.span_id
        assert mine.attributes["upi.batch_size"] == 4
        # What the consumer emits for this event is the child of its span.
        assert caused[n]["traceparent"].split("-")[2] == format(mine.context.span_id, "016x")


def test_a_step_without_a_span_carries_its_cause_context_on(exporter):
    with tracing.span_for(None, "request", start_trace=True):
        cause = Envelope.wrap(initiated(), partition_key="k")
    assert tracing.headers_for(cause) == {"traceparent": cause.headers["traceparent"]}
    tracing.use(None)  # a process with tracing off still carries the trace on
    assert tracing.headers_for(cause) == {"traceparent": cause.headers["traceparent"]}


def test_a_request_span_starts_its_own_trace_linked_to_the_callers(exporter):
    caller = {"traceparent": "00-" + "a" * 32 + "-" + "b" * 16 + "-01"}
    with tracing.request_span("POST", caller) as span:
        assert span is not None
    [finished] = exporter.get_finished_spans()
    assert finished.parent is None
    assert format(finished.context.trace_id, "032x") != "a" * 32
    assert [format(link.context.trace_id, "032x") for link in finished.links] == ["a" * 32]


def test_the_otlp_endpoint_setting_turns_tracing_on_and_stopping_turns_it_off():
    from api.telemetry import start_tracing, traces_url
    from core.config import Settings, load_settings
    from core.errors import ConfigError

    assert traces_url("http://collector:4318/") == "http://collector:4318/v1/traces"
    assert traces_url("http://c:4318/v1/traces") == "http://c:4318/v1/traces"
    assert start_tracing(Settings(), ["all"]) is None and not tracing.enabled()
    stop = start_tracing(Settings(otel_endpoint="http://127.0.0.1:9"), ["all"])
    assert stop is not None and tracing.enabled()
    stop()  # nothing was traced: nothing to send to the closed port
    assert not tracing.enabled()
    with pytest.raises(ConfigError, match="UPI_OTEL_ENDPOINT"):
        load_settings(otel_endpoint="collector:4318")


def test_an_unsampled_trace_costs_its_consumers_no_span(exporter):
    unsampled = {"traceparent": "00-" + "1" * 32 + "-" + "2" * 16 + "-00"}
    env = Envelope.wrap(initiated(), partition_key="k", headers=unsampled)
    with tracing.event_spans([env], "consume") as spans:
        assert dict(spans) == {}
    with tracing.span_for(env, "switch.pay") as span:
        assert span is None
    assert tracing.headers_for(env) == unsampled  # carried on all the same
