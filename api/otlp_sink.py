"""A local OTLP/HTTP traces endpoint that accepts every export and discards it, counting
the spans: what ``upi-engine bench --traces`` points ``UPI_OTEL_ENDPOINT`` at, so that the
traced run pays for making, batching, encoding and sending its spans (as with a real
collector on the same network), and not for an exporter's retries against a closed port.

It runs in the bench's process on a thread (``http.server``: a handful of requests a
second, each a batch of up to 512 spans), so its CPU is not the engine's. The spans are
counted by decoding each request with the OTLP protobuf types the exporter itself uses
(``opentelemetry-proto``): the count shows that the traced run did export its spans.
"""

from __future__ import annotations

import gzip
import threading
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

__all__ = ["OtlpSink"]

_EMPTY_ANSWER = ExportTraceServiceResponse().SerializeToString()


class OtlpSink:
    """``with OtlpSink() as sink:`` a server on ``sink.endpoint`` (a base URL: spans go to
    ``/v1/traces``); ``sink.spans`` and ``sink.requests`` count what it was sent."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.spans = 0
        self.requests = 0
        self.refused = 0  # bodies it could not decode (answered 400)
        self._lock = threading.Lock()
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                try:
                    spans = sink._count(body, self.headers.get("Content-Encoding", ""))
                except (ValueError, OSError, zlib.error):
                    with sink._lock:
                        sink.refused += 1
                    self.send_response(400)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                with sink._lock:
                    sink.requests += 1
                    sink.spans += spans
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(_EMPTY_ANSWER)))
                self.end_headers()
                self.wfile.write(_EMPTY_ANSWER)

            def log_message(self, format: str, *args: object) -> None:
                return  # quiet: the bench prints its own summary

        self._server = ThreadingHTTPServer((host, 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="otlp-sink", daemon=True
        )

    @property
    def endpoint(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    @staticmethod
    def _count(body: bytes, encoding: str) -> int:
        if encoding == "gzip":
            body = gzip.decompress(body)
        elif encoding == "deflate":
            body = zlib.decompress(body)
        request = ExportTraceServiceRequest()
        try:
            request.ParseFromString(body)
        except Exception as exc:  # protobuf's DecodeError, whichever backend raised it
            raise ValueError(str(exc)) from None
        return sum(
            len(scope.spans)
            for resource in request.resource_spans
            for scope in resource.scope_spans
        )

    def __enter__(self) -> OtlpSink:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)
