"""Disputes end to end against ``upi-engine serve``: the switch raises four complaints (the
``dispute`` sandbox payer); the merchant accepts one, contests two (one with documents, which
wins; one without, which loses) and leaves one to be accepted at ``respond_by``. Each change
reaches a signed webhook, the ledger (auditor view, ``ledger verify``) and the settlement
files (``chargebacks_paise``, the dispute cycles)."""

from __future__ import annotations

import csv
import io
import json
import time
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime

import httpx
import pytest

from core.clock import business_date
from tests.e2e.harness import cli, create_merchant, serving
from tests.e2e.test_webhooks_e2e import Receiver, pay

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

# NPCI's timetable at 0.02: the complaint 0.1 s after the payment, 8 s to answer, a contest
# decided 1 s after it.
FAST = {
    "UPI_NPCI_TIME_SCALE": "0.02",
    "UPI_NPCI_MOCK_DISPUTE_RESPOND_S": "400",
    "UPI_NPCI_MOCK_DISPUTE_DECIDE_S": "50",
    "UPI_DISPUTE_POLL_INTERVAL_S": "0.1",
}


@pytest.fixture
def hooks() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.server.shutdown()


def test_disputes_raised_accepted_contested_and_accepted_automatically(embedded_env, hooks):
    env = {**embedded_env, **FAST}
    with serving(env, ("all",)) as (server,), httpx.Client(base_url=server.url) as client:
        merchant = create_merchant(env, "shop@okicici", "--webhook-url", hooks.url)
        other = create_merchant(env, "other@okaxis")
        hooks.secret = merchant["webhook_secret"]
        headers = {"Authorization": f"Bearer {merchant['api_key']}"}
        amounts = {"accept": 1_100, "win": 2_200, "lose": 3_300, "ignore": 4_400}
        txns = {
            name: pay(
                server,
                merchant,
                f"dsp-{name}",
                {"payer_vpa": "dispute@okhdfc", "amount_paise": amount, "merchant_order_id": name},
            )
            for name, amount in amounts.items()
        }
        hooks.wait_for(8)  # four final statuses and four dispute.opened
        opened = [h for h in hooks.received if h.get("event") == "dispute.opened"]
        by_txn = {h["dispute"]["transaction_id"]: h["dispute"] for h in opened}
        assert set(by_txn) == set(txns.values())
        ids = {name: by_txn[txn]["dispute_id"] for name, txn in txns.items()}
        listed = client.get("/v1/disputes", params={"status": "OPEN"}, headers=headers).json()
        assert {d["dispute_id"] for d in listed["items"]} == set(ids.values())
        one = client.get(f"/v1/disputes/{ids['accept']}", headers=headers).json()
        assert (one["status"], one["amount_paise"]) == ("OPEN", 1_100)
        # Another merchant sees nothing of these.
        stranger = {"Authorization": f"Bearer {other['api_key']}"}
        assert client.get(f"/v1/disputes/{ids['accept']}", headers=stranger).status_code == 404
        assert client.get("/v1/disputes", headers=stranger).json()["items"] == []
        assert (
            client.post(f"/v1/disputes/{ids['accept']}/accept", headers=stranger).status_code == 404
        )

        accepted = client.post(f"/v1/disputes/{ids['accept']}/accept", headers=headers)
        assert accepted.status_code == 200 and accepted.json()["status"] == "ACCEPTED"
        again = client.post(
            f"/v1/disputes/{ids['accept']}/contest", json={"evidence": "x"}, headers=headers
        )
        assert again.status_code == 409 and again.json()["code"] == "dispute_not_open"
        bad = client.post(
            f"/v1/disputes/{ids['win']}/contest",
            json={"evidence": "x", "attachments": []},
            headers=headers,
        )
        assert bad.status_code == 422  # unknown field: refused, nothing recorded
        won = client.post(
            f"/v1/disputes/{ids['win']}/contest",
            json={"evidence": "Delivered 2 Dec, signed.", "documents": ["INV-7", "AWB-123"]},
            headers=headers,
        )
        assert won.status_code == 200 and won.json()["status"] == "CONTESTED"
        lost = client.post(
            f"/v1/disputes/{ids['lose']}/contest",
            json={"evidence": "We think it was delivered."},
            headers=headers,
        )
        assert lost.status_code == 200, lost.text

        hooks.wait_for(14, timeout=40)  # + accepted x2, contested x2, won, lost
        events = Counter(
            (h["event"], h["dispute"]["dispute_id"]) for h in hooks.received if "event" in h
        )
        assert events == Counter(
            {
                **{("dispute.opened", d): 1 for d in ids.values()},
                ("dispute.accepted", ids["accept"]): 1,
                ("dispute.contested", ids["win"]): 1,
                ("dispute.won", ids["win"]): 1,
                ("dispute.contested", ids["lose"]): 1,
                ("dispute.lost", ids["lose"]): 1,
                ("dispute.accepted", ids["ignore"]): 1,
            }
        )
        assert hooks.bad_signatures == 0
        final = {
            name: client.get(f"/v1/disputes/{d}", headers=headers).json() for name, d in ids.items()
        }
        assert {n: d["status"] for n, d in final.items()} == {
            "accept": "ACCEPTED",
            "win": "WON",
            "lose": "LOST",
            "ignore": "ACCEPTED",
        }
        assert final["ignore"]["auto_accepted"] and not final["accept"]["auto_accepted"]
        assert [n for n, d in final.items() if d["chargeback"]] == ["accept", "lose", "ignore"]

        # The ledger holds every change, for the auditor, and still verifies.
        auditor = json.loads(cli(env, "auditor", "create", "--name", "A", "--json").stdout)
        audit = {"Authorization": f"Bearer {auditor['token']}"}
        deadline = time.monotonic() + 20
        while True:
            seen = client.get(f"/v1/audit/transactions/{txns['lose']}", headers=audit).json()
            types = [e["entry"]["event_type"] for e in seen["events"]]
            if "DisputeResolved" in types or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert [t for t in types if t.startswith("Dispute")] == [
            "DisputeRaised",
            "DisputeContested",
            "DisputeResolved",
        ]
        verified = cli(env, "ledger", "verify", "--json")
        assert verified.returncode == 0, verified.stdout + verified.stderr

    # Today's settlement so far: three chargebacks debited from the payout, in the dispute
    # cycles; the nets still sum to 0.
    today = business_date(datetime.now(UTC)).isoformat()
    preview = cli(
        env,
        "settlement",
        "run",
        "--business-date",
        today,
        "--preview",
        "--out",
        env["UPI_DATA_DIR"],
        "--json",
    )
    assert preview.returncode == 0, preview.stderr
    summary = json.loads(preview.stdout)
    assert summary["preview"] is True and summary["closed_now"] is False
    charged = amounts["accept"] + amounts["lose"] + amounts["ignore"]
    assert (summary["chargebacks"], summary["chargebacks_paise"]) == (3, charged)
    assert summary["interbank_nets_sum_paise"] == 0
    dispute_cycles = {n: c for n, c in summary["cycles"].items() if c["dispute"]}
    assert sum(c["items"] for c in dispute_cycles.values()) == 3
    assert sum(c["amount_paise"] for c in dispute_cycles.values()) == charged
    with open(f"{summary['out_dir']}/merchant_payouts.csv") as f:
        [row] = [
            r
            for r in csv.DictReader(io.StringIO(f.read()))
            if r["merchant_id"] == merchant["merchant_id"]
        ]
    assert int(row["gross_paise"]) == sum(amounts.values())
    assert int(row["chargebacks_paise"]) == charged
    assert int(row["net_payout_paise"]) == sum(amounts.values()) - charged
    assert summary["reconciliation"]["switch_only"] == 0
