"""PII sealed on the wire: events carry their payer's PII sealed, with the key id (SPEC §1).

An event names its PII fields (:attr:`core.events.Event.pii`). :func:`seal_envelope` takes
them out of the payload and puts them back as one member, sealed under the database's PII
field key (:meth:`core.crypto.MasterKey.seal_pii`) and bound to the event's id and type::

    "payload": {"transaction_id": ..., "amount_paise": ..., ...,
                "pii": {"key_id": "fk_…", "sealed": "<base64 of nonce and ciphertext>"}}

So the outbox, the broker's log and dead letters never hold a payer's VPA, device, IP or
location in clear. Every subscription is :func:`opened`: its handlers get the envelope with
the fields back in place, as if they had never been sealed, and decode it as before. What a
handler could not settle goes to dead letters as it came, sealed. An envelope without a
``pii`` member (stored before sealing existed, or an event without PII) passes unchanged.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
from collections.abc import Sequence
from typing import Any

from core.bus.base import Subscription
from core.crypto import MasterKey, SealedPiiError
from core.errors import PoisonMessage
from core.events import CATALOGUE, Envelope, Event

__all__ = ["PII_MEMBER", "open_envelope", "opened", "seal_envelope", "wrap_sealed"]

PII_MEMBER = "pii"


def _aad(envelope: Envelope) -> bytes:
    return f"event|{envelope.event_id}|{envelope.event_type}".encode()


def seal_envelope(envelope: Envelope, master: MasterKey) -> Envelope:
    """``envelope`` with its event's PII fields sealed into one ``pii`` member."""
    fields = CATALOGUE.type_of(envelope.event_type).pii
    present = [f for f in fields if f in envelope.payload]
    if not present or PII_MEMBER in envelope.payload:
        return envelope
    payload = dict(envelope.payload)
    clear = {f: payload.pop(f) for f in present}
    key_id, _, body = master.seal_pii(clear, _aad(envelope)).partition(b":")
    payload[PII_MEMBER] = {"key_id": key_id.decode(), "sealed": base64.b64encode(body).decode()}
    return dataclasses.replace(envelope, payload=payload)


def wrap_sealed(event: Event, master: MasterKey, **wrap: Any) -> Envelope:
    """:meth:`Envelope.wrap` with the event's PII sealed: how a publisher makes one."""
    return seal_envelope(Envelope.wrap(event, **wrap), master)


def open_envelope(envelope: Envelope, master: MasterKey) -> Envelope:
    """``envelope`` with its ``pii`` member opened back into the fields it sealed."""
    sealed = envelope.payload.get(PII_MEMBER)
    if sealed is None:
        return envelope
    try:
        key_id, body = str(sealed["key_id"]), base64.b64decode(sealed["sealed"], validate=True)
        clear = master.open_pii(key_id.encode() + b":" + body, _aad(envelope))
    except (KeyError, TypeError, binascii.Error, SealedPiiError) as exc:
        raise PoisonMessage(f"{envelope.event_type}: its PII does not open: {exc}") from None
    if not isinstance(clear, dict):
        raise PoisonMessage(f"{envelope.event_type}: its sealed PII is not an object")
    payload = {k: v for k, v in envelope.payload.items() if k != PII_MEMBER}
    payload.update(clear)
    return dataclasses.replace(envelope, payload=payload)


def opened(subscription: Subscription, master: MasterKey) -> Subscription:
    """``subscription`` whose handlers get every envelope with its PII opened. Delivery
    keeps the envelope as it came (sealed): that is what a dead letter stores."""
    handler = subscription.handler
    batch_handler = subscription.batch_handler

    async def open_one(envelope: Envelope) -> object:
        return await handler(open_envelope(envelope, master))

    async def open_batch(envelopes: Sequence[Envelope]) -> object:
        assert batch_handler is not None
        return await batch_handler([open_envelope(e, master) for e in envelopes])

    return dataclasses.replace(
        subscription,
        handler=open_one,
        batch_handler=open_batch if batch_handler is not None else None,
    )
