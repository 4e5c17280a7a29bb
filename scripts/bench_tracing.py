"""What tracing costs one payment, without the rest of the engine: the hooks of a payment's
path (core/tracing.py) in batches as the consumers call them, with tracing off, and on with
the engine's own provider (api/telemetry.py: the SDK, its batch processor and the OTLP/HTTP
exporter) sending to a local sink that discards (api/otlp_sink.py). CPU time of the whole
process (the exporter's thread included), per payment; the flush at the end is counted.

    .venv/bin/python scripts/bench_tracing.py [--payments N] [--batch B] [--ratio R]

A guide to where the cost is, not the benchmark's figure: ``upi-engine bench --traces``
measures the engine itself.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from datetime import UTC, datetime

from api.telemetry import start_tracing
from core import tracing
from core.config import Settings
from core.events import Envelope, PaymentInitiated

SCORERS = ("velocity", "location", "device", "model")


def _initiated(n: int) -> PaymentInitiated:
    return PaymentInitiated(
        transaction_id=f"UPI{n:08d}",
        merchant_id="m",
        merchant_order_id=str(n),
        payer_vpa="alice@ybl",
        payee_vpa="bob@ybl",
        amount_paise=100 + n,
        initiated_at=datetime(2026, 1, 1, tzinfo=UTC),
    )


def _carried(envelope: Envelope, headers: dict[str, str]) -> Envelope:
    """An event caused by ``envelope`` with these headers, through the outbox's bytes."""
    return Envelope.from_bytes(
        Envelope.wrap(_initiated(0), partition_key="k", headers=headers).to_bytes()
    )


def one_batch(first: int, size: int) -> None:
    """``size`` payments through the hooks of their whole path."""
    initiated = []
    for n in range(first, first + size):  # the gateway: one request each
        with tracing.request_span("POST", {}, {"http.request.method": "POST"}):
            initiated.append(
                Envelope.from_bytes(Envelope.wrap(_initiated(n), partition_key="k").to_bytes())
            )
    assessed, submitted = [], []
    with tracing.event_spans(initiated, "fraud.assess") as spans:  # the fraud assessor
        now = time.time_ns()
        for envelope in initiated:
            span = spans.get(envelope.event_id)
            if span is not None:
                for scorer in SCORERS:
                    tracing.child_span(span, f"fraud.score.{scorer}", now, now + 1000)
            headers = tracing.headers_for(envelope, span)
            assessed.append(_carried(envelope, headers))
            submitted.append(_carried(envelope, headers))
    succeeded = []
    for envelope in submitted:  # the NPCI handler's switch call
        with tracing.span_for(envelope, "switch.pay", kind=tracing.SpanKind.CLIENT) as span:
            cause = tracing.continued(envelope, span)
        succeeded.append(_carried(cause, tracing.headers_for(cause)))
    with tracing.event_spans([*initiated, *assessed, *submitted, *succeeded], "ledger.append"):
        pass
    with tracing.event_spans(succeeded, "settlement.record"):  # not the submission
        pass


def measure(payments: int, batch: int, endpoint: str | None, ratio: float) -> float:
    """CPU µs per payment."""
    stop = start_tracing(Settings(otel_endpoint=endpoint, otel_sample_ratio=ratio), ["all"])
    began = time.process_time()
    for first in range(0, payments, batch):
        one_batch(first, batch)
    if stop is not None:
        stop()  # the exporter flushes what it holds
    return (time.process_time() - began) * 1e6 / payments


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--payments", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--ratio", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    # The sink in a process of its own, as in the benchmark: its CPU is not counted.
    sink = subprocess.Popen(
        [sys.executable, "-c", _SINK], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert sink.stdout is not None and sink.stdin is not None
    endpoint = sink.stdout.readline().strip()
    try:
        for n in range(args.rounds):
            off = measure(args.payments, args.batch, None, args.ratio)
            on = measure(args.payments, args.batch, endpoint, args.ratio)
            print(f"round {n + 1}: off {off:.1f} µs, on {on:.1f} µs per payment (+{on - off:.1f})")
    finally:
        sink.stdin.close()
        spans = int(sink.stdout.readline() or 0)
        sink.wait(10)
    print(f"{spans / (args.payments * args.rounds):.1f} spans exported per payment")


_SINK = """
import sys
from api.otlp_sink import OtlpSink
with OtlpSink() as sink:
    print(sink.endpoint, flush=True)
    sys.stdin.read()
print(sink.spans, flush=True)
"""


if __name__ == "__main__":
    main()
