"""The offline verifier (compliance/verifier.py) and the witness's decisions (issue 16):
every tamper and fork scenario caught at the right height or checkpoint, the file standing
alone (standard library and ``cryptography`` only), and format v2's AAD. Pure: no database.
"""

from __future__ import annotations

import ast
import base64
import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from compliance import chain, tree, verifier
from tests import ledger_verifier

LOG_KEY = Ed25519PrivateKey.generate()
WITNESS = Ed25519PrivateKey.generate()
WITNESS_ID = verifier.witness_key_id(WITNESS.public_key())
DATA_KEY = os.urandom(32)
EVERY = 10  # a checkpoint every EVERY entries


def _entries(n: int, *, start_prev: bytes = chain.GENESIS_PREV, tag: str = "") -> list:
    out, prev = [], start_prev
    for h in range(n):
        txn = f"UPI{h:04d}"
        nonce, ct = chain.seal(
            DATA_KEY,
            "k1",
            {"event_id": f"e{h}{tag}", "amount_paise": h},
            event_id=f"e{h}{tag}",
            event_type="PaymentSucceeded",
            transaction_id=txn,
        )
        e = chain.build_entry(
            prev,
            h,
            event_id=f"e{h}{tag}",
            event_type="PaymentSucceeded",
            transaction_id=txn,
            recorded_at="2026-12-02T00:00:00.000000Z",
            key_id="k1",
            nonce=nonce,
            ciphertext=ct,
        )
        out.append(e)
        prev = e.entry_hash
    return out


