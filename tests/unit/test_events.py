from datetime import UTC, datetime
from typing import ClassVar

import pytest

from core.errors import PoisonMessage
from core.events import (
    CATALOGUE,
    Envelope,
    Event,
    EventRegistry,
    PaymentInitiated,
    PaymentSucceeded,
    Topic,
)

NOW = datetime(2026, 5, 1, 6, 30, tzinfo=UTC)


def initiated() -> PaymentInitiated:
    return PaymentInitiated(
        transaction_id="UPI1",
        merchant_id="m",
        merchant_order_id="o",
        payer_vpa="rahulkumar@okhdfc",
        payee_vpa="shop@okicici",
        amount_paise=5000,
        initiated_at=NOW,
    )


def test_envelope_round_trips_through_bytes():
    env = Envelope.wrap(initiated(), partition_key="pk", occurred_at=NOW)
    back = Envelope.from_bytes(env.to_bytes())
    assert back == env
    event = CATALOGUE.decode_as(back, PaymentInitiated)
    assert event == initiated()
    assert back.transaction_id == "UPI1" and back.topic == "payments"


def test_every_catalogued_event_has_a_topic_and_version():
    for name in CATALOGUE.names():
        cls = CATALOGUE.type_of(name)
        assert cls.name == name and cls.version >= 1 and isinstance(cls.topic, Topic)


def test_vpa_is_clear_on_the_wire_but_masked_in_repr():
    event = initiated()
    assert "rahulkumar@okhdfc" not in repr(event)
    assert Envelope.wrap(event, partition_key="k").payload["payer_vpa"] == "rahulkumar@okhdfc"


class Renamed(Event):
    """v2 renamed ``amount`` to ``amount_paise`` and added ``channel``."""

    name: ClassVar[str] = "Renamed"
    version: ClassVar[int] = 2
    topic: ClassVar[Topic] = Topic.PAYMENTS
    amount_paise: int
    channel: str


def test_old_versions_are_upcast_on_read():
    registry = EventRegistry()
    registry.register(Renamed)

    @registry.upcaster("Renamed", 1)
    def _v1_to_v2(payload):
        return {"amount_paise": payload.pop("amount"), "channel": "UPI"}

    stored_v1 = Envelope(
        event_id=Envelope.wrap(initiated(), partition_key="k").event_id,
        event_type="Renamed",
        version=1,
        occurred_at=NOW,
        topic="payments",
        partition_key="k",
        payload={"amount": 7},
    )
    event = registry.decode(Envelope.from_bytes(stored_v1.to_bytes()))
    assert event == Renamed(amount_paise=7, channel="UPI")
    # The stored bytes are never rewritten: the envelope still says v1.
    assert stored_v1.version == 1 and stored_v1.payload == {"amount": 7}


def test_missing_upcaster_and_future_versions_are_poison():
    registry = EventRegistry()
    registry.register(Renamed)
    old = Envelope.wrap(Renamed(amount_paise=1, channel="x"), partition_key="k")
    with pytest.raises(PoisonMessage, match="no upcaster"):
        registry.decode(_with(old, 1))
    with pytest.raises(PoisonMessage, match="newer"):
        registry.decode(_with(old, 3))


def _with(env: Envelope, version: int) -> Envelope:
    return Envelope(
        event_id=env.event_id,
        event_type=env.event_type,
        version=version,
        occurred_at=env.occurred_at,
        topic=env.topic,
        partition_key=env.partition_key,
        payload=env.payload,
    )


@pytest.mark.parametrize(
    "raw",
    [b"not json", b"[1,2]", b'{"event_id": "x"}', b'{"event_type":"Nope"}'],
)
def test_malformed_bytes_are_poison(raw):
    with pytest.raises(PoisonMessage):
        Envelope.from_bytes(raw)


def test_unknown_type_and_bad_payload_are_poison():
    env = Envelope.wrap(initiated(), partition_key="k")
    with pytest.raises(PoisonMessage, match="unknown event type"):
        CATALOGUE.decode(Envelope(**{**_fields(env), "event_type": "Nope"}))
    with pytest.raises(PoisonMessage, match="payload invalid"):
        CATALOGUE.decode(Envelope(**{**_fields(env), "payload": {"amount_paise": -1}}))
    with pytest.raises(PoisonMessage, match="expected PaymentSucceeded"):
        CATALOGUE.decode_as(env, PaymentSucceeded)


def _fields(env: Envelope) -> dict:
    return {f: getattr(env, f) for f in env.__dataclass_fields__}


def test_payment_succeeded_v1_from_before_the_merchant_category_is_upcast():
    stored_v1 = {
        "event_id": "01a21074-1dba-7cbd-9c85-c466c1b11976",
        "event_type": "PaymentSucceeded",
        "version": 1,
        "occurred_at": "2026-05-01T06:30:00Z",
        "topic": "payments",
        "partition_key": "k",
        "transaction_id": "UPI1",
        "causation_id": None,
        "payload": {
            "transaction_id": "UPI1",
            "merchant_id": "m",
            "amount_paise": 500,
            "response_code": "00",
            "rrn": "123456789012",
            "completed_at": "2026-05-01T06:30:00Z",
            "payer_vpa": "rahulkumar@okhdfc",
            "payee_vpa": "shop@okicici",
            "payer_bank": "HDFC",
            "payee_bank": "ICICI",
        },
    }
    event = CATALOGUE.decode_as(Envelope.from_dict(stored_v1), PaymentSucceeded)
    assert event.merchant_mcc == "0000" and event.amount_paise == 500


def test_a_v1_fraud_assessed_reads_as_v2_without_contributions():
    """FraudAssessed v2 added each scorer's contribution; stored v1 events (in the outbox,
    the ledger) are never rewritten and read as v2 with none recorded."""
    from core.events import FraudAssessed, ScorerContribution

    v2 = FraudAssessed(
        transaction_id="UPI1",
        decision="BLOCK",
        score=0.9,
        scores={"device": 0.65},
        reasons=("DEVICE_SHARED",),
        model_version="hgb-1-x",
        assessed_at=datetime(2026, 12, 1, tzinfo=UTC),
        contributions={"device": ScorerContribution(score=0.65, reasons=("DEVICE_SHARED",))},
    )
    wrapped = Envelope.wrap(v2, partition_key="p")
    assert wrapped.version == 2
    assert CATALOGUE.decode(Envelope.from_bytes(wrapped.to_bytes())) == v2
    old_payload = {k: v for k, v in wrapped.payload.items() if k != "contributions"}
    v1 = Envelope.from_dict({**wrapped.to_dict(), "version": 1, "payload": old_payload})
    read = CATALOGUE.decode(v1)
    assert isinstance(read, FraudAssessed) and read.contributions == {}
    assert read.model_copy(update={"contributions": v2.contributions}) == v2
