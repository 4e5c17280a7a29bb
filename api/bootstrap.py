"""The composition root: the one place that picks concrete adapters and wires them.

Roles (``serve --role``): ``gateway`` (HTTP API, webhooks), ``relay`` (outbox → bus),
``fraud`` (the fraud assessor), ``switch`` (NPCI handler: fraud decisions, verification
expiry, deemed resolver, refunds), ``ledger`` (compliance ledger),
``settlement`` (settlement items). ``all``
runs them in one process, the only choice with the in-process bus.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from enum import StrEnum
from typing import TYPE_CHECKING

from core.clock import Clock, SystemClock, business_date
from core.errors import ConfigError

# Each function imports what it uses: a command of the CLI builds an Engine to reach the
# database and must not load every context (scikit-learn, the switch simulator, ...) to do
# it. What only types need is imported for the type checker.
if TYPE_CHECKING:
    from api.switch_journal import SwitchSettlementJournal
    from compliance.ledger import LedgerWriter
    from core.bus.base import EventBus
    from core.config import Settings
    from core.crypto import MasterKey
    from core.embedded import EmbeddedSupervisor
    from core.keyring import SealedColumn
    from core.outbox import OutboxRelay
    from core.storage import Database, Migration
    from fraud.assessor import FraudAssessor
    from fraud.store import HistoryPruner
    from npcisim.mock import MockSwitch
    from payments.disputes import DisputeWatcher
    from payments.late_success import LateSuccessReturner
    from payments.limits import PaymentLimits
    from payments.npci.breaker import BreakerPolicy
    from payments.npci.http import HttpSwitch
    from payments.npci.rules import CheckStatusPlan
    from payments.npci.switch import SettlementData, SwitchClient
    from payments.npci_handler import DeemedResolver, NpciHandler, NpciTimings
    from payments.verification import (
        VerificationExpirer,
        VerificationPolicy,
        VerificationProvider,
    )
    from payments.webhooks import WebhookDispatcher, WebhookPolicy
    from settlement.cycles import CycleTable
    from settlement.holidays import HolidayCalendar

__all__ = [
    "Engine",
    "Role",
    "all_migrations",
    "breaker_policy",
    "database_url",
    "engine_migrations",
    "holiday_calendar",
    "mock_switch",
    "npci_timings",
    "payment_limits",
    "production_problem",
    "settlement_cycles",
    "simulator_migrations",
    "verification_policy",
    "verification_provider",
]

_log = logging.getLogger(__name__)


class Role(StrEnum):
    ALL = "all"
    GATEWAY = "gateway"
    RELAY = "relay"
    SWITCH = "switch"
    FRAUD = "fraud"
    LEDGER = "ledger"
    SETTLEMENT = "settlement"


def all_migrations() -> list[Migration]:
    from api import migrations as api_migrations
    from compliance import migrations as compliance_migrations
    from core import migrations as core_migrations
    from dr import migrations as dr_migrations
    from fraud import migrations as fraud_migrations
    from payments import migrations as payments_migrations
    from settlement import migrations as settlement_migrations

    return [
        *core_migrations.MIGRATIONS,
        *payments_migrations.MIGRATIONS,
        *fraud_migrations.MIGRATIONS,
        *compliance_migrations.MIGRATIONS,
        *settlement_migrations.MIGRATIONS,
        *dr_migrations.MIGRATIONS,
        *api_migrations.MIGRATIONS,
    ]


def sealed_columns() -> list[SealedColumn]:
    """Every column sealed under the master key, outside the core's own (core/keyring.py):
    what `keys rotate-master` re-wraps."""
    from compliance import keys as ledger_keys
    from payments import disputes, merchants

    return [*ledger_keys.SEALED, *merchants.SEALED, *disputes.SEALED]


async def bind_database_master_key(db: Database, master: MasterKey, settings: Settings) -> None:
    """Check the configured master key against the database (core/keyring.py) and take its
    pseudonym key. A rotation that committed but was stopped before its new key file
    replaced the old one (`keys rotate-master`) is finished here: the new file opens."""
    from core.crypto import load_master_key, master_key_file
    from core.keyring import WrongMasterKey, bind_master_key

    try:
        async with db.transaction() as conn:
            await bind_master_key(conn, master)
        return
    except WrongMasterKey:
        path = master_key_file(settings)
        if path is None:
            raise
        pending = path.with_name(path.name + ".new")
        if not pending.exists():
            raise
    rotated = load_master_key(settings, path=pending)
    async with db.transaction() as conn:
        await bind_master_key(conn, rotated)
    os.replace(pending, path)
    _log.warning("finished a master-key rotation: %s replaced by its new key", path)
    master.take(rotated)


def simulator_migrations() -> list[Migration]:
    """The switch simulator's own tables (schema ``npci_sim``): migrated only where the
    simulator runs, in process or as ``upi-engine npci-mock``."""
    from npcisim import migrations as simulator_migrations_

    return list(simulator_migrations_.MIGRATIONS)


def engine_migrations(settings: Settings) -> list[Migration]:
    """What an engine process migrates: the engine's tables, and the simulator's when the
    switch is the in-process mock (``UPI_NPCI_URL`` unset). With a switch of its own at
    ``UPI_NPCI_URL`` none of the simulator's tables is made here."""
    return all_migrations() + ([] if settings.npci_url else simulator_migrations())


