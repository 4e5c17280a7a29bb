"""No payer PII in clear where an attacker would look (SPEC §1, issue 20): after an end to
end run on the distributed mode (``serve`` on PostgreSQL and the Tansu broker), a
``pg_dump`` of the engine's database, every record the broker holds (values, keys and
headers) and the server's log are searched for the payers' VPAs, device ids, IPs and
locations. None may be there in clear.

The dump leaves out the schema ``npci_sim``: the mock switch's own books (its accounts and
journal stand for NPCI's and the banks', which hold the payer's VPA by necessity), which in
production are not in the engine's database at all.
"""

from __future__ import annotations

import asyncio
import base64
import os
import subprocess

import httpx
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from sqlalchemy.engine import make_url

from dr.cluster import PgBinaries
from tests.e2e.harness import Serve, base_env, create_merchant, wait_final
from tests.support import unique_name

pytestmark = [pytest.mark.e2e, pytest.mark.kafka]

# Distinctive values, so that a hit cannot be anything else.
PAYERS = ["zeta.quill.7731@okaxis", "yara.vonn.5520@ybl", "omkar.prithvi.0192@oksbi"]
DEVICES = ["dev-QX7-unique-4412", "dev-LM2-unique-9907", "dev-TT5-unique-3318"]
IPS = ["203.0.113.77", "198.51.100.23", "192.0.2.141"]
PLACES = [(12.971598, 77.594566), (19.076090, 72.877426), (28.613939, 77.209023)]


def _needles() -> dict[str, bytes]:
    found = {}
    for payer, device, ip, (lat, lon) in zip(PAYERS, DEVICES, IPS, PLACES, strict=True):
        found[payer] = payer.encode()
        found[payer.split("@")[0]] = payer.split("@")[0].encode()  # the local part alone
        found[device] = device.encode()
        found[ip] = ip.encode()
        found[f"{lat}"] = f"{lat}".encode()
        found[f"{lon}"] = f"{lon}".encode()
    return found


def _in_clear(haystack: bytes) -> list[str]:
    lowered = haystack.lower()
    return sorted(name for name, needle in _needles().items() if needle.lower() in lowered)


def _dump(db_url: str) -> bytes:
    url = make_url(db_url)
    host = url.host or str(url.query.get("host", ""))
    args = ["--dbname", url.database or "", "--username", url.username or "postgres"]
    args += ["--host", host, "--exclude-schema", "npci_sim", "--no-owner"]
    if url.port:
        args += ["--port", str(url.port)]
    env = {**os.environ, "PGPASSWORD": url.password or ""}
    pg_dump = PgBinaries.locate().bin_dir / "pg_dump"
    done = subprocess.run([str(pg_dump), *args], capture_output=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    assert b"COPY public.payments" in done.stdout  # the dump holds the data
    return done.stdout


async def _broker_records(bootstrap: str, prefix: str) -> tuple[int, bytes]:
    """Every record of the engine's topics, from the start of every partition."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        topics = [t for t in await consumer.topics() if t.startswith(prefix)]
        partitions = [
            TopicPartition(t, p) for t in topics for p in consumer.partitions_for_topic(t) or ()
        ]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        ends = await consumer.end_offsets(partitions)
        chunks: list[bytes] = []
        count = 0

        async def behind() -> bool:
            return any([await consumer.position(tp) < ends[tp] for tp in partitions])

        while await behind():
            batch = await consumer.getmany(timeout_ms=1000)
            for records in batch.values():
                for r in records:
                    count += 1
                    chunks += [r.value or b"", r.key or b""]
                    chunks += [k.encode() + b"=" + v for k, v in r.headers]
        return count, b"\n".join(chunks)
    finally:
        await consumer.stop()


def test_no_payer_pii_in_clear_in_the_database_the_broker_or_the_log(db_url, kafka_bootstrap):
    prefix = unique_name("pii")
    env = base_env(
        UPI_DATABASE_URL=db_url,
        UPI_BUS="kafka",
        UPI_KAFKA_BOOTSTRAP=kafka_bootstrap,
        UPI_KAFKA_IDEMPOTENCE="false",
        UPI_KAFKA_TOPIC_PREFIX=prefix,
        UPI_MASTER_KEY=base64.b64encode(os.urandom(32)).decode(),
        UPI_DATA_DIR="/tmp/unused-data-dir",
        # Fresh payers with fresh devices: the model may step them up; this test is not
        # about fraud, so every payment goes to the switch.
        UPI_FRAUD_STEP_UP_THRESHOLD="1.0",
        UPI_FRAUD_BLOCK_THRESHOLD="1.0",
    )
    server = Serve(env).start()
    try:
        merchant = create_merchant(env)
        headers = {"Authorization": f"Bearer {merchant['api_key']}"}
        with httpx.Client(base_url=server.url, timeout=30) as client:
            txns = []
            for n, (payer, device, ip, (lat, lon)) in enumerate(
                zip(PAYERS, DEVICES, IPS, PLACES, strict=True)
            ):
                body = {
                    "payer_vpa": payer,
                    "amount_paise": 1_000 + n,
                    "merchant_order_id": f"pii-{n}",
                    "device": {"id": device, "ip": ip, "latitude": lat, "longitude": lon},
                }
                r = client.post(
                    "/v1/payments", json=body, headers={**headers, "Idempotency-Key": f"pii-{n}"}
                )
                assert r.status_code == 202, r.text
                txns.append(r.json()["transaction_id"])
            finals = [wait_final(client, txn, headers) for txn in txns]
            assert [f["status"] for f in finals] == ["SUCCESS"] * 3, finals
            # The merchant sees its payer, masked: the engine can still open what it sealed.
            assert finals[0]["payer_vpa"] == "ze***31@okaxis"
            refund = client.post(
                f"/v1/payments/{txns[0]}/refunds",
                json={"amount_paise": 10},
                headers={**headers, "Idempotency-Key": "pii-refund"},
            )
            assert refund.status_code == 202, refund.text
        records, captured = asyncio.run(_broker_records(kafka_bootstrap, prefix))
        # Every event of the run went through the broker, the payers' among them.
        assert records >= 3 * 4, records  # initiated, assessed, submitted, succeeded
        assert b"PaymentInitiated" in captured and b"PaymentSucceeded" in captured
        assert _in_clear(captured) == [], "payer PII in clear on the broker"
        dump = _dump(db_url)
        assert _in_clear(dump) == [], "payer PII in clear in a dump of the database"
        assert _in_clear(server.log.read_bytes()) == [], "payer PII in clear in the log"
    finally:
        server.stop()
