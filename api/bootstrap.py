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
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from enum import StrEnum

from api import migrations as api_migrations
from compliance import migrations as compliance_migrations
from compliance.ledger import LedgerWriter
from core import migrations as core_migrations
from core.bus.base import EventBus
from core.bus.delivery import RetryPolicy
from core.bus.memory import MemoryBus
from core.clock import Clock, SystemClock
from core.config import BusKind, Settings
from core.crypto import MasterKey, load_master_key
from core.deadletters import TableDeadLetters
from core.embedded import embedded_database_url
from core.errors import ConfigError
from core.metrics import OUTBOX_BACKLOG
from core.outbox import OutboxRelay
from core.storage import Database, Migration, migrate
from dr import migrations as dr_migrations
from fraud import migrations as fraud_migrations
from fraud.assessor import FraudAssessor
from fraud.store import HistoryPruner
from payments import migrations as payments_migrations
from payments.npci.breaker import BankBreakers, BreakerPolicy
from payments.npci.mock import MockSwitch
from payments.npci.switch import SwitchClient
from payments.npci_handler import DeemedResolver, NpciHandler, NpciTimings
from payments.refunds import RefundHandler
from payments.verification import VerificationExpirer, VerificationPolicy
from payments.webhooks import WebhookDispatcher, WebhookPolicy, WebhookRecorder
from settlement import migrations as settlement_migrations
from settlement.holidays import HolidayCalendar
from settlement.recorder import SettlementRecorder

__all__ = [
    "Engine",
    "Role",
    "all_migrations",
    "breaker_policy",
    "database_url",
    "holiday_calendar",
    "mock_switch",
    "npci_timings",
    "verification_policy",
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
    return [
        *core_migrations.MIGRATIONS,
        *payments_migrations.MIGRATIONS,
        *fraud_migrations.MIGRATIONS,
        *compliance_migrations.MIGRATIONS,
        *settlement_migrations.MIGRATIONS,
        *dr_migrations.MIGRATIONS,
        *api_migrations.MIGRATIONS,
    ]


def database_url(settings: Settings) -> str:
    """``UPI_DATABASE_URL``, or the embedded server's (started or joined). Blocking."""
    if settings.database_url:
        return settings.database_url
    return embedded_database_url(settings.data_dir)


def npci_timings(settings: Settings) -> NpciTimings:
    return NpciTimings(
        pay_timeout_s=settings.npci_pay_timeout_s,
        check_status_timeout_s=settings.npci_check_status_timeout_s,
        first_check_s=settings.npci_deemed_first_check_s,
        max_check_interval_s=settings.npci_deemed_max_check_interval_s,
        max_deemed_age_s=settings.npci_deemed_max_age_s,
    )


def holiday_calendar(settings: Settings) -> HolidayCalendar:
    if settings.settlement_holidays_file:
        try:
            return HolidayCalendar.from_file(settings.settlement_holidays_file)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"UPI_SETTLEMENT_HOLIDAYS_FILE: {exc}") from None
    return HolidayCalendar.default()


def webhook_policy(settings: Settings) -> WebhookPolicy:
    return WebhookPolicy(
        retry_base_s=settings.webhook_retry_base_s,
        max_interval_s=settings.webhook_max_age_s
        if settings.webhook_retry_max_interval_s > settings.webhook_max_age_s
        else settings.webhook_retry_max_interval_s,
        max_age_s=settings.webhook_max_age_s,
        timeout_s=settings.webhook_timeout_s,
    )


def breaker_policy(settings: Settings) -> BreakerPolicy:
    return BreakerPolicy(
        window=settings.npci_breaker_window,
        min_calls=settings.npci_breaker_min_calls,
        failure_rate=settings.npci_breaker_failure_rate,
        cooldown_s=settings.npci_breaker_cooldown_s,
    )


def verification_policy(settings: Settings) -> VerificationPolicy:
    return VerificationPolicy(
        ttl_s=settings.fraud_verification_ttl_s,
        max_attempts=settings.fraud_verification_max_attempts,
        otp=settings.fraud_mock_otp,
    )


def mock_switch(settings: Settings, db: Database) -> MockSwitch:
    """The mock NPCI switch, in-process or behind ``upi-engine npci-mock``."""
    return MockSwitch(
        db,
        latency_scale=settings.npci_mock_latency_scale,
        decline_scale=settings.npci_mock_decline_scale,
        pending_s=settings.npci_mock_pending_s,
        hang_s=settings.npci_mock_hang_s,
    )


def _expand(roles: Sequence[Role]) -> frozenset[Role]:
    if Role.ALL in roles or not roles:
        return frozenset(
            {Role.GATEWAY, Role.RELAY, Role.SWITCH, Role.FRAUD, Role.LEDGER, Role.SETTLEMENT}
        )
    return frozenset(roles)


