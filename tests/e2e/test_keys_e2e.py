"""`upi-engine keys rotate-master` on the embedded default (issue 20, part 3): refused while
an engine runs; then every secret is re-wrapped and the new key replaces master.key; the old
key no longer opens the database; a key in UPI_MASTER_KEY needs --new-key-file."""

from __future__ import annotations

import base64
import json
import os
import stat
from pathlib import Path

import pytest

from tests.e2e.harness import cli, create_merchant, serving

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_rotate_master_replaces_the_key_and_the_old_one_is_refused(embedded_env):
    env = embedded_env
    key_file = Path(env["UPI_DATA_DIR"]) / "master.key"
    with serving(env, ("all",)):
        merchant = create_merchant(env)
        busy = cli(env, "keys", "rotate-master")
        assert busy.returncode == 2, busy.stdout + busy.stderr
        assert "stop serve" in busy.stderr and len(busy.stderr.strip().splitlines()) == 1
        assert not key_file.with_name("master.key.new").exists()
    old = key_file.read_text()

    done = cli(env, "keys", "rotate-master", "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["key_file"] == str(key_file.resolve())
    counts = {r["column"]: r["values"] for r in result["rewrapped"]}
    assert counts["merchants.webhook_secret_enc"] == 1
    assert counts["webhook_secrets.secret_enc"] == 1
    assert counts["master_key_check.check_sealed"] == 1
    assert "ledger_keys.wrapped" in counts and "disputes.evidence_enc" in counts
    new = key_file.read_text()
    assert new != old and len(base64.b64decode(new)) == 32
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert not key_file.with_name("master.key.new").exists()

    # The new key opens the database (every command checks); the old one is refused.
    rotated = cli(env, "merchant", "rotate-webhook-secret", "--merchant", merchant["merchant_id"])
    assert rotated.returncode == 0, rotated.stderr
    old_file = Path(env["UPI_DATA_DIR"]) / "old.key"
    fd = os.open(old_file, os.O_WRONLY | os.O_CREAT, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(old)
    refused = cli({**env, "UPI_MASTER_KEY_FILE": str(old_file)}, "keys", "rotate")
    assert refused.returncode == 2
    assert "not the database's master key" in refused.stderr, refused.stderr
    # A key given in the environment cannot be replaced in place.
    inline = cli({**env, "UPI_MASTER_KEY": new.strip()}, "keys", "rotate-master")
    assert inline.returncode == 2 and "--new-key-file" in inline.stderr

    # The signing key rotates beside the ledger; auditors take every public key.
    first = json.loads(cli(env, "keys", "rotate-signing", "--json").stdout)
    second = json.loads(cli(env, "keys", "rotate-signing", "--json").stdout)
    assert first["signing_key_id"] != second["signing_key_id"]
    bundle = cli(env, "ledger", "public-key", "--all").stdout
    assert first["public_pem"] in bundle and second["public_pem"] in bundle
    assert cli(env, "ledger", "public-key").stdout == second["public_pem"]
    pem_file = Path(env["UPI_DATA_DIR"]) / "ledger-keys.pem"
    pem_file.write_text(bundle)
    verified = cli(env, "ledger", "verify", "--public-key", str(pem_file), "--json")
    assert verified.returncode == 0 and json.loads(verified.stdout)["valid"], verified.stderr

    # Shredding is followed by a new master key (no engine runs): old copies of the
    # shredded key's wrapped form no longer open.
    assert cli(env, "keys", "rotate").returncode == 0  # the ledger's key becomes inactive
    before_shred = key_file.read_text()
    shred = cli(env, "keys", "shred", "--retention-days", "0", "--json")
    assert shred.returncode == 0, shred.stderr
    shredded = json.loads(shred.stdout)
    assert shredded["destroyed"] and shredded["master_rotated"] is True, shredded
    assert key_file.read_text() != before_shred
    assert cli(env, "keys", "rotate").returncode == 0  # the new key opens the database
