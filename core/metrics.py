"""Prometheus metrics (``GET /metrics``), of this process or of every process of a serve.

In prometheus_client's multiprocess mode (``PROMETHEUS_MULTIPROC_DIR`` set before it was
first imported: :mod:`api.serve_metrics`) each process writes its values to files in that
directory and :func:`exposition` adds up every process's; otherwise it reads this
process's registry. Counters and histograms are summed. A gauge says how its processes'
values combine; the one here is written by the one process that relays.
"""

import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    values,
)
from prometheus_client.multiprocess import MultiProcessCollector

__all__ = [
    "CONSUMER_BATCH",
    "CONSUMER_EVENTS",
    "CONSUMER_LAG",
    "CONTENT_TYPE_LATEST",
    "DATABASE_PRIMARY",
    "DEAD_LETTERS",
    "DEEMED_PAYMENTS",
    "DR_STANDBYS_CONFIGURED",
    "DR_STANDBYS_STREAMING",
    "EVENTS_PUBLISHED",
    "FRAUD_DECISIONS",
    "FRAUD_SCORING",
    "HTTP_REQUESTS",
    "LEDGER_CHECKPOINT_AGE",
    "LEDGER_ENTRIES",
    "LEDGER_SIZE",
    "LEDGER_VALID",
    "LEDGER_WITNESS_LAG",
    "OUTBOX_BACKLOG",
    "PAYMENTS_FINAL",
    "PAYMENTS_INITIATED",
    "SWITCH_BREAKER_STATE",
    "SWITCH_LATENCY",
    "TAT_BREACHES",
    "exposition",
]

PAYMENTS_INITIATED = Counter("upi_payments_initiated_total", "Payments accepted (202)")
PAYMENTS_FINAL = Counter("upi_payments_final_total", "Payments reaching a final status", ["status"])
EVENTS_PUBLISHED = Counter("upi_events_published_total", "Events published by the relay", ["topic"])
CONSUMER_EVENTS = Counter(
    "upi_consumer_events_total", "Events settled by consumers", ["consumer", "outcome"]
)
DEAD_LETTERS = Counter("upi_dead_letters_total", "Messages sent to dead letters", ["consumer"])
# Set by the relay's process alone (every other process holds the 0 it started with): the
# value it set last, with no pid label.
OUTBOX_BACKLOG = Gauge(
    "upi_outbox_backlog", "Outbox rows not yet published", multiprocess_mode="mostrecent"
)
# By operation (pay, check_status) and the payer's (remitter) bank, the breakers' key.
SWITCH_LATENCY = Histogram(
    "upi_switch_latency_seconds", "NPCI switch round trip", ["operation", "bank"]
)
# Set by the process whose NPCI handler holds the bank's breaker; if several in one serve
# ever did, the worst of them shows.
SWITCH_BREAKER_STATE = Gauge(
    "upi_switch_breaker_state",
    "The remitter bank's circuit breaker: 0 closed, 1 half-open, 2 open",
    ["bank"],
    multiprocess_mode="max",
)
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
# Written by the one process that runs the workers (the others hold 0): its last value.
CONSUMER_LAG = Gauge(
    "upi_consumer_lag",
    "Events behind the head of what the consumer consumes (not yet settled)",
    ["consumer"],
    multiprocess_mode="mostrecent",
)
CONSUMER_BATCH = Histogram(
    "upi_consumer_batch_size",
    "Events per delivery a consumer settles at once",
    ["consumer"],
    buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000),
)
DEEMED_PAYMENTS = Gauge(
    "upi_deemed_payments", "Payments DEEMED, awaiting check-status", multiprocess_mode="mostrecent"
)
DR_STANDBYS_STREAMING = Gauge(
    "upi_dr_standbys_streaming",
    "Standbys streaming from this primary (pg_stat_replication)",
    multiprocess_mode="mostrecent",
)
DR_STANDBYS_CONFIGURED = Gauge(
    "upi_dr_standbys_configured",
    "Standbys synchronous_standby_names lists (0: no DR configured)",
    multiprocess_mode="mostrecent",
)
TAT_BREACHES = Gauge(
    "upi_tat_breaches",
    "Payments debited, not confirmed and not reversed past RBI's TAT (T+1 P2P, T+5 P2M)",
    multiprocess_mode="mostrecent",
)
LEDGER_VALID = Gauge(
    "upi_ledger_valid",
    "1 if the last ledger verification (every minute, or GET /v1/audit/verify) passed, else 0",
    multiprocess_mode="mostrecent",
)
LEDGER_WITNESS_LAG = Gauge(
    "upi_ledger_witness_lag",
    "Entries the newest checkpoint is ahead of the newest one this witness cosigned",
    ["witness"],
    multiprocess_mode="mostrecent",
)
LEDGER_SIZE = Gauge(
    "upi_ledger_size",
    "Entries in the compliance ledger (the next entry's height)",
    multiprocess_mode="mostrecent",
)
DATABASE_PRIMARY = Gauge(
    "upi_database_primary",
    "1 if the engine's database is a writable primary, 0 if it is a standby",
    multiprocess_mode="mostrecent",
)
LEDGER_CHECKPOINT_AGE = Gauge(
    "upi_ledger_checkpoint_age_seconds",
    "Seconds since the last signed ledger checkpoint (0: none is due, every entry covered)",
    multiprocess_mode="mostrecent",
)


def _registry() -> CollectorRegistry:
    if values.ValueClass is values.MutexValue:  # one process: its own registry
        return REGISTRY
    registry = CollectorRegistry()
    MultiProcessCollector(registry, os.environ["PROMETHEUS_MULTIPROC_DIR"])  # type: ignore[no-untyped-call]
    return registry


_SCRAPED = _registry()


def exposition() -> bytes:
    """The text exposition of ``GET /metrics``."""
    return bytes(generate_latest(_SCRAPED))