# Tasks that finish their current step on stop() rather than being cancelled.
_GRACEFUL = {
    "outbox-relay",
    "deemed-resolver",
    "verification-expirer",
    "fraud-history-pruner",
    "webhook-dispatcher",
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
    expirer: VerificationExpirer | None = None
    pruner: HistoryPruner | None = None
    fraud: FraudAssessor | None = None
    webhooks: WebhookDispatcher | None = None
    ledger: LedgerWriter | None = None
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

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
    ) -> Engine:
        """``beside_workers``: an extra gateway process of ``serve`` on the in-process bus
        (``UPI_GATEWAY_PROCESSES``): it only answers HTTP; the process with every role,
        beside it on the same database, relays and consumes what it writes."""
        expanded = _expand(roles)
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
        )

    def _make_switch(self) -> SwitchClient:
        if self.settings.npci_url:
            from payments.npci.http import HttpSwitch

            return HttpSwitch(self.settings.npci_url)
        return mock_switch(self.settings, self.db)

    def _make_bus(self) -> EventBus:
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
        await migrate(self.db, all_migrations())
        bus = self._make_bus()
        self.bus = bus
        in_process = isinstance(bus, MemoryBus)
        if Role.SWITCH in self.roles:
            switch = self.switch or self._make_switch()
            self.switch = switch
            timings = npci_timings(self.settings)
            self.npci_handler = NpciHandler(
                self.db,
                switch,
                self.clock,
                timings,
                BankBreakers(breaker_policy(self.settings), self.clock),
                verification_policy(self.settings),
            )
            bus.subscribe(self.npci_handler.subscription())
            self.expirer = VerificationExpirer(self.db, self.clock)
            self._spawn(self.expirer.run(), "verification-expirer")
            self.resolver = DeemedResolver(self.db, switch, self.clock, timings)
            self._spawn(self.resolver.run(), "deemed-resolver")
            refund_handler = RefundHandler(self.db, switch, self.clock, timings.pay_timeout_s)
            bus.subscribe(refund_handler.subscription())
        if Role.FRAUD in self.roles:
            self.fraud = FraudAssessor.from_settings(
                self.settings, self.db, self.master_key, self.clock
            )
            bus.subscribe(self.fraud.subscription())
            self.pruner = self.fraud.pruner(timedelta(days=self.settings.fraud_history_days))
            self._spawn(self.pruner.run(), "fraud-history-pruner")
        if Role.LEDGER in self.roles:
            self.ledger = LedgerWriter(self.db, self.master_key, self.clock)
            bus.subscribe(self.ledger.subscription())
            self._spawn(self.ledger.run_checkpointer(), "ledger-checkpointer")
        if Role.SETTLEMENT in self.roles:
            bus.subscribe(SettlementRecorder(self.db, self.master_key).subscription())
        if Role.GATEWAY in self.roles and (Role.RELAY in self.roles or not in_process):
            # Merchant notifications belong to the gateway: record final statuses, send them.
            # (An extra gateway process on the in-process bus gets no events: the process
            # with every role does this.)
            bus.subscribe(WebhookRecorder(self.db, self.clock).subscription())
            self.webhooks = WebhookDispatcher(
                self.db, self.master_key, self.clock, webhook_policy(self.settings)
            )
            self._spawn(self.webhooks.run(), "webhook-dispatcher")
        await bus.start()
        if Role.RELAY in self.roles:
            self.relay = OutboxRelay(
                self.db,
                bus.publish,
                batch_size=self.settings.relay_batch_size,
                # Rows committed by extra gateway processes cannot wake the relay: look
                # often enough that a payment waits at most 10 ms for its fraud decision.
                poll_interval=min(self.settings.relay_poll_interval_s, 0.01)
                if in_process and self.settings.gateway_processes > 1
                else self.settings.relay_poll_interval_s,
                max_in_flight=16 if in_process else 1,
            )
            if isinstance(bus, MemoryBus):
                bus.on_settled = self.relay.wake  # consumers here commit new outbox rows
            self._spawn(self.relay.run(), "outbox-relay")
            self._spawn(self._watch_backlog(), "backlog-gauge")
        _log.info(
            "engine started",
            extra={"roles": sorted(r.value for r in self.roles), "bus": self.settings.bus.value},
        )

    def _spawn(self, coro: object, name: str) -> None:
        task: asyncio.Task[None] = asyncio.create_task(coro, name=name)  # type: ignore[arg-type]
        self._tasks.append(task)

    async def _watch_backlog(self) -> None:
        while True:
            if self.relay is not None:
                with contextlib.suppress(Exception):
                    OUTBOX_BACKLOG.set(await self.relay.backlog())
            await asyncio.sleep(5)

    def outbox_committed(self) -> None:
        """Wake the relay early when it runs in this process."""
        if self.relay is not None:
            self.relay.wake()

    async def ready(self) -> dict[str, bool]:
        checks = {"database": await self.db.ping()}
        if self.relay is not None:
            checks["relay_running"] = any(
                t.get_name() == "outbox-relay" and not t.done() for t in self._tasks
            )
        return checks

    async def stop(self) -> None:
        if self.relay is not None:
            self.relay.stop()
        if self.resolver is not None:
            self.resolver.stop()
        if self.expirer is not None:
            self.expirer.stop()
        if self.pruner is not None:
            self.pruner.stop()
        if self.webhooks is not None:
            self.webhooks.stop()
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
        await self.db.close()
