"""PII sealed on the wire (core/sealing.py) and at rest (MasterKey.seal_pii): no I/O."""

from __future__ import annotations

import asyncio
import dataclasses
from datetime import UTC, datetime

import orjson
import pytest

from core.bus.base import DeadLetter, Subscription
from core.bus.delivery import Delivery, RetryPolicy, deliver_batch
from core.crypto import MasterKey, SealedPiiError
from core.errors import PoisonMessage
from core.events import CATALOGUE, DeviceInfo, Envelope, PaymentInitiated, PaymentSucceeded
from core.pii import Vpa
from core.sealing import PII_MEMBER, open_envelope, opened, seal_envelope, wrap_sealed

NOW = datetime(2026, 12, 3, 9, 0, tzinfo=UTC)
MASTER = MasterKey(bytes(range(32)))
PAYER = "lakshmi.rao.4421@okhdfc"
DEVICE = DeviceInfo(id="dev-unit-77", ip="203.0.113.9", latitude=12.97, longitude=77.59)


def initiated() -> PaymentInitiated:
    return PaymentInitiated(
        transaction_id="UPI1",
        merchant_id="mer_1",
        merchant_order_id="o1",
        payer_vpa=Vpa(PAYER),
        payee_vpa=Vpa("shop@okicici"),
        amount_paise=1_000,
        device=DEVICE,
        initiated_at=NOW,
    )


def clear_of(raw: bytes) -> list[str]:
    return [s for s in (PAYER, "dev-unit-77", "203.0.113.9", "12.97", "77.59") if s.encode() in raw]


def test_a_sealed_event_holds_no_pii_and_opens_to_the_same_event():
    envelope = wrap_sealed(initiated(), MASTER, partition_key="k", occurred_at=NOW)
    raw = envelope.to_bytes()
    assert clear_of(raw) == []
    assert set(envelope.payload[PII_MEMBER]) == {"key_id", "sealed"}
    assert envelope.payload[PII_MEMBER]["key_id"] == MASTER.field_key_id
    assert "payer_vpa" not in envelope.payload and "device" not in envelope.payload
    assert envelope.payload["payee_vpa"] == "shop@okicici"  # the merchant's, in clear
    with pytest.raises(PoisonMessage):  # sealed, it is not the contract: it must be opened
        CATALOGUE.decode(envelope)
    back = open_envelope(Envelope.from_bytes(raw), MASTER)
    assert CATALOGUE.decode(back) == initiated()


def test_a_sealed_event_does_not_open_elsewhere_nor_altered_nor_under_another_key():
    envelope = wrap_sealed(initiated(), MASTER, partition_key="k", occurred_at=NOW)
    other = wrap_sealed(initiated(), MASTER, partition_key="k", occurred_at=NOW)
    moved = dataclasses.replace(
        other, payload={**other.payload, PII_MEMBER: envelope.payload[PII_MEMBER]}
    )
    with pytest.raises(PoisonMessage, match="does not open"):
        open_envelope(moved, MASTER)  # bound to its event id
    sealed = envelope.payload[PII_MEMBER]["sealed"]
    flipped = sealed[:-6] + ("A" if sealed[-6] != "A" else "B") + sealed[-5:]
    altered = dataclasses.replace(
        envelope,
        payload={
            **envelope.payload,
            PII_MEMBER: {"key_id": MASTER.field_key_id, "sealed": flipped},
        },
    )
    with pytest.raises(PoisonMessage):
        open_envelope(altered, MASTER)
    with pytest.raises(PoisonMessage, match="field key"):
        open_envelope(envelope, MasterKey(bytes(32)))


def test_an_envelope_without_sealed_pii_passes_unchanged():
    """Stored before sealing existed (or published by a test): read as it was."""
    clear = Envelope.wrap(initiated(), partition_key="k", occurred_at=NOW)
    assert open_envelope(clear, MASTER) is clear
    assert seal_envelope(seal_envelope(clear, MASTER), MASTER).payload[PII_MEMBER]  # once


def test_every_event_with_payer_pii_names_it():
    assert PaymentInitiated.pii == ("payer_vpa", "device")
    assert PaymentSucceeded.pii == ("payer_vpa",)
    for name in CATALOGUE.names():
        event = CATALOGUE.type_of(name)
        fields = set(event.model_fields)
        assert set(event.pii) <= fields, name
        assert not ({"payer_vpa", "device"} & fields) - set(event.pii), f"{name} leaves PII clear"


def test_a_rejected_payload_is_described_without_its_values():
    bad = {**initiated().model_dump(mode="json"), "payer_vpa": "lakshmi.rao.4421@@okhdfc"}
    envelope = dataclasses.replace(
        Envelope.wrap(initiated(), partition_key="k", occurred_at=NOW), payload=bad
    )
    with pytest.raises(PoisonMessage) as refused:
        CATALOGUE.decode(envelope)
    assert "payer_vpa" in str(refused.value) and "lakshmi" not in str(refused.value)


class Sink:
    def __init__(self) -> None:
        self.letters: list[DeadLetter] = []

    async def dead_letter(self, letter: DeadLetter) -> None:
        self.letters.append(letter)


def test_handlers_get_the_pii_opened_and_a_dead_letter_keeps_it_sealed():
    seen: list[PaymentInitiated] = []

    async def handler(envelope: Envelope) -> None:
        seen.append(CATALOGUE.decode_as(envelope, PaymentInitiated))
        raise RuntimeError("the handler fails for good")

    sub = opened(Subscription("c", ("payments",), handler), MASTER)
    envelope = wrap_sealed(initiated(), MASTER, partition_key="k", occurred_at=NOW)
    sink = Sink()
    item = Delivery("payments", "k", envelope.to_bytes())
    asyncio.run(deliver_batch(sub, [item], sink, RetryPolicy(max_attempts=2, base_delay=0)))
    assert seen == [initiated(), initiated()]  # opened, twice: the retry
    [letter] = sink.letters
    assert clear_of(letter.raw) == [] and clear_of(letter.reason.encode()) == []
    assert orjson.loads(letter.raw)["payload"][PII_MEMBER]


def test_sealed_pii_at_rest_is_bound_to_its_row_and_names_its_key():
    sealed = MASTER.seal_pii({"payer_vpa": PAYER}, b"payments|UPI1")
    assert sealed.startswith(MASTER.field_key_id.encode() + b":")
    assert PAYER.encode() not in sealed
    assert MASTER.open_pii(sealed, b"payments|UPI1") == {"payer_vpa": PAYER}
    with pytest.raises(SealedPiiError):
        MASTER.open_pii(sealed, b"payments|UPI2")


def test_the_field_key_outlives_a_master_key_handover():
    """What :func:`core.keyring.rotate_master_key` gives the new key: the old field key."""
    sealed = MASTER.seal_pii([12.97, 77.59], b"x")
    new = MasterKey(bytes(range(1, 33)))
    assert new.field_key_id != MASTER.field_key_id
    new.use_field_key(MASTER.field_key_id, MASTER.field_key_bytes())
    assert new.open_pii(sealed, b"x") == [12.97, 77.59]
