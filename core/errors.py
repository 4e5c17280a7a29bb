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
│   └── PoisonMessage        an event no retry can fix (bad bytes, unknown type)
└── SwitchError              the NPCI switch could not be reached or answered badly
    └── SwitchTimeout        no answer within the NPCI leg timeout (payment is DEEMED)
"""

from __future__ import annotations

__all__ = [
    "BusError",
    "ConfigError",
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
    """``code``: amount_over_limit | payer_daily_count_exceeded | payer_daily_amount_exceeded."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class RefundRejected(DomainError):
    """``code``: payment_not_refundable | refund_exceeds_payment."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class VerificationRejected(DomainError):
    """``code``: verification_not_required | verification_closed | verification_expired |
    verification_failed."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class StorageError(UpiError):
    pass


class BusError(UpiError):
    pass


class PoisonMessage(BusError):
    """Raised for a message that can never be handled; it goes straight to dead letters."""


class SwitchError(UpiError):
    pass


class SwitchTimeout(SwitchError):
    pass
