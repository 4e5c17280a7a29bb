"""Prometheus metrics, one registry for the process (``GET /metrics``)."""

from prometheus_client import Counter, Gauge, Histogram

__all__ = [
    "CONSUMER_EVENTS",
    "DEAD_LETTERS",
    "EVENTS_PUBLISHED",
    "FRAUD_DECISIONS",
    "FRAUD_SCORING",
    "HTTP_REQUESTS",
    "LEDGER_ENTRIES",
    "OUTBOX_BACKLOG",
    "PAYMENTS_FINAL",
    "PAYMENTS_INITIATED",
    "SWITCH_LATENCY",
]

PAYMENTS_INITIATED = Counter("upi_payments_initiated_total", "Payments accepted (202)")
PAYMENTS_FINAL = Counter("upi_payments_final_total", "Payments reaching a final status", ["status"])
EVENTS_PUBLISHED = Counter("upi_events_published_total", "Events published by the relay", ["topic"])
CONSUMER_EVENTS = Counter(
    "upi_consumer_events_total", "Events settled by consumers", ["consumer", "outcome"]
)
DEAD_LETTERS = Counter("upi_dead_letters_total", "Messages sent to dead letters", ["consumer"])
OUTBOX_BACKLOG = Gauge("upi_outbox_backlog", "Outbox rows not yet published")
SWITCH_LATENCY = Histogram("upi_switch_latency_seconds", "NPCI switch round trip", ["operation"])
LEDGER_ENTRIES = Counter("upi_ledger_entries_total", "Entries appended to the compliance ledger")
HTTP_REQUESTS = Histogram(
    "upi_http_request_seconds", "HTTP request latency", ["method", "route", "status"]
)
FRAUD_SCORING = Histogram(
    "upi_fraud_scoring_seconds",
    "Time to score one payment with all scorers",
    buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25),
)
FRAUD_DECISIONS = Counter("upi_fraud_decisions_total", "Fraud decisions", ["decision"])
