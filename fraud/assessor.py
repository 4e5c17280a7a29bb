"""The fraud consumer: ``PaymentInitiated`` in, one ``FraudAssessed`` out.

For each payment, in one transaction: read the history (:mod:`fraud.store`), run the four
scorers concurrently within their budgets (:mod:`fraud.engine`), record the payment in the
history, mark the event handled (inbox) and publish the decision (outbox). A redelivered
event changes nothing; a crash before commit leaves nothing behind, and the redelivery
scores the payment against the same history.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

from core.bus.base import Subscription
from core.clock import Clock
from core.config import Settings
from core.crypto import MasterKey
from core.events import CATALOGUE, Envelope, FraudAssessed, FraudDecision, PaymentInitiated, Topic
from core.inbox import already_processed, claim
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
from fraud.store import HistoryPruner, HistoryStore

__all__ = ["FraudAssessor", "build_engine", "txn_of"]

_log = logging.getLogger(__name__)


def build_engine(settings: Settings) -> tuple[FraudEngine, str]:
    """The four scorers with their budgets and thresholds from settings; the model version."""
    model = load_model(Path(settings.fraud_model_dir) if settings.fraud_model_dir else None)
    rule_s = settings.fraud_rule_budget_ms / 1000
    engine = FraudEngine(
        [
            VelocityScorer(),
            LocationScorer(),
            DeviceScorer(),
            ModelScorer(model.estimator, model.version),
        ],
        budgets_s={
            "velocity": rule_s,
            "location": rule_s,
            "device": rule_s,
            "model": settings.fraud_model_budget_ms / 1000,
        },
        thresholds=Thresholds(
            block=settings.fraud_block_threshold, step_up=settings.fraud_step_up_threshold
        ),
    )
    return engine, model.version


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


class FraudAssessor:
    consumer = "fraud-assessor"

    def __init__(
        self,
        db: Database,
        engine: FraudEngine,
        store: HistoryStore,
        clock: Clock,
        model_version: str,
    ) -> None:
        self._db = db
        self.engine = engine
        self._store = store
        self._clock = clock
        self.model_version = model_version

    @classmethod
    def from_settings(
        cls, settings: Settings, db: Database, master_key: MasterKey, clock: Clock
    ) -> FraudAssessor:
        engine, version = build_engine(settings)
        return cls(db, engine, HistoryStore(master_key), clock, version)

    def pruner(self, retention: timedelta) -> HistoryPruner:
        return HistoryPruner(self._db, self._store, self._clock, retention)

    def subscription(self) -> Subscription:
        return Subscription(
            consumer=self.consumer,
            topics=(Topic.PAYMENTS.value,),
            handler=self.handle,
            event_types=frozenset({PaymentInitiated.name}),
        )

    async def handle(self, envelope: Envelope) -> None:
        event = CATALOGUE.decode_as(envelope, PaymentInitiated)
        txn = txn_of(event)
        async with self._db.transaction() as conn:
            if await already_processed(conn, self.consumer, envelope.event_id):
                return
            started = time.perf_counter()
            history = await self._store.history(conn, txn)
            assessment = _sandbox(txn.payer, await self.engine.assess(txn, history))
            FRAUD_SCORING.observe(time.perf_counter() - started)
            await self._store.observe(conn, event.transaction_id, txn)
            await claim(conn, self.consumer, envelope.event_id)
            assessed = FraudAssessed(
                transaction_id=event.transaction_id,
                decision=assessment.decision,
                score=assessment.score,
                scores=assessment.scores,
                reasons=assessment.reasons,
                model_version=self.model_version,
                skipped=assessment.skipped,
                assessed_at=self._clock.now(),
            )
            await append_to_outbox(
                conn,
                [
                    Envelope.wrap(
                        assessed,
                        partition_key=envelope.partition_key,
                        occurred_at=self._clock.now(),
                        causation_id=envelope.event_id,
                    )
                ],
            )
        FRAUD_DECISIONS.labels(assessment.decision.value).inc()
        _log.info(
            "fraud %s (%.3f)",
            assessment.decision.value,
            assessment.score,
            extra={"transaction_id": event.transaction_id, "payer_vpa": mask_vpa(txn.payer)},
        )

    def close(self) -> None:
        self.engine.close()
