"""Ledger proofs through the real engine (issue 16): consistency proofs over HTTP, a witness
that cosigns (and one that alarms on a fork), published checkpoints, and the engine's own
export verified offline by ``ledger verify-export`` and by a lone copy of the verifier."""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from compliance import verifier
from tests.e2e.harness import UPI_ENGINE, cli, create_merchant, query, serving, wait_final

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

# These tests are about the ledger: a burst of first-time payers to one fresh shop is what
# fraud steps up (a mule's fan-in), so fraud lets everything through here.
NO_FRAUD = {"UPI_FRAUD_STEP_UP_THRESHOLD": "1", "UPI_FRAUD_BLOCK_THRESHOLD": "1"}


def _pay(client: httpx.Client, headers: dict[str, str], n: int, tag: str) -> list[str]:
    txns = []
    for i in range(n):
        r = client.post(
            "/v1/payments",
            headers={**headers, "Idempotency-Key": f"{tag}-{i}"},
            json={"payer_vpa": f"w{tag}{i}@ybl", "amount_paise": 700 + i, "merchant_order_id": tag},
        )
        assert r.status_code == 202, r.text
        txns.append(r.json()["transaction_id"])
    for txn in txns:
        wait_final(client, txn, headers)
    return txns


def _covered(client: httpx.Client, auditor: dict[str, str], env: dict[str, str]) -> dict:
    """Wait until a checkpoint covers every event published so far."""
    deadline = time.monotonic() + 40
    while True:
        events = query(env, "SELECT count(*) FROM outbox")[0][0]
        cp = client.get("/v1/audit/checkpoints/latest", headers=auditor)
        if cp.status_code == 200 and cp.json()["height"] >= events:
            return cp.json()
        assert time.monotonic() < deadline, "no checkpoint covered the payments"
        time.sleep(0.5)