def database_url(settings: Settings) -> str:
    """``UPI_DATABASE_URL``, or the embedded server's (started or joined). Blocking."""
    from core.embedded import embedded_database_url

    if settings.database_url:
        return settings.database_url
    return embedded_database_url(settings.data_dir)


def npci_timings(settings: Settings) -> NpciTimings:
    """The engine's NPCI timers at ``UPI_NPCI_TIME_SCALE``; a check-status plan that NPCI's
    rule would refuse is a configuration error."""
    from payments.npci_handler import NpciTimings

    return NpciTimings.at_scale(
        settings.npci_time_scale,
        pay_timeout_s=settings.npci_pay_timeout_s,
        check_status_timeout_s=settings.npci_check_status_timeout_s,
        plan=_check_status_plan(settings),
    )


def _check_status_plan(settings: Settings) -> CheckStatusPlan:
    """``UPI_NPCI_CHECK_STATUS_PLAN_S`` (at NPCI's own pace), or a configuration error."""
    from payments.npci.rules import CheckStatusPlan, plan_problem

    problem = plan_problem(settings.npci_check_status_plan_s)
    if problem is not None:
        raise ConfigError(f"UPI_NPCI_CHECK_STATUS_PLAN_S: {problem}")
    return CheckStatusPlan(settings.npci_check_status_plan_s)


def payment_limits(settings: Settings) -> PaymentLimits:
    """The gateway's limits (payments/limits.py) with the settings' overrides; a daily cap
    for a category that does not exist is a configuration error."""
    from payments.limits import PayerDailyLimits, PaymentLimits, daily_override_problem

    problem = daily_override_problem(settings.category_daily_limits_paise)
    if problem is not None:
        raise ConfigError(f"UPI_CATEGORY_DAILY_LIMITS_PAISE: {problem}")
    return PaymentLimits(
        mcc_overrides=dict(settings.mcc_limits_paise),
        category_daily_overrides=dict(settings.category_daily_limits_paise),
        payer_daily=PayerDailyLimits(
            max_count=settings.payer_daily_max_count,
            max_amount_paise=settings.payer_daily_max_amount_paise,
        ),
    )


def holiday_calendar(settings: Settings) -> HolidayCalendar:
    from settlement.holidays import HolidayCalendar

    if settings.settlement_holidays_file:
        try:
            return HolidayCalendar.from_file(settings.settlement_holidays_file)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"UPI_SETTLEMENT_HOLIDAYS_FILE: {exc}") from None
    return HolidayCalendar.default()


