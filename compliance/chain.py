"""The ledger's writing side (SPEC §6): sealing entries, chaining them, signing
checkpoints. Pure: no database, no web.

The rules an auditor checks (hashes, Merkle trees and proofs, canonical JSON, checkpoint
and cosignature payloads, export verification) live in :mod:`compliance.verifier`, which
imports only the standard library and ``cryptography`` so that it can be copied alone;
this module re-exports them for the engine.

Sealing: AES-256-GCM over the canonical JSON of the whole envelope, with the AAD of
:func:`compliance.verifier.aad` (format 2 framed; format 1 ``|``-joined for entries below
the ledger's ``v2_from`` height). An event without a transaction (an auditor read, a DR
event) has ``transaction_id`` ``""``.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import orjson
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from compliance.tree import reference_inclusion_proof as inclusion_proof
from compliance.verifier import (
    EMPTY_ROOT,
    GENESIS_PREV,
    ChainVerifier,
    Checkpoint,
    Cosignature,
    MerkleAccumulator,
    VerifyResult,
    _b64,
    aad,
    canonical_json,
    checkpoint_payload,
    cosignature_payload,
    entry_hash,
    frame,
    hash_input,
    leaf_hash,
    merkle_root,
    node_hash,
    verify_consistency,
    verify_export,
    verify_inclusion,
    witness_key_id,
)

__all__ = [
    "EMPTY_ROOT",
    "GENESIS_PREV",
    "ChainVerifier",
    "Checkpoint",
    "Cosignature",
    "LedgerEntry",
    "MerkleAccumulator",
    "VerifyResult",
    "aad",
    "build_entry",
    "canonical_json",
    "checkpoint_payload",
    "cosignature_payload",
    "entry_hash",
    "frame",
    "hash_input",
    "inclusion_proof",
    "leaf_hash",
    "merkle_root",
    "node_hash",
    "open_sealed",
    "seal",
    "sign_checkpoint",
    "verify_checkpoint",
    "verify_consistency",
    "verify_export",
    "verify_inclusion",
    "verify_lines",
    "witness_key_id",
]


def _canonical_fast(value: Any) -> bytes:
    """Canonical JSON of an envelope (keys sorted by code point, no whitespace, UTF-8) by
    orjson: the hot path of every append."""
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)


def seal(
    data_key: bytes | AESGCM,
    key_id: str,
    envelope: dict[str, Any],
    *,
    event_id: str,
    event_type: str,
    transaction_id: str,
    fmt: int = 2,
) -> tuple[bytes, bytes]:
    """AES-256-GCM of the envelope's canonical JSON; returns (nonce, ciphertext)."""
    nonce = os.urandom(12)
    associated = aad(event_id, event_type, transaction_id, key_id, fmt)
    aead = data_key if isinstance(data_key, AESGCM) else AESGCM(data_key)
    return nonce, aead.encrypt(nonce, _canonical_fast(envelope), associated)


def open_sealed(
    data_key: bytes,
    key_id: str,
    nonce: bytes,
    ciphertext: bytes,
    *,
    event_id: str,
    event_type: str,
    transaction_id: str,
    fmt: int = 2,
) -> dict[str, Any]:
    associated = aad(event_id, event_type, transaction_id, key_id, fmt)
    plain = AESGCM(data_key).decrypt(nonce, ciphertext, associated)
    decoded: dict[str, Any] = orjson.loads(plain)
    return decoded


@dataclass(frozen=True)
class LedgerEntry:
    height: int
    event_id: str
    event_type: str
    transaction_id: str
    recorded_at: str
    key_id: str
    nonce: bytes
    ciphertext: bytes
    prev_hash: bytes
    entry_hash: bytes

    def to_export(self) -> dict[str, Any]:
        return {
            "type": "entry",
            "height": self.height,
            "event_id": self.event_id,
            "event_type": self.event_type,
            "transaction_id": self.transaction_id,
            "recorded_at": self.recorded_at,
            "key_id": self.key_id,
            "nonce": _b64(self.nonce),
            "ciphertext": _b64(self.ciphertext),
            "prev_hash": self.prev_hash.hex(),
            "entry_hash": self.entry_hash.hex(),
        }

    @classmethod
    def from_export(cls, line: dict[str, Any]) -> LedgerEntry:
        return cls(
            height=int(line["height"]),
            event_id=str(line["event_id"]),
            event_type=str(line["event_type"]),
            transaction_id=str(line["transaction_id"]),
            recorded_at=str(line["recorded_at"]),
            key_id=str(line["key_id"]),
            nonce=base64.b64decode(line["nonce"], validate=True),
            ciphertext=base64.b64decode(line["ciphertext"], validate=True),
            prev_hash=bytes.fromhex(line["prev_hash"]),
            entry_hash=bytes.fromhex(line["entry_hash"]),
        )


def build_entry(
    prev_hash: bytes,
    height: int,
    *,
    event_id: str,
    event_type: str,
    transaction_id: str,
    recorded_at: str,
    key_id: str,
    nonce: bytes,
    ciphertext: bytes,
) -> LedgerEntry:
    digest = entry_hash(
        prev_hash,
        height,
        event_id,
        event_type,
        transaction_id,
        recorded_at,
        key_id,
        nonce,
        ciphertext,
    )
    return LedgerEntry(
        height,
        event_id,
        event_type,
        transaction_id,
        recorded_at,
        key_id,
        nonce,
        ciphertext,
        prev_hash,
        digest,
    )


# --------------------------------------------------------------------------- checkpoints


def sign_checkpoint(
    key: Ed25519PrivateKey,
    *,
    height: int,
    head_hash: bytes,
    merkle_root_: bytes,
    signed_at: str,
    signing_key_id: str,
) -> Checkpoint:
    payload = checkpoint_payload(height, head_hash, merkle_root_, signed_at, signing_key_id)
    return Checkpoint(height, head_hash, merkle_root_, signed_at, signing_key_id, key.sign(payload))


def verify_checkpoint(public_key: Ed25519PublicKey, checkpoint: Checkpoint) -> bool:
    return checkpoint.signed_by(public_key)


def cosign(
    key: Ed25519PrivateKey, checkpoint: Checkpoint, *, witness_key_id_: str, cosigned_at: str
) -> Cosignature:
    """A witness's cosignature of ``checkpoint`` (SPEC §6)."""
    payload = cosignature_payload(
        checkpoint.height,
        checkpoint.head_hash,
        checkpoint.merkle_root,
        witness_key_id_,
        cosigned_at,
    )
    return Cosignature(checkpoint.height, witness_key_id_, cosigned_at, key.sign(payload))


def verify_lines(
    lines: Iterable[dict[str, Any]],
    public_keys: dict[str, Ed25519PublicKey],
    *,
    require_checkpoint_at_end: bool = False,
) -> VerifyResult:
    """Verify an export (parsed JSON lines) with the engine's keys by id."""
    return verify_export(lines, public_keys, require_checkpoint_at_end=require_checkpoint_at_end)
