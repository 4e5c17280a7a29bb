"""The fraud consumer: ``PaymentInitiated`` in, one ``FraudAssessed`` out per payment.

The bus hands it a batch (:meth:`FraudAssessor.assess_batch`); the whole batch is one
transaction, whose statements do not grow with the batch's size:

1. claim the batch's inbox rows at once (:func:`core.inbox.claim_many`): only the events
   claimed now are assessed; the others were handled before and produce nothing;
2. read the payee windows of all its payments in one statement
   (:meth:`fraud.store.HistoryStore.payee_windows`);
3. per *round* (below): read the rest of the history of its payments in one statement
   (:meth:`~fraud.store.HistoryStore.histories`), score them all with one job per scorer
   (:meth:`fraud.engine.FraudEngine.assess_batch`), record them in one statement
   (:meth:`~fraud.store.HistoryStore.observe_many`);
4. publish every decision with one outbox append, last.

So 2 + 2 * rounds statements and the outbox append; a batch of distinct payers on distinct
devices is one round.

A redelivered batch changes nothing; a crash before commit leaves nothing behind, and the
redelivery scores the payments against the same history.

Rounds keep the order of a payer's payments. No payer and no device id appears twice in
a round, and a payment goes in the first round after all the earlier payments of its
payer and of its device (:func:`fraud.store.split_rounds`); a round is recorded before
the next is read, in the same transaction. So a payer's second payment in a batch sees
the first in its history, as if they had been handled one after the other; so do a
device's windows. The payee's (merchant's) window is shared by all payers and cannot be
split so: it is read once for the whole batch, before any of it is recorded, each
payment's window with the batch's earlier payments to the payee added in. Histories,
scores and decisions are therefore those of handling the batch one event at a time, in
order (a test holds the two equal on simulated traffic through the database). A batch
does not see the uncommitted payments of another worker's batch, as separate handlers
did not see each other's: in Kafka mode a payer's events go to one worker, in order, but
a device's or a payee's window may miss at most what another worker has in flight.

``handle`` (one event) is the batch path with one event: the delivery layer uses it when
a batch failed for good, so that a poison event is dead-lettered alone.

Metrics: ``FRAUD_SCORING`` is observed once per payment: the time its round took to read
the history and score, plus the batch's payee read (what the payment waited for its
scores once its round began). ``FRAUD_DECISIONS`` counts each payment's decision, after
commit. Logs: one INFO line per batch; each payment's decision at DEBUG, with the payer's
VPA masked.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

from opentelemetry.trace import Span
from sqlalchemy.ext.asyncio import AsyncConnection

from core import tracing
from core.bus.base import Subscription
from core.clock import Clock
from core.config import Settings
from core.crypto import MasterKey
from core.events import (
    CATALOGUE,
    Envelope,
    FraudAssessed,
    FraudDecision,
    PaymentInitiated,
    ScorerContribution,
    Topic,
)
from core.inbox import claim_many
from core.metrics import FRAUD_DECISIONS, FRAUD_SCORING
from core.outbox import append_to_outbox
from core.pii import mask_vpa
from core.sandbox import FRAUD_SANDBOX_PAYERS, SWITCH_SANDBOX_PAYERS, sandbox_local_part
from core.storage import Database
from fraud.combiner import Assessment, Thresholds
from fraud.engine import FraudEngine
from fraud.features import Txn
from fraud.model import load_model
from fraud.scorers import DeviceScorer, LocationScorer, ModelScorer, VelocityScorer
from fraud.store import HistoryPruner, HistoryStore, split_rounds

__all__ = ["FraudAssessor", "build_engine", "shipped_thresholds", "txn_of"]

_log = logging.getLogger(__name__)
_NO_SPANS: Mapping[uuid.UUID, Span] = {}


def build_engine(settings: Settings) -> tuple[FraudEngine, str]:
    """The four scorers with their budgets and thresholds from settings; the model version."""
    model = load_model(Path(settings.fraud_model_dir) if settings.fraud_model_dir else None)
    rule_s = settings.fraud_rule_budget_ms / 1000
    engine = FraudEngine(
        [
            VelocityScorer(),
            LocationScorer(),
            DeviceScorer(),
            ModelScorer(model.trees, model.version),
        ],
        budgets_s={
            "velocity": rule_s,
            "location": rule_s,
            "device": rule_s,
            "model": settings.fraud_model_budget_ms / 1000,
        },
        thresholds=shipped_thresholds(
            model.meta, settings.fraud_block_threshold, settings.fraud_step_up_threshold
        ),
    )
    return engine, model.version


def shipped_thresholds(
    meta: Mapping[str, Any], block: float | None = None, step_up: float | None = None
) -> Thresholds:
    """The thresholds calibrated with the model (``model.json``), each unless configured
    (``UPI_FRAUD_BLOCK_THRESHOLD``, ``UPI_FRAUD_STEP_UP_THRESHOLD``)."""
    calibrated = meta.get("thresholds", {})
    return Thresholds(
        block=float(calibrated.get("block", 0.7)) if block is None else block,
        step_up=float(calibrated.get("step_up", 0.4)) if step_up is None else step_up,
    )


def txn_of(event: PaymentInitiated) -> Txn:
    device = event.device
    location = None
    if device is not None and device.latitude is not None and device.longitude is not None:
        location = (device.latitude, device.longitude)
    return Txn(
        payer=event.payer_vpa.value.lower(),
        payee=event.payee_vpa.value.lower(),
        amount_paise=event.amount_paise,
        at=event.initiated_at,
        device_id=device.id if device else None,
        location=location,
        emulator=bool(device and device.emulator),
        rooted=bool(device and device.rooted),
    )


def _sandbox(payer_vpa: str, assessment: Assessment) -> Assessment:
    """SPEC §5 sandbox payers: the switch's fixed outcomes pass; fraud's own two are fixed."""
    local = sandbox_local_part(payer_vpa)
    if local in SWITCH_SANDBOX_PAYERS:
        return replace(
            assessment, decision=FraudDecision.ALLOW, reasons=(*assessment.reasons, "SANDBOX_PAYER")
        )
    if local in FRAUD_SANDBOX_PAYERS:
        decision = FraudDecision(FRAUD_SANDBOX_PAYERS[local])
        return replace(
            assessment, decision=decision, reasons=(*assessment.reasons, "SANDBOX_PAYER")
        )
    return assessment


def _trace_scorers(
    span: Span, timings: dict[str, tuple[int, int]], assessment: Assessment, round_size: int
) -> None:
    """One child of the payment's ``fraud.assess`` span per scorer: the job that scored
    it with the rest of its round (so the same times for every payment of the round)."""
    for name, (start, end) in timings.items():
        tracing.child_span(
            span,
            f"fraud.score.{name}",
            start,
            end,
            {"fraud.skipped": name in assessment.skipped, "upi.round_size": round_size},
        )


@dataclass(frozen=True)
class _Item:
    envelope: Envelope
    event: PaymentInitiated
    txn: Txn


def _decode(envelopes: Sequence[Envelope]) -> list[_Item]:
    """Every event of the batch, each event id once (the first), in order; raises
    :class:`~core.errors.PoisonMessage` if any does not decode."""
    items: list[_Item] = []
    seen: set[uuid.UUID] = set()
    for envelope in envelopes:
        event = CATALOGUE.decode_as(envelope, PaymentInitiated)
        if envelope.event_id in seen:
            continue
        seen.add(envelope.event_id)
        items.append(_Item(envelope, event, txn_of(event)))
    return items


class FraudAssessor:
    consumer = "fraud-assessor"

    def __init__(
        self,
        db: Database,
        engine: FraudEngine,
        store: HistoryStore,
        clock: Clock,
        model_version: str,
        *,
        sandbox_payers: bool = True,
    ) -> None:
        """``sandbox_payers``: whether SPEC §5's sandbox payers get their fixed decisions
        (the sandbox); in production (``UPI_ENV``) they are scored like any payer."""
        self._db = db
        self._sandbox_payers = sandbox_payers
        self.engine = engine
        self._store = store
        self._clock = clock
        self.model_version = model_version

    @classmethod
    def from_settings(
        cls, settings: Settings, db: Database, master_key: MasterKey, clock: Clock
    ) -> FraudAssessor:
        engine, version = build_engine(settings)
        return cls(
            db,
            engine,
            HistoryStore(master_key),
            clock,
            version,
            sandbox_payers=not settings.production,
        )

    def pruner(self, retention: timedelta) -> HistoryPruner:
        return HistoryPruner(self._db, self._store, self._clock, retention)

    def subscription(self) -> Subscription:
        return Subscription(
            consumer=self.consumer,
            topics=(Topic.PAYMENTS.value,),
            handler=self.handle,
            batch_handler=self.assess_batch,
            event_types=frozenset({PaymentInitiated.name}),
        )

    async def handle(self, envelope: Envelope) -> None:
        await self.assess_batch([envelope])

    async def assess_batch(self, envelopes: Sequence[Envelope]) -> None:
        """Assess every new ``PaymentInitiated`` of the batch, in one transaction.

        Raises :class:`~core.errors.PoisonMessage` (nothing done) if one does not decode:
        the delivery layer then takes the events one by one and sets that one aside."""
        items = _decode(envelopes)
        if not items:
            return
        # One ``fraud.assess`` span per traced payment, in its own trace, over the whole
        # transaction; its scorers' jobs are its children (``fraud.score.<name>``).
        with tracing.event_spans([item.envelope for item in items], "fraud.assess") as spans:
            async with self._db.transaction() as conn:
                # In event id order: two deliveries of overlapping batches (a Kafka
                # rebalance) then wait for each other's inbox rows in the same order, never
                # in a cycle.
                claimed = await claim_many(
                    conn, self.consumer, sorted(item.envelope.event_id for item in items)
                )
                todo = [item for item in items if item.envelope.event_id in claimed]
                decided, rounds = await self._assess(conn, todo, spans)
                await append_to_outbox(
                    conn,
                    [
                        self._assessed(item, a, spans.get(item.envelope.event_id))
                        for item, a in decided
                    ],
                )
        self._report(decided, seen_before=len(items) - len(todo), rounds=rounds)

    async def _assess(
        self,
        conn: AsyncConnection,
        items: list[_Item],
        spans: Mapping[uuid.UUID, Span] = _NO_SPANS,
    ) -> tuple[list[tuple[_Item, Assessment]], int]:
        """Read, score and record ``items`` round by round; their assessments in their
        order, and the number of rounds."""
        if not items:
            return [], 0
        txns = [item.txn for item in items]
        started = time.perf_counter()
        keys = [self._store.pseudonyms(t) for t in txns]
        payee = await self._store.payee_windows(conn, txns, keys)
        shared_s = time.perf_counter() - started
        assessments: dict[int, Assessment] = {}
        rounds = split_rounds(txns)
        for positions in rounds:
            started = time.perf_counter()
            part = [txns[i] for i in positions]
            part_keys = [keys[i] for i in positions]
            histories = await self._store.histories(
                conn, part, [payee[i] for i in positions], part_keys
            )
            timings: dict[str, tuple[int, int]] | None = {} if spans else None
            scored = await self.engine.assess_batch(part, histories, timings)
            elapsed = shared_s + time.perf_counter() - started
            for _ in positions:
                FRAUD_SCORING.observe(elapsed)
            await self._store.observe_many(
                conn, [items[i].event.transaction_id for i in positions], part, part_keys
            )
            for i, assessment in zip(positions, scored, strict=True):
                assessments[i] = (
                    _sandbox(txns[i].payer, assessment) if self._sandbox_payers else assessment
                )
                span = spans.get(items[i].envelope.event_id) if timings else None
                if span is not None and timings:
                    _trace_scorers(span, timings, assessment, len(positions))
        return [(item, assessments[i]) for i, item in enumerate(items)], len(rounds)

    def _assessed(self, item: _Item, assessment: Assessment, span: Span | None) -> Envelope:
        now = self._clock.now()
        assessed = FraudAssessed(
            transaction_id=item.event.transaction_id,
            decision=assessment.decision,
            score=assessment.score,
            scores=assessment.scores,
            reasons=assessment.reasons,
            model_version=self.model_version,
            skipped=assessment.skipped,
            assessed_at=now,
            contributions={
                name: ScorerContribution(score=signal.score, reasons=signal.reasons)
                for name, signal in assessment.signals.items()
            },
        )
        if span is not None:
            span.set_attribute("fraud.decision", assessment.decision.value)
            span.set_attribute("fraud.score", assessment.score)
        return Envelope.wrap(
            assessed,
            partition_key=item.envelope.partition_key,
            occurred_at=now,
            causation_id=item.envelope.event_id,
            headers=tracing.headers_for(item.envelope, span),
        )

    @staticmethod
    def _report(decided: list[tuple[_Item, Assessment]], seen_before: int, rounds: int) -> None:
        """After commit: the decisions' counters and the batch's log line."""
        counts = Counter(a.decision.value for _, a in decided)
        for decision, n in counts.items():
            FRAUD_DECISIONS.labels(decision).inc(n)
        if decided:
            _log.info(
                "fraud batch: %d assessed in %d rounds (%s), %d handled before",
                len(decided),
                rounds,
                ", ".join(f"{d} {n}" for d, n in sorted(counts.items())),
                seen_before,
                extra={"assessed": len(decided), "rounds": rounds, "seen_before": seen_before},
            )
        elif seen_before:
            _log.debug("fraud batch: all %d handled before", seen_before)
        if _log.isEnabledFor(logging.DEBUG):
            for item, a in decided:
                _log.debug(
                    "fraud %s (%.3f)",
                    a.decision.value,
                    a.score,
                    extra={
                        "transaction_id": item.event.transaction_id,
                        "payer_vpa": mask_vpa(item.txn.payer),
                    },
                )

    def close(self) -> None:
        self.engine.close()