def settlement_cycles(settings: Settings) -> CycleTable:
    """The cycles a business date is grouped into: ``UPI_SETTLEMENT_CYCLES``, or NPCI's
    table; one that cannot group a day is a configuration error."""
    from settlement.cycles import NPCI_CYCLES, CycleTable, CycleTableError

    if settings.settlement_cycles is None:
        return NPCI_CYCLES
    try:
        return CycleTable.from_entries(settings.settlement_cycles)
    except CycleTableError as exc:
        raise ConfigError(f"UPI_SETTLEMENT_CYCLES: {exc}") from None


def webhook_policy(settings: Settings) -> WebhookPolicy:
    from payments.webhooks import WebhookPolicy

    return WebhookPolicy(
        retry_base_s=settings.webhook_retry_base_s,
        max_interval_s=settings.webhook_max_age_s
        if settings.webhook_retry_max_interval_s > settings.webhook_max_age_s
        else settings.webhook_retry_max_interval_s,
        max_age_s=settings.webhook_max_age_s,
        timeout_s=settings.webhook_timeout_s,
    )


def breaker_policy(settings: Settings) -> BreakerPolicy:
    from payments.npci.breaker import BreakerPolicy

    return BreakerPolicy(
        window=settings.npci_breaker_window,
        min_calls=settings.npci_breaker_min_calls,
        failure_rate=settings.npci_breaker_failure_rate,
        cooldown_s=settings.npci_breaker_cooldown_s,
    )


def verification_policy(settings: Settings) -> VerificationPolicy:
    from payments.verification import VerificationPolicy

    return VerificationPolicy(
        ttl_s=settings.fraud_verification_ttl_s,
        max_attempts=settings.fraud_verification_max_attempts,
        otp=settings.fraud_mock_otp,
    )


def verification_provider(settings: Settings) -> VerificationProvider:
    """The step-up provider: the service at ``UPI_VERIFICATION_URL``, else the mock OTP
    (which :func:`production_problem` refuses in production)."""
    from payments.verification import HttpVerificationProvider, MockOtpProvider

    if settings.verification_url:
        return HttpVerificationProvider(
            settings.verification_url,
            timeout_s=settings.verification_timeout_s,
            token=settings.verification_token,
        )
    return MockOtpProvider(settings.fraud_mock_otp)


def production_problem(
    settings: Settings, roles: frozenset[Role], *, switch_given: bool = False
) -> str | None:
    """``UPI_ENV=production`` refuses the sandbox's mocks where these roles would use them:
    the in-process mock switch (the switch role, without ``UPI_NPCI_URL`` or a switch
    client given by the caller) and the mock OTP (step-up: the gateway checks codes, the
    switch role opens challenges). The line to stop with, or None."""
    if not settings.production:
        return None
    if Role.SWITCH in roles and not settings.npci_url and not switch_given:
        return (
            "UPI_NPCI_URL: UPI_ENV=production refuses the in-process mock switch;"
            " set it to the switch's URL"
        )
    if roles & {Role.GATEWAY, Role.SWITCH} and not settings.verification_url:
        return (
            "UPI_VERIFICATION_URL: UPI_ENV=production refuses the mock OTP;"
            " set it to the step-up provider's URL"
        )
    return None


def mock_switch(settings: Settings, db: Database, clock: Clock | None = None) -> MockSwitch:
    """The mock NPCI switch, in-process (on the engine's clock) or behind ``upi-engine
    npci-mock``, on the same ``UPI_NPCI_TIME_SCALE`` as the engine."""
    from npcisim.disputes import DisputeRules
    from npcisim.mock import MockSwitch

    return MockSwitch(
        db,
        latency_scale=settings.npci_mock_latency_scale,
        decline_scale=settings.npci_mock_decline_scale,
        pending_s=settings.npci_mock_pending_s,
        hang_s=settings.npci_mock_hang_s,
        late_s=settings.npci_mock_late_s,
        clock=clock,
        time_scale=settings.npci_time_scale,
        dispute_rules=DisputeRules(
            after_s=settings.npci_mock_dispute_after_s,
            respond_s=settings.npci_mock_dispute_respond_s,
            decide_s=settings.npci_mock_dispute_decide_s,
        ),
    )


