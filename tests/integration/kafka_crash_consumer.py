"""Run as a subprocess by test_kafka_bus: a consumer that stores its effect, then is killed
with SIGKILL before its offset can be committed (``--crash``), or runs until every event
has an effect (no flag)."""

from __future__ import annotations

import asyncio
import os
import signal
import sys

from sqlalchemy import text

from core.bus.base import Subscription
from core.bus.kafka import KafkaBus
from core.config import Settings
from core.events import Envelope
from core.inbox import claim
from core.storage import Database

CONSUMER = "effects"


async def main(db_url: str, bootstrap: str, prefix: str, expected: int, crash: bool) -> None:
    db = Database(db_url)
    settings = Settings(
        kafka_bootstrap=bootstrap,
        kafka_idempotence=False,
        kafka_topic_prefix=prefix,
        consumer_max_attempts=3,
        consumer_retry_base_s=0.01,
    )
    done = asyncio.Event()

    async def handle(envelope: Envelope) -> None:
        async with db.transaction() as conn:  # a delivery log outside the effect
            await conn.execute(
                text("INSERT INTO deliveries (event_id) VALUES (:e)"), {"e": envelope.event_id}
            )
        async with db.transaction() as conn:
            if await claim(conn, CONSUMER, envelope.event_id):
                await conn.execute(
                    text("INSERT INTO effects (event_id) VALUES (:e)"), {"e": envelope.event_id}
                )
        if crash:
            os.kill(os.getpid(), signal.SIGKILL)  # effect stored, offset not committed
        async with db.connection() as conn:
            n = (await conn.execute(text("SELECT count(*) FROM effects"))).scalar_one()
        if n >= expected:
            done.set()

    bus = KafkaBus(settings)
    bus.subscribe(Subscription(CONSUMER, ("payments",), handle, concurrency=1))
    await bus.start()
    try:
        await asyncio.wait_for(done.wait(), 30)
        await asyncio.sleep(0.5)  # let the last commit go out
    finally:
        await bus.stop()
        await db.close()


if __name__ == "__main__":
    url, bootstrap, prefix, expected = sys.argv[1:5]
    asyncio.run(main(url, bootstrap, prefix, int(expected), "--crash" in sys.argv))
