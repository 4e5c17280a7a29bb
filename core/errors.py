"""The project's exception tree. Adapters translate driver errors into these.

UpiError
├── ConfigError              bad setting; the CLI exits 2
├── DomainError              a business rule refused the request
│   ├── InvalidTransition    a payment state change the state machine forbids
│   ├── IdempotencyConflict  same Idempotency-Key, different request
│   ├── NotFound             no such payment/merchant (or not yours)
│   ├── PayeeNotAllowed      the payee VPA is not one of the merchant's registered VPAs
│   ├── VpaTaken             the VPA is already registered to another merchant
│   └── LimitExceeded, RefundRejected, VerificationRejected (each with a problem ``code``)
├── StorageError             the database failed or is unreachable
├── BusError                 the event bus failed
│   ├── BrokerLogLost        the broker holds less than it acknowledged (lost its log)
│   └── PoisonMessage        an event no retry can fix (bad bytes, unknown type)
└── SwitchError              the NPCI switch could not be reached or answered badly
    ├── SwitchTimeout        no answer within the NPCI leg timeout (payment is DEEMED)
    └── SwitchRateLimited    the switch refused a call that broke NPCI's API rules
"""

from __future__ import annotations

__all__ = [
    "BrokerLogLost",
    "BusError",
    "ConfigError",
    "DisputeRejected",
    "DomainError",
    "IdempotencyConflict",
    "InvalidTransition",
    "LimitExceeded",
    "NotFound",
    "PayeeNotAllowed",
    "PoisonMessage",
    "RefundRejected",
    "StorageError",
    "SwitchError",
    "SwitchRateLimited",
    "SwitchTimeout",
    "UpiError",
    "VerificationRejected",
    "VpaTaken",
]


class UpiError(Exception):
    """Base of every error this project raises on purpose."""


class ConfigError(UpiError):
    pass


class DomainError(UpiError):
    code = "domain_error"


class InvalidTransition(DomainError):
    code = "invalid_transition"


class IdempotencyConflict(DomainError):
    code = "idempotency_conflict"


class NotFound(DomainError):
    code = "not_found"


class PayeeNotAllowed(DomainError):
    """A merchant collects only into its registered VPAs: otherwise money it is credited
    with at settlement would land in someone else's account."""

    code = "payee_not_allowed"


class VpaTaken(DomainError):
    """One VPA belongs to one merchant."""

    code = "vpa_taken"


class LimitExceeded(DomainError):
    """``code``: amount_over_limit | payer_daily_count_exceeded | payer_daily_amount_exceeded |
    payer_category_daily_amount_exceeded. The limit it names travels with it, machine
    readable: ``limit_paise`` (or ``limit_count``) and the merchant ``category`` (None for
    the general limits)."""

    def __init__(
        self,
        code: str,
        message: str,
        *,
        limit_paise: int | None = None,
        limit_count: int | None = None,
        category: str | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.limit_paise = limit_paise
        self.limit_count = limit_count
        self.category = category

    def limit_fields(self) -> dict[str, int | str | None]:
        """The limit as fields of a problem document: ``category`` always, the rest if set."""
        fields: dict[str, int | str | None] = {"category": self.category}
        if self.limit_paise is not None:
            fields["limit_paise"] = self.limit_paise
        if self.limit_count is not None:
            fields["limit_count"] = self.limit_count
        return fields


class RefundRejected(DomainError):
    """``code``: payment_not_refundable | refund_exceeds_payment."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class DisputeRejected(DomainError):
    """``code``: dispute_not_open | dispute_overdue."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class VerificationRejected(DomainError):
    """``code``: verification_not_required | verification_closed | verification_expired |
    verification_failed | verification_unavailable (the provider gave no verdict)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class StorageError(UpiError):
    pass


class BusError(UpiError):
    pass


class BrokerLogLost(BusError):
    """The broker has fewer records than it acknowledged to us: it lost its log (an
    in-memory broker restarted, a disk lost without replicas). The outbox is the source of
    truth: the relay publishes it again, and the consumers' inboxes drop what they had."""


class PoisonMessage(BusError):
    """Raised for a message that can never be handled; it goes straight to dead letters."""


class SwitchError(UpiError):
    pass


class SwitchTimeout(SwitchError):
    pass


class SwitchRateLimited(SwitchError):
    """Refused unprocessed: the call broke one of NPCI's API rules (``reason``, e.g. a
    check-status too early or over its budget). Nothing happened at the switch."""

    def __init__(self, api: str, reason: str, retry_after_s: float | None = None) -> None:
        super().__init__(f"switch refused {api}: {reason}")
        self.api = api
        self.reason = reason
        self.retry_after_s = retry_after_s
