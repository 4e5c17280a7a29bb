"""The bench's OTLP/HTTP sink (api/otlp_sink.py) takes what the SDK's own exporter sends,
counts its spans, and refuses what is not an OTLP export."""

from __future__ import annotations

import httpx
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

from api.otlp_sink import OtlpSink
from api.telemetry import traces_url


def test_the_sink_counts_the_spans_the_sdks_exporter_sends():
    with OtlpSink() as sink:
        exporter = OTLPSpanExporter(endpoint=traces_url(sink.endpoint))
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        tracer = provider.get_tracer("test")
        with tracer.start_as_current_span("parent"):
            for n in range(2):
                with tracer.start_as_current_span(f"child {n}"):
                    pass
        # Each export was answered as a collector answers: success, nothing to retry.
        assert (sink.spans, sink.requests, sink.refused) == (3, 3, 0)
        tracer.start_span("one more").end()
        assert sink.spans == 4
        provider.shutdown()

        refused = httpx.post(traces_url(sink.endpoint), content=b"\xff\xff not protobuf")
        assert refused.status_code == 400 and sink.refused == 1 and sink.spans == 4
