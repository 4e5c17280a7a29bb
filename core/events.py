"""The event envelope and the published event contracts of every context.

Events are frozen pydantic models with a wire ``name`` and an integer ``version``; they
travel inside an :class:`Envelope` (event id, type, version, UTC time, correlation =
transaction id, causation, partition key). Stored or published bytes are never rewritten:
when a contract changes, its version goes up and an upcaster turns old payloads into the
new shape on read (:meth:`EventRegistry.decode`).

Topics group events by the context that publishes them; the partition key is the payer's
keyed pseudonym so that per-payer state (velocity windows, ordering) stays on one partition.

PII. An event names its fields that hold the payer's PII in ``pii`` (the payer's VPA, the
device with its IP and location). The publisher seals them (:mod:`core.sealing`) into one
``pii`` member of the payload, so that the outbox, the broker and dead letters hold them
sealed; each subscriber gets them opened again. The payee's VPA is the merchant's
registered collection address (on its QR codes and in its settlement), not the payer's, and
travels in clear.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, ClassVar, Literal, TypeVar

import orjson
from pydantic import BaseModel, ConfigDict, Field

from core import tracing
from core.errors import PoisonMessage
from core.ids import new_event_id
from core.money import Paise, PositivePaise
from core.pii import Vpa

__all__ = [
    "CATALOGUE",
    "AuditAccessed",
    "DeviceInfo",
    "DisputeAccepted",
    "DisputeContested",
    "DisputeOutcome",
    "DisputeRaised",
    "DisputeResolved",
    "Envelope",
    "Event",
    "EventRegistry",
    "FailoverCompleted",
    "FailoverStarted",
    "FraudAssessed",
    "FraudDecision",
    "LateSuccessFound",
    "LateSuccessReturned",
    "MerchantVpaRegistered",
    "PaymentBlocked",
    "PaymentDeemed",
    "PaymentFailed",
    "PaymentInitiated",
    "PaymentReversed",
    "PaymentSubmitted",
    "PaymentSucceeded",
    "PaymentVerificationRequired",
    "PaymentVerified",
    "PhaseTiming",
    "RefundFailed",
    "RefundInitiated",
    "RefundSucceeded",
    "ScorerContribution",
    "SettlementClosed",
    "Topic",
]


class Topic(StrEnum):
    PAYMENTS = "payments"
    FRAUD = "fraud"
    AUDIT = "audit"
    SETTLEMENT = "settlement"
    DR = "dr"


class Event(BaseModel):
    """Base of every published contract."""

    # hide_input_in_errors: a payload that fails validation is described without its
    # values, so that no PII reaches a dead letter's reason or a log line.
    model_config = ConfigDict(frozen=True, extra="forbid", hide_input_in_errors=True)

    name: ClassVar[str]
    version: ClassVar[int] = 1
    topic: ClassVar[Topic]
    #: The fields holding the payer's PII, sealed on the wire (:mod:`core.sealing`).
    pii: ClassVar[tuple[str, ...]] = ()


# --------------------------------------------------------------------------- payments


class DeviceInfo(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", hide_input_in_errors=True)

    id: str = Field(min_length=1, max_length=128)
    ip: str | None = Field(default=None, max_length=45)
    latitude: float | None = Field(default=None, ge=-90, le=90)
    longitude: float | None = Field(default=None, ge=-180, le=180)
    os: str | None = Field(default=None, max_length=64)
    app_version: str | None = Field(default=None, max_length=32)
    emulator: bool | None = None
    rooted: bool | None = None


class _PaymentEvent(Event):
    topic: ClassVar[Topic] = Topic.PAYMENTS
    transaction_id: str
    merchant_id: str


class PaymentInitiated(_PaymentEvent):
    name: ClassVar[str] = "PaymentInitiated"
    pii: ClassVar[tuple[str, ...]] = ("payer_vpa", "device")
    merchant_order_id: str
    payer_vpa: Vpa
    payee_vpa: Vpa
    amount_paise: PositivePaise
    currency: Literal["INR"] = "INR"
    note: str | None = None
    device: DeviceInfo | None = None
    initiated_at: datetime


class PaymentVerificationRequired(_PaymentEvent):
    name: ClassVar[str] = "PaymentVerificationRequired"
    expires_at: datetime


class PaymentVerified(_PaymentEvent):
    name: ClassVar[str] = "PaymentVerified"
    method: str


class PaymentSubmitted(_PaymentEvent):
    name: ClassVar[str] = "PaymentSubmitted"
    pii: ClassVar[tuple[str, ...]] = ("payer_vpa",)
    payer_vpa: Vpa
    payee_vpa: Vpa
    amount_paise: PositivePaise
    submitted_at: datetime


class PaymentDeemed(_PaymentEvent):
    name: ClassVar[str] = "PaymentDeemed"
    response_code: str
    deemed_at: datetime


class _PaymentFinal(_PaymentEvent):
    amount_paise: PositivePaise
    response_code: str
    rrn: str | None = None
    completed_at: datetime


class PaymentSucceeded(_PaymentFinal):
    """v2 added ``merchant_mcc`` (settlement prices the fee by category)."""

    name: ClassVar[str] = "PaymentSucceeded"
    version: ClassVar[int] = 2
    pii: ClassVar[tuple[str, ...]] = ("payer_vpa",)
    payer_vpa: Vpa
    payee_vpa: Vpa
    payer_bank: str
    payee_bank: str
    merchant_mcc: str


class PaymentFailed(_PaymentFinal):
    name: ClassVar[str] = "PaymentFailed"
    reason: str


class PaymentBlocked(_PaymentFinal):
    name: ClassVar[str] = "PaymentBlocked"
    reasons: tuple[str, ...] = ()


class PaymentReversed(_PaymentFinal):
    name: ClassVar[str] = "PaymentReversed"
    pii: ClassVar[tuple[str, ...]] = ("payer_vpa",)
    payer_vpa: Vpa
    payer_bank: str


class LateSuccessReturned(_PaymentEvent):
    """A late success given back: the switch reported a debit for this payment after the
    engine had failed it (:class:`LateSuccessFound`), and the engine returned that debit to
    the payer by a credit reversal at the switch. A fact of its own beside the payment's
    final status, which stays ``FAILED``: a payment never reaches two final statuses."""

    name: ClassVar[str] = "LateSuccessReturned"
    pii: ClassVar[tuple[str, ...]] = ("payer_vpa",)
    amount_paise: PositivePaise  # what the switch had debited, and credited back
    response_code: str  # the reversal's answer: "00"
    rrn: str | None = None
    method: Literal["reversal"] = "reversal"
    payer_vpa: Vpa
    payer_bank: str
    returned_at: datetime


class MerchantVpaRegistered(Event):
    """A VPA the merchant may collect into (its own at creation, then each one added).
    One VPA belongs to one merchant. Settlement keeps its own copy of these, to check
    that the money it credits to a merchant was paid to one of the merchant's VPAs."""

    name: ClassVar[str] = "MerchantVpaRegistered"
    topic: ClassVar[Topic] = Topic.PAYMENTS
    merchant_id: str
    vpa: Vpa
    registered_at: datetime