def test_witness_cosigns_proofs_publish_and_the_export_verifies_offline(embedded_env, tmp_path):
    env = {**embedded_env, **NO_FRAUD, "UPI_LEDGER_WITNESSES_REQUIRED": "1"}
    with (
        serving(env, ("all",)) as (server,),
        httpx.Client(base_url=server.url, timeout=20) as client,
    ):
        merchant = create_merchant(env)
        m_headers = {"Authorization": f"Bearer {merchant['api_key']}"}
        token = json.loads(cli(env, "auditor", "create", "--name", "W", "--json").stdout)["token"]
        a_headers = {"Authorization": f"Bearer {token}"}
        first_txns = _pay(client, m_headers, 3, "a")
        first = _covered(client, a_headers, env)
        assert first["published"] is False and first["cosignatures"] == []
        # Nothing is published yet: auditors get the entries, no proof.
        audit = client.get(f"/v1/audit/transactions/{first_txns[0]}", headers=a_headers).json()
        assert audit["checkpoint"] is None
        assert all(e["inclusion_proof"] is None for e in audit["events"])

        key_file = tmp_path / "witness" / "key.pem"
        witness = [
            "ledger", "witness", "--url", server.url, "--token", token,
            "--key-file", str(key_file), "--once", "--json",
        ]  # fmt: skip
        # Not registered with the engine yet: a clear refusal.
        done = cli(env, *witness)
        assert done.returncode == 1 and "add-witness" in done.stderr, done.stderr
        pub = key_file.with_name("key.pem.pub")
        added = json.loads(
            cli(env, "ledger", "add-witness", "--name", "ca-1", "--public-key", str(pub),
                "--json").stdout
        )  # fmt: skip
        done = cli(env, *witness)
        assert done.returncode == 0, done.stderr
        round1 = json.loads(done.stdout)
        # Accepted in the refused round already (kept before cosigning), cosigned now.
        assert round1["decision"] in ("accept", "same") and round1["cosigned"] is True
        cosigned = round1["height"]
        shown = client.get(f"/v1/audit/checkpoints/{cosigned}", headers=a_headers).json()
        assert shown["published"] is True
        assert [c["witness_key_id"] for c in shown["cosignatures"]] == [added["witness_key_id"]]

        # Proofs now use the published checkpoint.
        audit = client.get(f"/v1/audit/transactions/{first_txns[0]}", headers=a_headers).json()
        assert audit["checkpoint"]["height"] == cosigned
        root = bytes.fromhex(audit["checkpoint"]["merkle_root"])
        for item in audit["events"]:
            p = item["inclusion_proof"]
            assert verifier.verify_inclusion(
                p["leaf_index"],
                p["tree_size"],
                bytes.fromhex(item["entry"]["entry_hash"]),
                [bytes.fromhex(h) for h in p["audit_path"]],
                root,
            )

        # More payments, a newer checkpoint: the witness checks consistency and cosigns.
        _pay(client, m_headers, 3, "b")
        second = _covered(client, a_headers, env)
        assert second["height"] > cosigned
        proof = client.get(
            "/v1/audit/consistency",
            params={"first": cosigned, "second": second["height"]},
            headers=a_headers,
        ).json()["proof"]
        assert verifier.verify_consistency(
            cosigned,
            second["height"],
            bytes.fromhex(shown["merkle_root"]),
            bytes.fromhex(second["merkle_root"]),
            [bytes.fromhex(h) for h in proof],
        )
        bad = client.get(
            "/v1/audit/consistency", params={"first": 5, "second": 10**9}, headers=a_headers
        )
        assert bad.status_code == 422 and bad.headers["content-type"].startswith(
            "application/problem+json"
        )
        done = cli(env, *witness)
        assert done.returncode == 0, done.stderr
        round2 = json.loads(done.stdout)
        assert round2["decision"] == "accept" and round2["height"] >= second["height"]

        # /metrics shows how far behind the witness is.
        metrics = client.get("/metrics").text
        deadline = time.monotonic() + 15
        while 'upi_ledger_witness_lag{witness="ca-1"}' not in metrics:
            assert time.monotonic() < deadline, "no witness lag on /metrics"
            time.sleep(1)
            metrics = client.get("/metrics").text

        # Verification over HTTP: incremental, one at a time; concurrent askers share it.
        async def five() -> list[dict]:
            async with httpx.AsyncClient(base_url=server.url, timeout=60) as aclient:
                answers = await asyncio.gather(
                    *(aclient.get("/v1/audit/verify", headers=a_headers) for _ in range(5))
                )
            return [a.json() for a in answers]

        bodies = asyncio.run(five())
        assert all(b["valid"] for b in bodies) and bodies[0]["entries"] >= second["height"]
        assert all(b == bodies[0] for b in bodies), bodies

        # The export, verified offline: by the CLI with the witness required and a pin,
        # and by a lone copy of compliance/verifier.py.
        export = tmp_path / "ledger.jsonl"
        assert cli(env, "ledger", "export", "--out", str(export)).returncode == 0
        ledger_pem = tmp_path / "ledger.pem"
        ledger_pem.write_text(cli(env, "ledger", "public-key").stdout)
        pin = f"{cosigned}:{shown['head_hash']}"
        offline = [
            "ledger", "verify-export", str(export), "--public-key", str(ledger_pem),
            "--witness-key", str(pub), "--pin", pin, "--json",
        ]  # fmt: skip
        done = cli(env, *offline)
        assert done.returncode == 0, done.stdout + done.stderr
        result = json.loads(done.stdout)
        assert result["valid"] and result["witnessed"][added["witness_key_id"]] >= cosigned
        alone = tmp_path / "lone" / "verifier.py"
        alone.parent.mkdir()
        shutil.copy(Path(verifier.__file__), alone)
        lone = subprocess.run(
            [sys.executable, "-I", str(alone), str(export), "--public-key", str(ledger_pem),
             "--witness-key", str(pub), "--pin", pin],
            cwd=alone.parent, capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert lone.returncode == 0, lone.stdout + lone.stderr

        # Truncated below the pin: caught.
        lines = export.read_text().splitlines()
        cut = next(
            i for i, raw in enumerate(lines)
            if json.loads(raw).get("type") == "entry" and json.loads(raw)["height"] == cosigned - 2
        )  # fmt: skip
        truncated = tmp_path / "truncated.jsonl"
        truncated.write_text("\n".join(lines[:cut]) + "\n")
        done = cli(env, "ledger", "verify-export", str(truncated), "--public-key",
                   str(ledger_pem), "--pin", pin, "--json")  # fmt: skip
        assert done.returncode == 1 and "below the pinned checkpoint" in done.stdout

        # A fork shown to the witness: its state says another root at its height.
        state_file = key_file.with_name("key.pem.state.json")
        state = json.loads(state_file.read_text())
        state["accepted"]["merkle_root"] = "00" * 32
        state_file.write_text(json.dumps(state))
        done = cli(env, *witness)
        assert done.returncode == 1 and "ALARM" in done.stderr, done.stderr
        alarm = json.loads(state_file.with_name("key.pem.state.json.alarm.json").read_text())
        assert alarm["decision"] == "fork"
        assert json.loads(state_file.read_text())["accepted"]["merkle_root"] == "00" * 32


def test_verify_export_refuses_bad_usage_clearly(embedded_env, tmp_path):
    bad_key = tmp_path / "bad.pem"
    bad_key.write_text("not a key")
    good_key = tmp_path / "good.pem"
    good_key.write_bytes(
        Ed25519PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    missing = tmp_path / "nothing.jsonl"
    done = cli(embedded_env, "ledger", "verify-export", str(missing), "--public-key", str(bad_key))
    assert done.returncode == 2 and "not an Ed25519 public key" in done.stderr, done.stderr
    done = cli(
        embedded_env, "ledger", "verify-export", str(missing), "--public-key", str(good_key),
        "--pin", "12:zz",
    )  # fmt: skip
    assert done.returncode == 2 and "--pin" in done.stderr
    done = cli(embedded_env, "ledger", "verify-export", str(missing), "--public-key", str(good_key))
    assert done.returncode == 2 and "no such export" in done.stderr
    garbage = tmp_path / "garbage.jsonl"
    garbage.write_text("{not json\n")
    done = cli(embedded_env, "ledger", "verify-export", str(garbage), "--public-key", str(good_key))
    assert done.returncode == 2 and "not an export" in done.stderr


def test_a_witness_in_a_loop_keeps_cosigning_until_stopped(embedded_env, tmp_path):
    with (
        serving({**embedded_env, **NO_FRAUD}, ("all",)) as (server,),
        httpx.Client(base_url=server.url, timeout=20) as client,
    ):
        merchant = create_merchant(embedded_env)
        m_headers = {"Authorization": f"Bearer {merchant['api_key']}"}
        auditor = cli(embedded_env, "auditor", "create", "--name", "L", "--json")
        token = json.loads(auditor.stdout)["token"]
        a_headers = {"Authorization": f"Bearer {token}"}
        key_file = tmp_path / "loop.pem"
        witness = [
            "ledger", "witness", "--url", server.url, "--token", token,
            "--key-file", str(key_file), "--interval", "0.5", "--json",
        ]  # fmt: skip
        cli(embedded_env, *witness[:-3], "--once")  # makes the key (refused: not registered)
        pub = key_file.with_name("loop.pem.pub")
        cli(embedded_env, "ledger", "add-witness", "--name", "loop", "--public-key", str(pub))
        _pay(client, m_headers, 2, "l1")
        first = _covered(client, a_headers, embedded_env)["height"]
        proc = subprocess.Popen(
            [UPI_ENGINE, *witness], env=embedded_env, stdout=subprocess.PIPE, text=True
        )
        try:
            _pay(client, m_headers, 2, "l2")  # a newer checkpoint while it runs
            deadline = time.monotonic() + 40
            while True:
                rows = query(
                    embedded_env,
                    "SELECT count(*), max(height) FROM ledger_cosignatures",
                )
                if rows[0][0] >= 2 and rows[0][1] > first:
                    break
                assert proc.poll() is None, "the witness stopped by itself"
                assert time.monotonic() < deadline, f"the witness did not keep up: {rows}"
                time.sleep(0.5)
        finally:
            proc.send_signal(signal.SIGTERM)
            out, _ = proc.communicate(timeout=20)
        rounds = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        assert sum(r["cosigned"] for r in rounds) >= 2
        assert all(r["decision"] in ("accept", "same") for r in rounds)
