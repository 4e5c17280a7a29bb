"""Credentials through the real commands beside a running serve: a merchant's key rotated
with a grace period, every credential listed, one revoked and refused within a second; a
webhook secret rotated, both signatures sent until the grace period ends."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from tests.e2e.harness import cli, create_merchant, serving
from tests.e2e.test_webhooks_e2e import BODY, Receiver, pay, verify

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def eventually(check, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_rotate_list_and_revoke_credentials(embedded_env):
    env = embedded_env
    with serving(env, ("all",)) as (server,), httpx.Client(base_url=server.url) as client:
        merchant = create_merchant(env)
        old = {"Authorization": f"Bearer {merchant['api_key']}"}
        assert (
            client.get("/v1/payments", params={"merchant_order_id": "x"}, headers=old).status_code
            == 200
        )

        rotated = cli(
            env,
            "merchant",
            "rotate-key",
            "--merchant",
            merchant["merchant_id"],
            "--grace",
            "3",
            "--json",
        )
        assert rotated.returncode == 0, rotated.stderr
        fresh = json.loads(rotated.stdout)
        new = {"Authorization": f"Bearer {fresh['api_key']}"}
        # Both work through the grace period; then only the new one.
        for headers in (old, new):
            assert (
                client.get(
                    "/v1/payments", params={"merchant_order_id": "x"}, headers=headers
                ).status_code
                == 200
            )
        eventually(
            lambda: (
                client.get(
                    "/v1/payments", params={"merchant_order_id": "x"}, headers=old
                ).status_code
                == 401
            )
        )
        assert (
            client.get("/v1/payments", params={"merchant_order_id": "x"}, headers=new).status_code
            == 200
        )

        auditor = json.loads(cli(env, "auditor", "create", "--name", "Asha", "--json").stdout)
        listed = json.loads(cli(env, "token", "list", "--json").stdout)["credentials"]
        mine = [c for c in listed if c["principal_id"] == merchant["merchant_id"]]
        assert sorted(c["status"] for c in mine) == ["active", "expired"]
        assert {c["prefix"] for c in mine} == {merchant["api_key"][:12], fresh["api_key"][:12]}
        assert all(merchant["api_key"] not in json.dumps(c) for c in listed)  # never the token
        [theirs] = [c for c in listed if c["principal_id"] == auditor["principal_id"]]
        assert theirs["role"] == "auditor" and theirs["last_used_at"] is None

        revoked = cli(env, "token", "revoke", fresh["credential_id"], "--json")
        assert revoked.returncode == 0 and json.loads(revoked.stdout)["revoked_now"] is True
        started = time.monotonic()
        eventually(
            lambda: (
                client.get(
                    "/v1/payments", params={"merchant_order_id": "x"}, headers=new
                ).status_code
                == 401
            ),
            timeout=5,
        )
        assert time.monotonic() - started < 3  # the gateway's cache holds a token for 1 s
        again = cli(env, "token", "revoke", fresh["credential_id"], "--json")
        assert again.returncode == 0 and json.loads(again.stdout)["revoked_now"] is False
        for args in (
            ("token", "revoke", "cred_nope"),
            ("merchant", "rotate-key", "--merchant", "mer_nope"),
            ("merchant", "rotate-webhook-secret", "--merchant", "mer_nope"),
        ):
            refused = cli(env, *args)
            assert refused.returncode == 2 and refused.stderr.strip().count("\n") == 0, (
                refused.stderr
            )


def test_a_rotated_webhook_secret_signs_beside_the_old_one_until_the_grace_ends(embedded_env):
    env = {**embedded_env, "UPI_WEBHOOK_RETRY_BASE_S": "0.2"}
    receiver = Receiver()
    try:
        with serving(env, ("all",)) as (server,):
            merchant = create_merchant(env, "shop@okicici", "--webhook-url", receiver.url)
            receiver.secret = merchant["webhook_secret"]
            pay(server, merchant, "ws-1", BODY)
            receiver.wait_for(1)
            rotated = cli(
                env,
                "merchant",
                "rotate-webhook-secret",
                "--merchant",
                merchant["merchant_id"],
                "--grace",
                "3",
                "--json",
            )
            assert rotated.returncode == 0, rotated.stderr
            new_secret = json.loads(rotated.stdout)["webhook_secret"]
            time.sleep(1.2)  # the dispatcher reads secrets again within 1 s
            pay(server, merchant, "ws-2", {**BODY, "merchant_order_id": "ws-2"})
            receiver.wait_for(2)
            header = receiver.signatures[-1]
            assert header.count("sha256=") == 2
            receiver.secret, receiver.also_accepts = new_secret, []
            # A receiver that knows only the new secret accepts it already.
            assert receiver.bad_signatures == 0
            time.sleep(2.5)  # the grace period ends
            pay(server, merchant, "ws-3", {**BODY, "merchant_order_id": "ws-3"})
            receiver.wait_for(3)
            assert receiver.signatures[-1].count("sha256=") == 1
            assert receiver.bad_signatures == 0
            # The old secret no longer verifies the newest webhook.
            assert not verify(
                b"{}", str(int(time.time())), receiver.signatures[-1], merchant["webhook_secret"]
            )
    finally:
        receiver.server.shutdown()