def _expand(roles: Sequence[Role]) -> frozenset[Role]:
    if Role.ALL in roles or not roles:
        return frozenset(
            {Role.GATEWAY, Role.RELAY, Role.SWITCH, Role.FRAUD, Role.LEDGER, Role.SETTLEMENT}
        )
    return frozenset(roles)


# Publishing may fail for this long (a broker's leader election) before new payments get
# 503 bus_unavailable and /readyz says the bus is missing.
_BUS_GRACE_S = 5.0
_GAUGES_EVERY_S = 5.0
_VERIFY_EVERY_S = 60.0

# Tasks that finish their current step on stop() rather than being cancelled.
_GRACEFUL = {
    "outbox-relay",
    "deemed-resolver",
    "late-success-returner",
    "verification-expirer",
    "fraud-history-pruner",
    "webhook-dispatcher",
    "dispute-watcher",
    "ledger-checkpointer",
}


@dataclass
class Engine:
    """Everything a process runs, built from settings. Tests build it with fakes or reals."""

    settings: Settings
    roles: frozenset[Role]
    db: Database
    master_key: MasterKey
    clock: Clock = field(default_factory=SystemClock)
    switch: SwitchClient | None = None
    bus: EventBus | None = None
    relay: OutboxRelay | None = None
    npci_handler: NpciHandler | None = None
    resolver: DeemedResolver | None = None
    late_returner: LateSuccessReturner | None = None
    expirer: VerificationExpirer | None = None
    pruner: HistoryPruner | None = None
    fraud: FraudAssessor | None = None
    webhooks: WebhookDispatcher | None = None
    disputes: DisputeWatcher | None = None
    ledger: LedgerWriter | None = None
    # The step-up provider (gateway, switch), from the settings at start unless given.
    verifier: VerificationProvider | None = None
    supervisor: EmbeddedSupervisor | None = None  # the embedded default's PostgreSQL
    gateways_beside: bool = False  # extra gateway processes write to the outbox too
    # Settlement's own client of the switch, when this process has no switch role.
    _settlement_source: HttpSwitch | MockSwitch | None = None
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _stop_tracing: Callable[[], None] | None = None

    @classmethod
    def build(
        cls,
        settings: Settings,
        roles: Sequence[Role] = (Role.ALL,),
        *,
        url: str | None = None,
        clock: Clock | None = None,
        switch: SwitchClient | None = None,
        beside_workers: bool = False,
        gateways_beside: bool = False,
    ) -> Engine:
        """``beside_workers``: an extra gateway process of ``serve`` on the in-process bus
        (``UPI_GATEWAY_PROCESSES``): it only answers HTTP; the process with every role,
        beside it on the same database, relays and consumes what it writes.
        ``gateways_beside``: this process has such gateways beside it."""
        from core.config import BusKind
        from core.crypto import load_master_key
        from core.embedded import EmbeddedSupervisor
        from core.storage import Database

        expanded = _expand(roles)
        # A bad NPCI plan stops the process here, before anything runs: the plan of
        # npci_timings(), scaled as it scales it, without importing the NPCI handler (a CLI
        # command builds an Engine only to reach the database).
        _check_status_plan(settings).scaled(settings.npci_time_scale)
        settlement_cycles(settings)  # and so does a cycle table that cannot group a day
        payment_limits(settings)  # and so does a daily cap for an unknown category
        problem = production_problem(settings, expanded, switch_given=switch is not None)
        if problem is not None:  # and so does a sandbox mock in production
            raise ConfigError(problem)
        if (
            settings.bus is BusKind.MEMORY
            and expanded != _expand([Role.ALL])
            and not (beside_workers and expanded == {Role.GATEWAY})
        ):
            raise ConfigError(
                "UPI_BUS: the in-process bus runs every role in one process;"
                " use --role all, or UPI_BUS=kafka for one role per process"
            )
        master_key = load_master_key(settings)
        db = Database(url or database_url(settings), pool_size=settings.db_pool_size)
        return cls(
            settings=settings,
            roles=expanded,
            db=db,
            master_key=master_key,
            clock=clock or SystemClock(),
            switch=switch,
            supervisor=EmbeddedSupervisor(
                settings.data_dir, restart_within_s=settings.embedded_restart_within_s
            )
            if url is None and settings.embedded
            else None,
            gateways_beside=gateways_beside,
        )

    def _make_switch(self) -> HttpSwitch | MockSwitch:
        if self.settings.npci_url:
            from payments.npci.http import HttpSwitch

            return HttpSwitch(self.settings.npci_url)
        return mock_switch(self.settings, self.db, self.clock)

    def settlement_data(self) -> SettlementData:
        """The switch's settlement data, through the switch port: this process's switch's,
        or a client of settlement's own (the in-process mock on this database, or the
        switch at ``UPI_NPCI_URL``)."""
        if self.switch is not None:
            from npcisim.mock import MockSwitch
            from payments.npci.http import HttpSwitch

            if isinstance(self.switch, HttpSwitch | MockSwitch):
                return self.switch
        if self._settlement_source is None:
            self._settlement_source = self._make_switch()
        return self._settlement_source

    def switch_journal(self) -> SwitchSettlementJournal:
        """Settlement's switch journal, from :meth:`settlement_data`."""
        from api.switch_journal import SwitchSettlementJournal

        return SwitchSettlementJournal(self.settlement_data())

    async def close_switch_journal(self) -> None:
        if self._settlement_source is not None:
            source, self._settlement_source = self._settlement_source, None
            await source.close()

    def _make_bus(self) -> EventBus:
        from core.bus.delivery import RetryPolicy
        from core.bus.memory import MemoryBus
        from core.config import BusKind
        from core.deadletters import TableDeadLetters

        policy = RetryPolicy(
            max_attempts=self.settings.consumer_max_attempts,
            base_delay=self.settings.consumer_retry_base_s,
        )
        table = TableDeadLetters(self.db)
        if self.settings.bus is BusKind.KAFKA:
            from core.bus.kafka import KafkaBus

            return KafkaBus(self.settings, table, policy)
        return MemoryBus(table, policy)

    async def start(self) -> None:
        from api.telemetry import start_tracing
        from core.bus.base import Subscription
        from core.bus.memory import MemoryBus
        from core.sealing import opened
        from core.storage import migrate
        from payments.retention import PiiPurger, seal_clear_payers

        self._stop_tracing = start_tracing(self.settings, [r.value for r in self.roles])
        if self.supervisor is not None:
            self._spawn(self.supervisor.run(), "embedded-postgres-supervisor")
        if self.settings.wait_for_primary:
            await self._wait_until_writable()
        await migrate(self.db, engine_migrations(self.settings))
        await bind_database_master_key(self.db, self.master_key, self.settings)
        if self.roles & {Role.GATEWAY, Role.SWITCH}:
            await seal_clear_payers(self.db, self.master_key)  # rows from before sealing
        bus = self._make_bus()
        self.bus = bus

        def subscribe(subscription: Subscription) -> None:
            # Every consumer gets the events' PII opened (core/sealing.py).
            bus.subscribe(opened(subscription, self.master_key))

        if self.verifier is None and self.roles & {Role.GATEWAY, Role.SWITCH}:
            self.verifier = verification_provider(self.settings)
        in_process = isinstance(bus, MemoryBus)
        if Role.SWITCH in self.roles:
            from payments.disputes import DisputeWatcher
            from payments.late_success import LateSuccessReturner
            from payments.npci.breaker import BankBreakers
            from payments.npci_handler import DeemedResolver, NpciHandler, show_breaker_state
            from payments.refunds import RefundHandler
            from payments.verification import VerificationExpirer

            switch = self.switch or self._make_switch()
            self.switch = switch
            timings = npci_timings(self.settings)
            self.npci_handler = NpciHandler(
                self.db,
                switch,
                self.clock,
                timings,
                BankBreakers(breaker_policy(self.settings), self.clock, show_breaker_state),
                verification_policy(self.settings),
                self.verifier,
                master=self.master_key,
            )
            subscribe(self.npci_handler.subscription())
            self.expirer = VerificationExpirer(self.db, self.clock, master=self.master_key)
            self._spawn(self.expirer.run(), "verification-expirer")
            self.resolver = DeemedResolver(
                self.db, switch, self.clock, timings, master=self.master_key
            )
            self._spawn(self.resolver.run(), "deemed-resolver")
            refund_handler = RefundHandler(
                self.db, switch, self.clock, timings.pay_timeout_s, master=self.master_key
            )
            subscribe(refund_handler.subscription())
            self.disputes = DisputeWatcher(
                self.db,
                switch,
                self.master_key,
                self.clock,
                interval_s=self.settings.dispute_poll_interval_s,
                answer_timeout_s=timings.check_status_timeout_s,
            )
            self._spawn(self.disputes.run(), "dispute-watcher")
            self.late_returner = LateSuccessReturner(
                self.db, switch, self.clock, timings, master=self.master_key
            )
            subscribe(self.late_returner.subscription())
            self._spawn(self.late_returner.run(), "late-success-returner")
            self.pii_purger = PiiPurger(
                self.db,
                self.clock,
                timedelta(days=self.settings.pii_retention_days),
                self.settings.pii_purge_interval_s,
            )
            self._spawn(self.pii_purger.run(), "pii-retention-purge")
        if Role.FRAUD in self.roles:
            from fraud.assessor import FraudAssessor
            from fraud.store import seal_clear_places

            await seal_clear_places(self.db, self.master_key)  # rows from before sealing
            self.fraud = FraudAssessor.from_settings(
                self.settings, self.db, self.master_key, self.clock
            )  # in production (UPI_ENV), sandbox payers are scored like any other
            subscribe(self.fraud.subscription())
            self.pruner = self.fraud.pruner(timedelta(days=self.settings.fraud_history_days))
            self._spawn(self.pruner.run(), "fraud-history-pruner")
        if Role.LEDGER in self.roles:
            from compliance import keys as ledger_keys
            from compliance.ledger import LedgerWriter

            self.ledger = LedgerWriter(
                self.db,
                self.master_key,
                self.clock,
                ledger_keys.DataKeyPolicy(
                    max_age=timedelta(days=self.settings.ledger_data_key_max_age_days),
                    max_entries=self.settings.ledger_data_key_max_entries,
                ),
            )
            subscribe(self.ledger.subscription())
            self._spawn(self.ledger.run_checkpointer(), "ledger-checkpointer")
        if Role.SETTLEMENT in self.roles:
            from settlement.recorder import SettlementRecorder

            subscribe(SettlementRecorder(self.db, self.master_key).subscription())
        if Role.GATEWAY in self.roles and (Role.RELAY in self.roles or not in_process):
            # Merchant notifications belong to the gateway: record final statuses, send them.
            # (An extra gateway process on the in-process bus gets no events: the process
            # with every role does this.)
            from payments.webhooks import WebhookDispatcher, WebhookRecorder

            subscribe(WebhookRecorder(self.db, self.clock, master=self.master_key).subscription())
            self.webhooks = WebhookDispatcher(
                self.db,
                self.master_key,
                self.clock,
                webhook_policy(self.settings),
                production=self.settings.production,
                allow_private=self.settings.webhooks_to_private,
            )
            self._spawn(self.webhooks.run(), "webhook-dispatcher")
        await bus.start()
        if Role.RELAY in self.roles:
            from core.outbox import OutboxRelay

            self.relay = OutboxRelay(
                self.db,
                bus.publish,
                batch_size=self.settings.relay_batch_size,
                # Rows committed by extra gateway processes cannot wake the relay: look
                # often enough that a payment waits at most 10 ms for its fraud decision.
                poll_interval=min(self.settings.relay_poll_interval_s, 0.01)
                if in_process and self.gateways_beside
                else self.settings.relay_poll_interval_s,
                max_in_flight=16 if in_process else 1,
                log_lost=getattr(bus, "log_lost", None),
            )
            if isinstance(bus, MemoryBus):
                bus.on_settled = self.relay.wake  # consumers here commit new outbox rows
            self._spawn(self.relay.run(), "outbox-relay")
        self._spawn(self._watch_gauges(), "gauges")
        _log.info(
            "engine started",
            extra={"roles": sorted(r.value for r in self.roles), "bus": self.settings.bus.value},
        )

    async def _wait_until_writable(self, every_s: float = 0.05) -> None:
        """A warm standby engine: everything is loaded; start once the database is a
        primary (promoted), which the orchestrator's failover makes it.

        A SIGTERM or SIGINT while waiting ends the process at once (exit 0): there is
        nothing to drain yet, and the server's own handler would only mark a shutdown the
        startup never reaches (a warm engine and its extra gateway processes outlived their
        drill that way)."""
        from core.storage import sql_text

        _log.info("warm standby: waiting for the database to accept writes")
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
        for sig in previous:
            loop.add_signal_handler(sig, stop.set)
        try:
            while not stop.is_set():
                with contextlib.suppress(Exception):  # a standby rebuilt meanwhile: again
                    async with self.db.connection() as conn:
                        recovering = (
                            await conn.execute(sql_text("SELECT pg_is_in_recovery()"))
                        ).scalar_one()
                    if not recovering:
                        _log.info("the database accepts writes: starting")
                        return
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), every_s)
        finally:
            for sig, handler in previous.items():
                loop.remove_signal_handler(sig)
                signal.signal(sig, handler)
        _log.info("stopped while waiting for the database to accept writes")
        await self.db.close()
        raise SystemExit(0)

    def _spawn(self, coro: object, name: str) -> None:
        task: asyncio.Task[None] = asyncio.create_task(coro, name=name)  # type: ignore[arg-type]
        self._tasks.append(task)

    async def _watch_gauges(self) -> None:
        """Every 5 s, the gauges of what runs in this process (SPEC §10): the outbox
        backlog, each consumer's lag, the deemed backlog, the TAT breaches, the checkpoint's
        age."""
        from compliance.ledger import verify_ledger
        from compliance.witnesses import witness_lags
        from core.bus.memory import MemoryBus
        from core.metrics import (
            CONSUMER_LAG,
            DATABASE_PRIMARY,
            DEEMED_PAYMENTS,
            DR_STANDBYS_CONFIGURED,
            DR_STANDBYS_STREAMING,
            LEDGER_CHECKPOINT_AGE,
            LEDGER_SIZE,
            LEDGER_VALID,
            LEDGER_WITNESS_LAG,
            OUTBOX_BACKLOG,
            TAT_BREACHES,
        )
        from dr.status import standby_counts
        from settlement.run import unreversed_tat_breaches

        verify_at = time.monotonic() + _GAUGES_EVERY_S
        while True:
            backlog = 0
            if self.relay is not None:
                with contextlib.suppress(Exception):
                    backlog = await self.relay.backlog()
                    OUTBOX_BACKLOG.set(backlog)
                with contextlib.suppress(Exception):
                    async with self.db.connection() as conn:
                        counts = await standby_counts(conn)
                    DATABASE_PRIMARY.set(0 if counts is None else 1)
                    if counts is not None:
                        DR_STANDBYS_STREAMING.set(counts[0])
                        DR_STANDBYS_CONFIGURED.set(counts[1])
            lag = getattr(self.bus, "lag", None)
            if lag is not None:
                with contextlib.suppress(Exception):
                    # The in-process bus's log is the outbox: what is not relayed yet is
                    # behind for every consumer.
                    behind = backlog if isinstance(self.bus, MemoryBus) else 0
                    for consumer, count in (await lag()).items():
                        CONSUMER_LAG.labels(consumer).set(count + behind)
            if self.resolver is not None:
                with contextlib.suppress(Exception):
                    DEEMED_PAYMENTS.set(await self.resolver.backlog())
            if Role.SETTLEMENT in self.roles:
                with contextlib.suppress(Exception):
                    today = business_date(self.clock.now())
                    journal = self.switch_journal()
                    breaches = await unreversed_tat_breaches(self.db, journal, today)
                    TAT_BREACHES.set(breaches)
            if self.ledger is not None:
                with contextlib.suppress(Exception):
                    size, age = await self.ledger.size_and_checkpoint_age()
                    LEDGER_SIZE.set(size)
                    LEDGER_CHECKPOINT_AGE.set(age)
                with contextlib.suppress(Exception):
                    for witness, behind in (await witness_lags(self.db)).items():
                        LEDGER_WITNESS_LAG.labels(witness).set(behind)
                if time.monotonic() >= verify_at:
                    verify_at = time.monotonic() + _VERIFY_EVERY_S
                    with contextlib.suppress(Exception):
                        # Incremental: from the last checkpoint a run verified.
                        result = await verify_ledger(self.db, self.clock, full=False)
                        LEDGER_VALID.set(1 if result.valid else 0)
                        if not result.valid:
                            _log.error("ledger verification failed", extra=result.to_dict())
            await asyncio.sleep(_GAUGES_EVERY_S)

    def outbox_committed(self) -> None:
        """Wake the relay early when it runs in this process."""
        if self.relay is not None:
            self.relay.wake()

    def bus_unavailable(self) -> bool:
        """The relay here has failed to publish for longer than a blip."""
        return self.relay is not None and self.relay.bus_down_for() > _BUS_GRACE_S

    async def ready(self) -> dict[str, bool]:
        checks = {"database": await self.db.ping()}
        if self.relay is not None:
            checks["bus"] = not self.bus_unavailable()
            checks["relay_running"] = any(
                t.get_name() == "outbox-relay" and not t.done() for t in self._tasks
            )
        return checks

    async def stop(self) -> None:
        if self.supervisor is not None:
            self.supervisor.stop()
        if self.relay is not None:
            self.relay.stop()
        if self.resolver is not None:
            self.resolver.stop()
        if self.late_returner is not None:
            self.late_returner.stop()
        if self.pii_purger is not None:
            self.pii_purger.stop()
        if self.expirer is not None:
            self.expirer.stop()
        if self.pruner is not None:
            self.pruner.stop()
        if self.webhooks is not None:
            self.webhooks.stop()
        if self.disputes is not None:
            self.disputes.stop()
        if self.ledger is not None:
            self.ledger.stop()
        for task in self._tasks:
            if task.get_name() not in _GRACEFUL:
                task.cancel()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.gather(*self._tasks, return_exceptions=True), 10)
        if self.bus is not None:
            await self.bus.stop()
        if self.fraud is not None:
            self.fraud.close()
        # The in-process mock lets the requests it received finish; the HTTP client to a
        # remote switch closes its connections. Test doubles may have neither.
        closing = getattr(self.switch, "close", None)
        if closing is not None:
            await closing()
        await self.close_switch_journal()
        if self.verifier is not None:
            await self.verifier.close()
        await self.db.close()
        if self._stop_tracing is not None:
            stop_tracing, self._stop_tracing = self._stop_tracing, None
            await asyncio.to_thread(stop_tracing)  # the last spans' export may take a moment