class _RefundEvent(_PaymentEvent):
    refund_id: str
    amount_paise: PositivePaise


class RefundInitiated(_RefundEvent):
    name: ClassVar[str] = "RefundInitiated"
    initiated_at: datetime


class RefundSucceeded(_RefundEvent):
    name: ClassVar[str] = "RefundSucceeded"
    response_code: str
    rrn: str
    payer_bank: str
    payee_bank: str
    completed_at: datetime


class RefundFailed(_RefundEvent):
    name: ClassVar[str] = "RefundFailed"
    response_code: str
    reason: str
    completed_at: datetime


class _DisputeEvent(_PaymentEvent):
    """A payer's complaint about a payment, raised through the switch (UDIR), and what
    became of it. ``transaction_id`` is the disputed payment's."""

    dispute_id: str
    amount_paise: PositivePaise


class DisputeRaised(_DisputeEvent):
    name: ClassVar[str] = "DisputeRaised"
    reason: str
    raised_at: datetime
    respond_by: datetime


class DisputeContested(_DisputeEvent):
    """The merchant contested with evidence (kept in the payments context, not here)."""

    name: ClassVar[str] = "DisputeContested"
    documents: int = Field(ge=0)
    contested_at: datetime


class _Chargeback(_DisputeEvent):
    """The money goes back to the payer: debited from the merchant's payout and from the
    payee's bank to the payer's in the dispute cycle."""

    payer_bank: str
    payee_bank: str


class DisputeAccepted(_Chargeback):
    """Accepted by the merchant, or (``auto``) because nobody answered by ``respond_by``."""

    name: ClassVar[str] = "DisputeAccepted"
    auto: bool
    accepted_at: datetime


class DisputeOutcome(StrEnum):
    WON = "WON"  # the merchant keeps the money
    LOST = "LOST"  # a chargeback


class DisputeResolved(_Chargeback):
    """The switch decided a contested dispute."""

    name: ClassVar[str] = "DisputeResolved"
    outcome: DisputeOutcome
    resolved_at: datetime


# --------------------------------------------------------------------------- fraud


