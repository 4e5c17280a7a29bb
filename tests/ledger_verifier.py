"""An auditor's verifier for upi-engine ledger exports, written only from SPEC §6.

It imports nothing from the engine: only the standard library and ``cryptography`` (for
Ed25519). Usage: ``python tests/ledger_verifier.py EXPORT.jsonl PUBLIC_KEY.pem``; exit 0
when the export verifies, 1 (with the first bad height) when it does not.
"""

from __future__ import annotations

import base64
import hashlib
import json
import struct
import sys
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import load_pem_public_key


def _frame(b: bytes) -> bytes:
    return struct.pack(">I", len(b)) + b


def _entry_hash(line: dict) -> bytes:
    parts = [
        line["event_id"].encode("utf-8"),
        line["event_type"].encode("utf-8"),
        line["transaction_id"].encode("utf-8"),
        line["recorded_at"].encode("utf-8"),
        line["key_id"].encode("utf-8"),
        base64.b64decode(line["nonce"]),
        base64.b64decode(line["ciphertext"]),
    ]
    data = bytes.fromhex(line["prev_hash"]) + struct.pack(">Q", line["height"])
    data += b"".join(_frame(p) for p in parts)
    return hashlib.sha256(data).digest()


def _tree_hash(leaves: list[bytes]) -> bytes:
    """RFC 6962 MTH over already-hashed leaves."""
    if not leaves:
        return hashlib.sha256(b"").digest()
    if len(leaves) == 1:
        return leaves[0]
    k = 1
    while k * 2 < len(leaves):
        k *= 2
    return hashlib.sha256(b"\x01" + _tree_hash(leaves[:k]) + _tree_hash(leaves[k:])).digest()


def _subproof(m: int, leaves: list[bytes], whole: bool) -> list[bytes]:
    """RFC 9162 §2.1.4.1 SUBPROOF(m, D[n], b), from its definition."""
    n = len(leaves)
    if m == n:
        return [] if whole else [_tree_hash(leaves)]
    k = 1
    while k * 2 < n:
        k *= 2
    if m <= k:
        return [*_subproof(m, leaves[:k], whole), _tree_hash(leaves[k:])]
    return [*_subproof(m - k, leaves[k:], False), _tree_hash(leaves[:k])]


def verify(lines: list[dict], public_key: Ed25519PublicKey) -> tuple[bool, int | None, str]:
    leaves: list[bytes] = []
    prev = b"\x00" * 32
    expected_height = 0
    checkpoints: set[int] = set()
    for number, line in enumerate(lines):
        if line["type"] == "header" and number == 0:
            if line["format"] != 2:
                return False, 0, "unknown format"
        elif line["type"] == "cosignature":
            pass  # a witness's: checked only against witness keys, which this one lacks
        elif line["type"] == "consistency":
            # The proof must be the one the definition gives over the entries seen.
            first, second = line["first"], line["second"]
            if first not in checkpoints or second not in checkpoints:
                return False, max(second - 1, 0), "consistency proof between unknown checkpoints"
            expected = [h.hex() for h in _subproof(first, leaves[:second], True)]
            if line["proof"] != expected:
                return False, second - 1, "consistency proof wrong"
        elif line["type"] == "entry":
            h = line["height"]
            if h != expected_height:
                return False, min(h, expected_height), "height out of sequence"
            if bytes.fromhex(line["prev_hash"]) != prev:
                return False, h, "prev_hash breaks the chain"
            digest = _entry_hash(line)
            if digest.hex() != line["entry_hash"]:
                return False, h, "entry_hash wrong"
            leaves.append(hashlib.sha256(b"\x00" + digest).digest())
            prev = digest
            expected_height += 1
        elif line["type"] == "checkpoint":
            payload = json.dumps(
                {
                    k: line[k]
                    for k in ("height", "head_hash", "merkle_root", "signed_at", "signing_key_id")
                },
                sort_keys=True,
                separators=(",", ":"),
                ensure_ascii=False,
            ).encode("utf-8")
            bad_at = max(line["height"] - 1, 0)
            try:
                public_key.verify(base64.b64decode(line["signature"]), payload)
            except InvalidSignature:
                return False, bad_at, "checkpoint signature invalid"
            if line["height"] > len(leaves):
                return False, len(leaves), "entries the checkpoint covers are missing"
            if line["height"] != len(leaves):
                return False, bad_at, "checkpoint height does not match the entries before it"
            if line["head_hash"] != prev.hex():
                return False, bad_at, "checkpoint head_hash wrong"
            if line["merkle_root"] != _tree_hash(leaves).hex():
                return False, bad_at, "checkpoint merkle_root wrong"
            checkpoints.add(line["height"])
        else:
            return False, expected_height, "unknown line"
    return True, None, "ok"


def verify_file(export: Path, public_key_pem: bytes) -> tuple[bool, int | None, str]:
    key = load_pem_public_key(public_key_pem)
    assert isinstance(key, Ed25519PublicKey)
    lines = [json.loads(raw) for raw in export.read_text("utf-8").splitlines() if raw.strip()]
    return verify(lines, key)


if __name__ == "__main__":
    ok, height, reason = verify_file(Path(sys.argv[1]), Path(sys.argv[2]).read_bytes())
    print("valid" if ok else f"INVALID at height {height}: {reason}")
    sys.exit(0 if ok else 1)
