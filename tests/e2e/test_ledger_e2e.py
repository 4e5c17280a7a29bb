"""The compliance ledger through the real engine: auditors read it over HTTP (and each read
is itself in the ledger), the CLI verifies and exports it, and an outside verifier that
knows only SPEC §6 accepts the export."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from compliance import chain
from tests.e2e.harness import cli, create_merchant, query, serving, wait_final

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

VERIFIER = Path(__file__).parents[1] / "ledger_verifier.py"


def test_auditor_reads_verification_export_rotation_and_shredding(embedded_env, tmp_path):
    with (
        serving(embedded_env, ("all",)) as (server,),
        httpx.Client(base_url=server.url, timeout=20) as client,
    ):
        merchant = create_merchant(embedded_env)
        m_headers = {"Authorization": f"Bearer {merchant['api_key']}"}
        txns = []
        for i, payer in enumerate(["priya.sharma@ybl", "insufficient@oksbi", "success@okaxis"]):
            r = client.post(
                "/v1/payments",
                headers={**m_headers, "Idempotency-Key": f"l-{i}"},
                json={"payer_vpa": payer, "amount_paise": 1_500, "merchant_order_id": "l"},
            )
            txns.append(r.json()["transaction_id"])
        for txn in txns:
            wait_final(client, txn, m_headers)
        auditor = json.loads(
            cli(embedded_env, "auditor", "create", "--name", "Asha Rao", "--json").stdout
        )
        a_headers = {"Authorization": f"Bearer {auditor['token']}"}

        # A merchant token on the audit API is refused.
        assert client.get(f"/v1/audit/transactions/{txns[0]}", headers=m_headers).status_code == 403

        deadline = time.monotonic() + 30
        while True:  # the ledger writer catches up, then a checkpoint covers it
            cp = client.get("/v1/audit/checkpoints/latest", headers=a_headers)
            events = query(
                embedded_env,
                f"SELECT count(*) FROM ledger_entries WHERE transaction_id = '{txns[0]}'",
            )
            if cp.status_code == 200 and events[0][0] >= 4:
                audit = client.get(f"/v1/audit/transactions/{txns[0]}", headers=a_headers).json()
                if all(e["inclusion_proof"] for e in audit["events"]):
                    break
            assert time.monotonic() < deadline, "ledger never covered the payment"
            time.sleep(0.5)
        kinds = [e["event"]["event_type"] for e in audit["events"]]
        assert kinds == [
            "PaymentInitiated",
            "FraudAssessed",
            "PaymentSubmitted",
            "PaymentSucceeded",
        ]
        assert audit["events"][0]["event"]["payload"]["payer_vpa"] == "priya.sharma@ybl"
        root = bytes.fromhex(audit["checkpoint"]["merkle_root"])
        for item in audit["events"]:
            proof = item["inclusion_proof"]
            assert chain.verify_inclusion(
                proof["leaf_index"],
                proof["tree_size"],
                bytes.fromhex(item["entry"]["entry_hash"]),
                [bytes.fromhex(p) for p in proof["audit_path"]],
                root,
            )
        verify = client.get("/v1/audit/verify", headers=a_headers).json()
        assert verify["valid"] is True and verify["entries"] >= 9

        # Every auditor read above is in the ledger as AuditAccessed.
        deadline = time.monotonic() + 20
        while (
            query(
                embedded_env,
                "SELECT count(*) FROM ledger_entries WHERE event_type = 'AuditAccessed'",
            )[0][0]
            < 3
        ):
            assert time.monotonic() < deadline, "auditor reads never reached the ledger"
            time.sleep(0.2)

        # Rotation: new entries use a new key, old ones still decrypt.
        rotated = json.loads(cli(embedded_env, "keys", "rotate", "--json").stdout)
        r = client.post(
            "/v1/payments",
            headers={**m_headers, "Idempotency-Key": "l-after"},
            json={"payer_vpa": "success@ybl", "amount_paise": 99, "merchant_order_id": "l"},
        )
        wait_final(client, r.json()["transaction_id"], m_headers)
        deadline = time.monotonic() + 20
        while not query(
            embedded_env, f"SELECT 1 FROM ledger_entries WHERE key_id = '{rotated['key_id']}'"
        ):
            assert time.monotonic() < deadline
            time.sleep(0.2)
        again = client.get(f"/v1/audit/transactions/{txns[0]}", headers=a_headers).json()
        assert again["events"][0]["event"]["payload"]["payer_vpa"] == "priya.sharma@ybl"

        # CLI verify, export, and an outside verifier with the published key.
        done = cli(embedded_env, "ledger", "verify", "--full", "--json")
        assert done.returncode == 0 and json.loads(done.stdout)["valid"] is True
        export = tmp_path / "ledger.jsonl"
        assert cli(embedded_env, "ledger", "export", "--out", str(export)).returncode == 0
        key = tmp_path / "ledger.pem"
        key.write_text(cli(embedded_env, "ledger", "public-key").stdout)
        outside = subprocess.run(
            [sys.executable, str(VERIFIER), str(export), str(key)],
            capture_output=True,
            text=True,
            check=False,
        )
        assert outside.returncode == 0, outside.stdout
        text = export.read_text()
        assert "priya.sharma" not in text and "okaxis" not in text

        # Crypto-shredding: past retention the old key goes, the chain still verifies.
        shred = json.loads(
            cli(embedded_env, "keys", "shred", "--retention-days", "0", "--json").stdout
        )
        assert shred["destroyed"] and rotated["key_id"] not in shred["destroyed"]
        # With serve running the master key cannot rotate yet: the operator is told to.
        assert shred["master_rotated"] is False and "keys rotate-master" in shred["master"]
        gone = client.get(f"/v1/audit/transactions/{txns[0]}", headers=a_headers).json()
        assert gone["events"][0]["event"] is None and gone["events"][0]["unreadable"]
        assert cli(embedded_env, "ledger", "verify", "--full").returncode == 0

        # Tamper with one stored byte: verify names the height, exit 1.
        query(
            embedded_env,
            "UPDATE ledger_entries SET ciphertext = set_byte(ciphertext, 0,"
            " get_byte(ciphertext, 0) # 1) WHERE height = 4 RETURNING height",
        )
        bad = cli(embedded_env, "ledger", "verify", "--full", "--json")
        assert bad.returncode == 1 and json.loads(bad.stdout)["first_bad_height"] == 4
        logs = server.log.read_text()
    assert "priya.sharma@ybl" not in logs


def test_auditors_verify_and_export_without_the_master_key(distributed_env, tmp_path):
    # Auditors' tooling reads only signed and sealed data: no UPI_MASTER_KEY needed.
    env = {k: v for k, v in distributed_env.items() if k != "UPI_MASTER_KEY"}
    done = cli(env, "ledger", "verify", "--full", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["valid"] is True
    done = cli(env, "ledger", "export", "--out", str(tmp_path / "ledger.jsonl"))
    assert done.returncode == 0, done.stderr
    # What does need it still says so, in one line naming the variable.
    done = cli(env, "keys", "rotate")
    assert done.returncode == 2 and "UPI_MASTER_KEY" in done.stderr
