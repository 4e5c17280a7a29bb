"""Step-up through the verification-provider port, on the real PostgreSQL: the engine's
provider is told of each challenge it opens, a code is checked by it, and a provider that
gives no verdict costs the payer no try."""

from __future__ import annotations

import asyncio

import pytest
from sqlalchemy import text

from api.bootstrap import Engine
from core.errors import VerificationRejected
from payments import service
from payments.domain import PaymentStatus
from payments.merchants import Merchant, insert_merchant
from payments.verification import VerificationPolicy, VerificationUnavailable, verify
from tests.integration.test_payment_flow import command, final, reaches, settings

pytestmark = pytest.mark.postgres


class ScriptedProvider:
    """Answers checks from a script: True, False, or None for no verdict."""

    def __init__(self) -> None:
        self.started: list[tuple[str, str]] = []
        self.checked: list[tuple[str, str]] = []
        self.verdicts: list[bool | None] = []
        self.closed = False

    async def start(self, transaction_id: str, payer_vpa: str) -> None:
        self.started.append((transaction_id, payer_vpa))

    async def check(self, transaction_id: str, code: str) -> bool:
        self.checked.append((transaction_id, code))
        verdict = self.verdicts.pop(0)
        if verdict is None:
            raise VerificationUnavailable("timed out")
        return verdict

    async def close(self) -> None:
        self.closed = True


@pytest.fixture
async def engine_and_provider(db_url):
    eng = Engine.build(settings(), url=db_url)
    provider = ScriptedProvider()
    eng.verifier = provider  # what the composition root would pick from UPI_VERIFICATION_URL
    await eng.start()
    async with eng.db.transaction() as conn:
        await insert_merchant(conn, Merchant("mer_1", "Shop", "shop@okicici", "5411", None), b"x")
    yield eng, provider
    await eng.stop()
    assert provider.closed


async def attempts(engine: Engine, txn: str) -> int:
    async with engine.db.connection() as conn:
        return (
            await conn.execute(
                text("SELECT attempts FROM payment_verifications WHERE transaction_id = :t"),
                {"t": txn},
            )
        ).scalar_one()


async def test_the_provider_opens_the_challenge_and_decides_the_code(engine_and_provider):
    engine, provider = engine_and_provider
    policy = VerificationPolicy(max_attempts=3)
    result = await service.initiate_payment(
        engine.db,
        command("fraud-stepup@okhdfc", 500, "k1"),
        engine.clock,
        master=engine.master_key,
    )
    txn = result.body["transaction_id"]
    await reaches(engine, txn, PaymentStatus.PENDING_VERIFICATION)
    deadline = asyncio.get_running_loop().time() + 5
    while not provider.started:  # told after the step-up committed
        assert asyncio.get_running_loop().time() < deadline, "no challenge opened"
        await asyncio.sleep(0.02)
    assert provider.started == [(txn, "fraud-stepup@okhdfc")]

    # No verdict: refused as unavailable, and no try is spent.
    provider.verdicts = [None, None]
    for _ in range(2):
        with pytest.raises(VerificationRejected) as info:
            await verify(
                engine.db,
                "mer_1",
                txn,
                "111111",
                engine.clock,
                policy,
                provider,
                master=engine.master_key,
            )
        assert info.value.code == "verification_unavailable"
    assert await attempts(engine, txn) == 0

    # The provider's "no" counts a try; even the mock's OTP is nothing to it.
    provider.verdicts = [False]
    with pytest.raises(VerificationRejected) as info:
        await verify(
            engine.db,
            "mer_1",
            txn,
            policy.otp,
            engine.clock,
            policy,
            provider,
            master=engine.master_key,
        )
    assert info.value.code == "verification_failed" and "2 tries left" in str(info.value)
    assert await attempts(engine, txn) == 1

    provider.verdicts = [True]
    await verify(
        engine.db, "mer_1", txn, "975310", engine.clock, policy, provider, master=engine.master_key
    )
    assert provider.checked[-1] == (txn, "975310")
    p = await final(engine, txn)
    assert p.status is PaymentStatus.SUCCESS
    # Verified: asked again, the same answer, without asking the provider.
    checks = len(provider.checked)
    await verify(
        engine.db, "mer_1", txn, "975310", engine.clock, policy, provider, master=engine.master_key
    )
    assert len(provider.checked) == checks


class SlowProvider(ScriptedProvider):
    """Says no to every code, slowly: many guesses are out at once."""

    async def check(self, transaction_id: str, code: str) -> bool:
        self.checked.append((transaction_id, code))
        await asyncio.sleep(0.2)
        return False


async def test_guesses_sent_side_by_side_are_never_checked_more_often_than_the_tries(db_url):
    eng = Engine.build(settings(), url=db_url)
    provider = SlowProvider()
    eng.verifier = provider
    await eng.start()
    try:
        async with eng.db.transaction() as conn:
            await insert_merchant(
                conn, Merchant("mer_1", "Shop", "shop@okicici", "5411", None), b"x"
            )
        policy = VerificationPolicy(max_attempts=3)
        result = await service.initiate_payment(
            eng.db,
            command("fraud-stepup@okhdfc", 500, "k9"),
            eng.clock,
            master=eng.master_key,
        )
        txn = result.body["transaction_id"]
        await reaches(eng, txn, PaymentStatus.PENDING_VERIFICATION)
        guesses = await asyncio.gather(
            *(
                verify(
                    eng.db,
                    "mer_1",
                    txn,
                    f"{n:06d}",
                    eng.clock,
                    policy,
                    provider,
                    master=eng.master_key,
                )
                for n in range(40)
            ),
            return_exceptions=True,
        )
        assert all(isinstance(g, VerificationRejected) for g in guesses)
        assert len(provider.checked) == 3  # the tries, not the 40 guesses
        assert (await final(eng, txn)).status is PaymentStatus.FAILED
    finally:
        await eng.stop()