def export(entries: list, *, cosign_every: int = 2, key: Ed25519PrivateKey = LOG_KEY) -> list[dict]:
    """A v2 export as the engine writes it: header, entries, a checkpoint every EVERY
    entries followed by its consistency proof from the one before and, for every
    ``cosign_every``-th, the witness's cosignature."""
    hashes = [e.entry_hash for e in entries]
    tiles = tree.TileBuilder(0, {}).extend(hashes)
    lines: list[dict] = [{"type": "header", "format": 2, "from_height": 0, "v2_from_height": 0}]
    previous = None
    for e in entries:
        lines.append(e.to_export())
        size = e.height + 1
        if size % EVERY:
            continue
        acc = chain.MerkleAccumulator()
        acc.extend(hashes[:size])
        cp = chain.sign_checkpoint(
            key,
            height=size,
            head_hash=e.entry_hash,
            merkle_root_=acc.root(),
            signed_at="2026-12-02T00:00:10.000000Z",
            signing_key_id="sk-1",
        )
        lines.append(cp.to_export())
        if previous is not None:
            proof = tree.consistency_proof(previous, size, tiles)
            lines.append(
                {
                    "type": "consistency",
                    "first": previous,
                    "second": size,
                    "proof": [p.hex() for p in proof],
                }
            )
        if (size // EVERY) % cosign_every == 0:
            cs = chain.cosign(
                WITNESS, cp, witness_key_id_=WITNESS_ID, cosigned_at="2026-12-02T00:00:11Z"
            )
            lines.append(cs.to_export())
        previous = size
    return lines


ENTRIES = _entries(45)
GOOD = export(ENTRIES)


def check(lines: list[dict], **kwargs) -> verifier.VerifyResult:
    return verifier.verify_export(lines, [LOG_KEY.public_key()], **kwargs)


def _head(lines: list[dict], height: int) -> bytes:
    [cp] = [x for x in lines if x["type"] == "checkpoint" and x["height"] == height]
    return bytes.fromhex(cp["head_hash"])


def _index(lines: list[dict], height: int) -> int:
    return next(i for i, x in enumerate(lines) if x["type"] == "entry" and x["height"] == height)


def test_the_good_export_verifies_here_and_in_the_independent_verifier():
    result = check(GOOD, witness_keys=[WITNESS.public_key()], pins={20: _head(GOOD, 20)})
    assert result.valid, result
    assert (result.entries, result.checkpoints) == (45, 4)
    assert result.witnessed == {WITNESS_ID: 40}
    assert ledger_verifier.verify(GOOD, LOG_KEY.public_key())[0]


# --------------------------------------------------------------------------- issue 16, part 6


def test_a_flipped_byte_is_caught_at_its_height():
    lines = copy.deepcopy(GOOD)
    i = _index(lines, 17)
    ct = bytearray(chain.LedgerEntry.from_export(lines[i]).ciphertext)
    ct[3] ^= 1
    lines[i]["ciphertext"] = base64.b64encode(bytes(ct)).decode()
    result = check(lines)
    assert (result.valid, result.first_bad_height) == (False, 17)


def test_a_deleted_entry_is_caught_at_its_height():
    lines = copy.deepcopy(GOOD)
    del lines[_index(lines, 23)]
    result = check(lines)
    assert (result.valid, result.first_bad_height) == (False, 23)


def test_reordered_entries_are_caught_where_the_order_breaks():
    lines = copy.deepcopy(GOOD)
    i, j = _index(lines, 31), _index(lines, 32)
    lines[i], lines[j] = lines[j], lines[i]
    result = check(lines)
    assert (result.valid, result.first_bad_height) == (False, 31)


def test_an_inserted_entry_is_caught_at_its_height():
    """A well-formed entry slipped in at height 12, chained on entry 11: the original entry
    12 no longer follows."""
    lines = copy.deepcopy(GOOD)
    e = ENTRIES[12]
    forged = chain.build_entry(
        ENTRIES[11].entry_hash,
        12,
        event_id="forged",
        event_type=e.event_type,
        transaction_id=e.transaction_id,
        recorded_at=e.recorded_at,
        key_id=e.key_id,
        nonce=e.nonce,
        ciphertext=e.ciphertext,
    )
    lines.insert(_index(lines, 12), forged.to_export())
    result = check(lines)
    assert (result.valid, result.first_bad_height) == (False, 12)


def test_a_history_rewritten_and_resigned_is_caught_by_a_pin_and_by_the_witness():
    """The operator (who holds the signing key) rewrites entry 15 onwards and re-signs every
    checkpoint: the export is self-consistent, so only what someone kept catches it."""
    rewritten = ENTRIES[:15] + _entries(45, tag="x")[15:]
    # Re-chain from 15 so that prev hashes hold.
    fixed = ENTRIES[:15]
    for e in rewritten[15:]:
        fixed.append(
            chain.build_entry(
                fixed[-1].entry_hash,
                e.height,
                event_id=e.event_id,
                event_type=e.event_type,
                transaction_id=e.transaction_id,
                recorded_at=e.recorded_at,
                key_id=e.key_id,
                nonce=e.nonce,
                ciphertext=e.ciphertext,
            )
        )
    forged = export(fixed, cosign_every=10**6)  # the witness never cosigned these
    assert check(forged).valid  # alone, a re-signed history verifies
    pinned = check(forged, pins={20: _head(GOOD, 20)})
    assert (pinned.valid, pinned.first_bad_height) == (False, 19)
    assert "pinned" in (pinned.reason or "")
    # Old cosignatures carried over onto the new checkpoints do not verify.
    cosigs = [x for x in GOOD if x["type"] == "cosignature"]
    with_old = forged + cosigs
    witnessed = check(with_old, witness_keys=[WITNESS.public_key()])
    assert not witnessed.valid and "cosignature" in (witnessed.reason or "")
    # And without them, the required witness is missing.
    missing = check(forged, witness_keys=[WITNESS.public_key()])
    assert not missing.valid and "required witness" in (missing.reason or "")
    # The witness itself refuses the rewritten checkpoint: not consistent with the one it
    # accepted.
    state = verifier.WitnessState(20, _head(GOOD, 20), _root(GOOD, 20))
    new = verifier.Checkpoint.from_export(_checkpoint(forged, 40))
    tiles = tree.TileBuilder(0, {}).extend([e.entry_hash for e in fixed])
    proof = tree.consistency_proof(20, 40, tiles)
    verdict = verifier.witness_verdict(state, new, [LOG_KEY.public_key()], proof)
    assert verdict.decision == "fork"


def test_an_export_truncated_below_a_pin_is_caught():
    cut = GOOD[: _index(GOOD, 25)]  # ends after checkpoint 20 and entries to 24
    assert check(cut).valid  # alone, a truncated export verifies
    result = check(cut, pins={40: _head(GOOD, 40)})
    assert not result.valid and result.first_bad_height == 25
    assert "below the pinned checkpoint 40" in (result.reason or "")


def test_a_witness_shown_two_checkpoints_of_the_same_height_alarms():
    cp = verifier.Checkpoint.from_export(_checkpoint(GOOD, 30))
    state = verifier.WitnessState(30, cp.head_hash, cp.merkle_root)
    keys = [LOG_KEY.public_key()]
    assert verifier.witness_verdict(state, cp, keys, None).decision == "same"
    other = chain.sign_checkpoint(
        LOG_KEY,
        height=30,
        head_hash=os.urandom(32),
        merkle_root_=os.urandom(32),
        signed_at="2026-12-02T00:00:20Z",
        signing_key_id="sk-1",
    )
    verdict = verifier.witness_verdict(state, other, keys, None)
    assert verdict.decision == "fork" and verdict.alarming


def test_a_witness_refuses_a_rollback_a_bad_signature_and_a_bad_proof():
    keys = [LOG_KEY.public_key()]
    c40 = verifier.Checkpoint.from_export(_checkpoint(GOOD, 40))
    c20 = verifier.Checkpoint.from_export(_checkpoint(GOOD, 20))
    state = verifier.WitnessState(40, c40.head_hash, c40.merkle_root)
    assert verifier.witness_verdict(state, c20, keys, None).decision == "rollback"
    stranger = chain.sign_checkpoint(
        Ed25519PrivateKey.generate(),
        height=50,
        head_hash=c40.head_hash,
        merkle_root_=c40.merkle_root,
        signed_at="x",
        signing_key_id="sk-1",
    )
    assert verifier.witness_verdict(state, stranger, keys, []).decision == "bad_signature"
    first = verifier.WitnessState(20, c20.head_hash, c20.merkle_root)
    tiles = tree.TileBuilder(0, {}).extend([e.entry_hash for e in ENTRIES])
    proof = tree.consistency_proof(20, 40, tiles)
    assert verifier.witness_verdict(first, c40, keys, proof).decision == "accept"
    bad = [proof[0][:-1] + bytes([proof[0][-1] ^ 1]), *proof[1:]]
    assert verifier.witness_verdict(first, c40, keys, bad).decision == "fork"
    assert verifier.witness_verdict(None, c40, keys, None).decision == "accept"


def test_a_consistency_line_altered_or_missing_is_caught():
    lines = copy.deepcopy(GOOD)
    i = next(i for i, x in enumerate(lines) if x["type"] == "consistency" and x["second"] == 30)
    lines[i]["proof"][0] = "00" * 32
    result = check(lines)
    assert not result.valid and "not consistent" in (result.reason or "")
    del lines[i]
    result = check(lines)
    assert not result.valid and "no consistency proof" in (result.reason or "")
    assert result.first_bad_height == 29


def test_a_partial_export_links_its_checkpoints_by_consistency_proofs():
    """From a later height the roots cannot be recomputed; the consistency proofs between
    the export's checkpoints still are checked."""
    start = _index(GOOD, 20)
    partial = [{"type": "header", "format": 2, "from_height": 20, "v2_from_height": 0}]
    partial += [x for x in GOOD[start:] if not (x["type"] == "consistency" and x["first"] <= 20)]
    assert check(partial).valid
    forged = copy.deepcopy(partial)
    i = next(i for i, x in enumerate(forged) if x["type"] == "checkpoint" and x["height"] == 40)
    cp = verifier.Checkpoint.from_export(forged[i])
    resigned = chain.sign_checkpoint(
        LOG_KEY,
        height=40,
        head_hash=cp.head_hash,
        merkle_root_=os.urandom(32),  # a root that is not the tree's
        signed_at=cp.signed_at,
        signing_key_id=cp.signing_key_id,
    )
    forged[i] = resigned.to_export()
    result = check(forged)
    assert not result.valid and result.first_bad_height == 39


def test_a_bad_cosignature_of_a_required_witness_is_caught():
    lines = copy.deepcopy(GOOD)
    i = next(i for i, x in enumerate(lines) if x["type"] == "cosignature")
    lines[i]["cosigned_at"] = "2030-01-01T00:00:00Z"  # the signature no longer covers it
    result = check(lines, witness_keys=[WITNESS.public_key()])
    assert not result.valid and "bad cosignature" in (result.reason or "")
    # A witness the auditor does not rely on is not checked.
    assert check(lines).valid


# --------------------------------------------------------------------------- format v2


def test_format_2_frames_the_aad_so_that_a_bar_cannot_shift_fields():
    one = verifier.aad("a|b", "c", "", "k", 1)
    assert one == verifier.aad("a", "b|c", "", "k", 1)  # the ambiguity of v1
    assert verifier.aad("a|b", "c", "", "k") != verifier.aad("a", "b|c", "", "k")
    assert verifier.aad("e", "t", "x", "k") == (
        b"\x00\x00\x00\x01e\x00\x00\x00\x01t\x00\x00\x00\x01x\x00\x00\x00\x01k"
    )
    nonce, ct = chain.seal(DATA_KEY, "k", {"a": 1}, event_id="e", event_type="t", transaction_id="")
    assert chain.open_sealed(DATA_KEY, "k", nonce, ct, event_id="e", event_type="t",
                             transaction_id="") == {"a": 1}  # fmt: skip
    with pytest.raises(InvalidTag):
        chain.open_sealed(
            DATA_KEY, "k", nonce, ct, event_id="e", event_type="t", transaction_id="", fmt=1
        )


def test_canonical_json_is_the_engines():
    value = {"b": [1, {"z": "é", "a": None}], "a": "x/y", "é": True, "A": 2}
    assert verifier.canonical_json(value) == chain._canonical_fast(value)
    assert (
        verifier.canonical_json(value)
        == '{"A":2,"a":"x/y","b":[1,{"a":null,"z":"é"}],"é":true}'.encode()
    )


def test_an_unknown_format_is_refused():
    lines = [{"type": "header", "format": 3}, *GOOD[1:]]
    assert not check(lines).valid


# --------------------------------------------------------------------------- standing alone


def test_the_verifier_imports_only_the_standard_library_and_cryptography():
    source = Path(verifier.__file__).read_text()
    roots = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            roots.add(node.module.split(".")[0])
    assert roots - {"__future__"} <= set(sys.stdlib_module_names) | {"cryptography"}, roots


def test_a_copy_of_the_file_alone_verifies_an_export(tmp_path):
    alone = tmp_path / "verifier.py"
    shutil.copy(verifier.__file__, alone)
    (tmp_path / "ledger.jsonl").write_text("".join(json.dumps(x) + "\n" for x in GOOD))
    (tmp_path / "ledger.pem").write_bytes(
        LOG_KEY.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    (tmp_path / "witness.pem").write_bytes(
        WITNESS.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    args = [sys.executable, "-I", str(alone), str(tmp_path / "ledger.jsonl"),
            "--public-key", str(tmp_path / "ledger.pem"),
            "--witness-key", str(tmp_path / "witness.pem"), "--json"]  # fmt: skip
    done = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["valid"] is True
    pin = f"50:{'ab' * 32}"
    done = subprocess.run([*args, "--pin", pin], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 1 and '"valid": false' in done.stdout
    done = subprocess.run([*args, "--pin", "x"], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 2


def _checkpoint(lines: list[dict], height: int) -> dict:
    return next(x for x in lines if x["type"] == "checkpoint" and x["height"] == height)


def _root(lines: list[dict], height: int) -> bytes:
    return bytes.fromhex(_checkpoint(lines, height)["merkle_root"])
