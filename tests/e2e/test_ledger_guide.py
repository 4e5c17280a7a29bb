"""docs/ledger.md's walkthrough runs as written against a live engine: export, verify
offline, set up a witness, pin a checkpoint, verify with the lone verifier file."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from tests.e2e.harness import UPI_ENGINE, cli, create_merchant, serving, wait_final

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

GUIDE = (Path(__file__).parents[2] / "docs" / "ledger.md").read_text()


def walkthrough() -> list[str]:
    section = GUIDE[GUIDE.index("## Walkthrough") :]
    section = section[: section.index("\n## ", 1)] if "\n## " in section[1:] else section
    return re.findall(r"```sh\n(.*?)```", section, flags=re.S)


def test_the_walkthrough_runs_as_written(embedded_env, tmp_path):
    blocks = walkthrough()
    assert len(blocks) == 4 and all("upi-engine" in b or "verifier.py" in b for b in blocks)
    with (
        serving(embedded_env, ("all",)) as (server,),
        httpx.Client(base_url=server.url, timeout=20) as client,
    ):
        merchant = create_merchant(embedded_env)
        headers = {"Authorization": f"Bearer {merchant['api_key']}"}
        r = client.post(
            "/v1/payments",
            headers={**headers, "Idempotency-Key": "guide-1"},
            json={"payer_vpa": "asha@okaxis", "amount_paise": 4_200, "merchant_order_id": "g"},
        )
        wait_final(client, r.json()["transaction_id"], headers)
        token = json.loads(cli(embedded_env, "auditor", "create", "--name", "G", "--json").stdout)
        a_headers = {"Authorization": f"Bearer {token['token']}"}
        deadline = time.monotonic() + 30
        while client.get("/v1/audit/checkpoints/latest", headers=a_headers).status_code != 200:
            assert time.monotonic() < deadline, "no checkpoint"
            time.sleep(0.5)
        # `upi-engine` and `python3` as an auditor's shell finds them: the engine's venv.
        bindir = Path(UPI_ENGINE).parent
        env = {
            **embedded_env,
            "URL": server.url,
            "AUDITOR_TOKEN": token["token"],
            "PATH": f"{bindir}:{embedded_env.get('PATH', os.environ['PATH'])}",
        }
        script = "set -euo pipefail\n" + "\n".join(blocks)
        done = subprocess.run(
            ["bash", "-c", script],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=240,
            check=False,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        assert done.stdout.count("valid") >= 3 and "INVALID" not in done.stdout, done.stdout
        assert "cosigned" in done.stdout
        assert (tmp_path / "verifier.py").is_file() and (tmp_path / "witness" / "key.pem").is_file()