class FraudDecision(StrEnum):
    ALLOW = "ALLOW"
    STEP_UP = "STEP_UP"
    BLOCK = "BLOCK"


class ScorerContribution(BaseModel):
    """What one fraud scorer said of a payment: its score and its reasons."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    score: float = Field(ge=0, le=1)
    reasons: tuple[str, ...] = ()


class FraudAssessed(Event):
    """v2 added ``contributions``: each scorer's score and reasons, so that an auditor
    reading the ledger sees why a payment was blocked (v1 events read as ``{}``: not
    recorded then)."""

    name: ClassVar[str] = "FraudAssessed"
    version: ClassVar[int] = 2
    topic: ClassVar[Topic] = Topic.FRAUD
    transaction_id: str
    decision: FraudDecision
    score: float = Field(ge=0, le=1)
    scores: dict[str, float]
    reasons: tuple[str, ...] = ()
    model_version: str
    skipped: tuple[str, ...] = ()
    assessed_at: datetime
    contributions: dict[str, ScorerContribution] = Field(default_factory=dict)


# --------------------------------------------------------------------------- audit


class AuditAccessed(Event):
    name: ClassVar[str] = "AuditAccessed"
    topic: ClassVar[Topic] = Topic.AUDIT
    principal_id: str
    principal_name: str
    action: str
    resource: str
    accessed_at: datetime


# --------------------------------------------------------------------------- settlement


class SettlementClosed(Event):
    name: ClassVar[str] = "SettlementClosed"
    topic: ClassVar[Topic] = Topic.SETTLEMENT
    business_date: str
    cycle: int
    payments: int
    gross_paise: Paise
    refunds_paise: Paise
    closed_at: datetime


class LateSuccessFound(Event):
    """The switch's journal (its settlement data) shows a standing debit, on the business
    date closed, for a payment our records hold ``FAILED``: a late success. Published with
    the close; the payments context returns the debit to the payer
    (:class:`LateSuccessReturned`)."""

    name: ClassVar[str] = "LateSuccessFound"
    topic: ClassVar[Topic] = Topic.SETTLEMENT
    transaction_id: str
    business_date: str
    amount_paise: PositivePaise  # the switch's debit
    found_at: datetime


# --------------------------------------------------------------------------- dr


class PhaseTiming(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    name: str
    seconds: float
    ok: bool = True
    detail: str | None = None


class FailoverStarted(Event):
    name: ClassVar[str] = "FailoverStarted"
    topic: ClassVar[Topic] = Topic.DR
    old_primary: str
    reason: str
    started_at: datetime


class FailoverCompleted(Event):
    name: ClassVar[str] = "FailoverCompleted"
    topic: ClassVar[Topic] = Topic.DR
    old_primary: str
    new_primary: str
    phases: tuple[PhaseTiming, ...]
    completed_at: datetime


# --------------------------------------------------------------------------- envelope

E = TypeVar("E", bound=Event)
Upcaster = Callable[[dict[str, Any]], dict[str, Any]]


@dataclass(frozen=True, slots=True)
class Envelope:
    """What travels on the bus and sits in the outbox. ``payload`` is JSON-ready.

    ``headers``: transport metadata, not part of the event: the W3C trace context
    (:mod:`core.tracing`). Serialised only when there are some, so an envelope without
    headers has the bytes it had before they existed, and one stored then still decodes.
    """

    event_id: uuid.UUID
    event_type: str
    version: int
    occurred_at: datetime
    topic: str
    partition_key: str
    payload: dict[str, Any]
    transaction_id: str | None = None
    causation_id: uuid.UUID | None = None
    headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def wrap(
        cls,
        event: Event,
        *,
        partition_key: str,
        occurred_at: datetime | None = None,
        causation_id: uuid.UUID | None = None,
        headers: dict[str, str] | None = None,
    ) -> Envelope:
        """``headers``: given, or the current span's trace context (none while tracing is
        off)."""
        return cls(
            event_id=new_event_id(),
            event_type=event.name,
            version=event.version,
            occurred_at=occurred_at or datetime.now(UTC),
            topic=event.topic.value,
            partition_key=partition_key,
            payload=event.model_dump(mode="json"),
            transaction_id=getattr(event, "transaction_id", None),
            causation_id=causation_id,
            headers=tracing.current_headers() if headers is None else headers,
        )

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "event_id": str(self.event_id),
            "event_type": self.event_type,
            "version": self.version,
            "occurred_at": self.occurred_at.astimezone(UTC).isoformat().replace("+00:00", "Z"),
            "topic": self.topic,
            "partition_key": self.partition_key,
            "transaction_id": self.transaction_id,
            "causation_id": str(self.causation_id) if self.causation_id else None,
            "payload": self.payload,
        }
        if self.headers:
            data["headers"] = self.headers
        return data

    def to_bytes(self) -> bytes:
        return orjson.dumps(self.to_dict())

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Envelope:
        try:
            occurred = datetime.fromisoformat(data["occurred_at"])
            return cls(
                event_id=uuid.UUID(data["event_id"]),
                event_type=data["event_type"],
                version=int(data["version"]),
                occurred_at=occurred if occurred.tzinfo else occurred.replace(tzinfo=UTC),
                topic=data["topic"],
                partition_key=data["partition_key"],
                transaction_id=data.get("transaction_id"),
                causation_id=uuid.UUID(data["causation_id"]) if data.get("causation_id") else None,
                payload=dict(data["payload"]),
                headers=_headers(data.get("headers")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise PoisonMessage(f"malformed envelope: {exc!r}") from None

    @classmethod
    def from_bytes(cls, raw: bytes) -> Envelope:
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise PoisonMessage(f"not JSON: {exc}") from None
        if not isinstance(data, dict):
            raise PoisonMessage("envelope is not a JSON object")
        return cls.from_dict(data)


def _headers(raw: object) -> dict[str, str]:
    """Stored headers, or ``{}`` (absent: an envelope from before they existed)."""
    if raw is None:
        return {}
    if not isinstance(raw, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in raw.items()
    ):
        raise TypeError("headers must be an object of strings")
    return dict(raw)


class EventRegistry:
    """Wire name → current contract, plus the upcasters from older versions."""

    def __init__(self) -> None:
        self._types: dict[str, type[Event]] = {}
        self._upcasters: dict[tuple[str, int], Upcaster] = {}

    def register(self, event_type: type[E]) -> type[E]:
        self._types[event_type.name] = event_type
        return event_type

    def upcaster(self, name: str, from_version: int) -> Callable[[Upcaster], Upcaster]:
        """Register ``fn(payload_v_n) -> payload_v_n+1``."""

        def deco(fn: Upcaster) -> Upcaster:
            self._upcasters[(name, from_version)] = fn
            return fn

        return deco

    def type_of(self, name: str) -> type[Event]:
        try:
            return self._types[name]
        except KeyError:
            raise PoisonMessage(f"unknown event type {name!r}") from None

    def names(self) -> list[str]:
        return sorted(self._types)

    def decode(self, envelope: Envelope) -> Event:
        """The typed event of an envelope, upcast to the current version."""
        event_type = self.type_of(envelope.event_type)
        payload = envelope.payload
        version = envelope.version
        if version > event_type.version:
            raise PoisonMessage(
                f"{envelope.event_type} v{version} is newer than this build (v{event_type.version})"
            )
        while version < event_type.version:
            step = self._upcasters.get((envelope.event_type, version))
            if step is None:
                raise PoisonMessage(f"no upcaster for {envelope.event_type} v{version}")
            payload = step(dict(payload))
            version += 1
        try:
            return event_type.model_validate(payload)
        except ValueError as exc:
            raise PoisonMessage(f"{envelope.event_type} payload invalid: {exc}") from None

    def decode_as(self, envelope: Envelope, expected: type[E]) -> E:
        event = self.decode(envelope)
        if not isinstance(event, expected):
            raise PoisonMessage(f"expected {expected.name}, got {envelope.event_type}")
        return event


CATALOGUE = EventRegistry()
for _event in (
    PaymentInitiated,
    PaymentVerificationRequired,
    PaymentVerified,
    PaymentSubmitted,
    PaymentDeemed,
    PaymentSucceeded,
    PaymentFailed,
    PaymentBlocked,
    PaymentReversed,
    RefundInitiated,
    RefundSucceeded,
    RefundFailed,
    DisputeRaised,
    DisputeContested,
    DisputeAccepted,
    DisputeResolved,
    LateSuccessReturned,
    MerchantVpaRegistered,
    FraudAssessed,
    AuditAccessed,
    SettlementClosed,
    LateSuccessFound,
    FailoverStarted,
    FailoverCompleted,
):
    CATALOGUE.register(_event)


@CATALOGUE.upcaster("FraudAssessed", 1)
def _fraud_assessed_v1_to_v2(payload: dict[str, Any]) -> dict[str, Any]:
    # v1 recorded the scores but not each scorer's reasons: none to show.
    return {**payload, "contributions": {}}


@CATALOGUE.upcaster("PaymentSucceeded", 1)
def _payment_succeeded_v1_to_v2(payload: dict[str, Any]) -> dict[str, Any]:
    # v1 events predate the merchant category: "0000" prices at the default MDR.
    return {**payload, "merchant_mcc": "0000"}
