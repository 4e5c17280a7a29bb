"""The ledger's rules, exactly as SPEC §6 (export format v1). Pure: no database, no web.

Entry hash::

    frame(b)   = uint32_be(len(b)) || b                     (strings as UTF-8)
    entry_hash = SHA-256(prev_hash || uint64_be(height) || frame(event_id) || frame(event_type)
                         || frame(transaction_id) || frame(recorded_at) || frame(key_id)
                         || frame(nonce) || frame(ciphertext))
    prev_hash  = entry_hash of height-1; 32 zero bytes for height 0

An event without a transaction (an auditor read, a DR event) has ``transaction_id`` ``""``:
framed as a zero length, and so in the AAD ``event_id|event_type||key_id``.

Merkle tree over entry hashes as RFC 6962 §2.1 (leaf = SHA-256(0x00 || entry_hash),
node = SHA-256(0x01 || left || right), the empty tree's hash is SHA-256 of nothing).

Checkpoints sign with Ed25519 the canonical JSON (UTF-8, sorted keys, no whitespace) of
``{height, head_hash, merkle_root, signed_at, signing_key_id}``; ``height`` is the number
of entries covered and the two hashes are lowercase hex, as in the export.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

__all__ = [
    "GENESIS_PREV",
    "ChainVerifier",
    "Checkpoint",
    "LedgerEntry",
    "MerkleAccumulator",
    "VerifyResult",
    "aad",
    "build_entry",
    "canonical_json",
    "checkpoint_payload",
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
    "verify_inclusion",
    "verify_lines",
]

GENESIS_PREV = bytes(32)
_U32 = struct.Struct(">I").pack
_U64 = struct.Struct(">Q").pack
_EMPTY_ROOT = hashlib.sha256(b"").digest()


def canonical_json(value: Any) -> bytes:
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)


def frame(value: bytes | str) -> bytes:
    data = value.encode() if isinstance(value, str) else value
    return struct.pack(">I", len(data)) + data


class _Framer:
    """Builds hash inputs, remembering the frames of the values that repeat from entry to
    entry (event types, a batch's ``recorded_at``, key ids): verifying millions of entries
    and appending thousands a second, the per-entry work is what counts."""

    _LIMIT = 4_096

    def __init__(self) -> None:
        self._frames: dict[str, bytes] = {}

    def _frame(self, value: str) -> bytes:
        framed = self._frames.get(value)
        if framed is None:
            if len(self._frames) >= self._LIMIT:
                self._frames.clear()
            framed = self._frames[value] = frame(value)
        return framed

    def hash_input(
        self,
        prev_hash: bytes,
        height: int,
        event_id: str,
        event_type: str,
        transaction_id: str,
        recorded_at: str,
        key_id: str,
        nonce: bytes,
        ciphertext: bytes,
    ) -> bytes:
        e, x = event_id.encode(), transaction_id.encode()
        return b"".join(
            (
                prev_hash,
                _U64(height),
                _U32(len(e)),
                e,
                self._frame(event_type),
                _U32(len(x)),
                x,
                self._frame(recorded_at),
                self._frame(key_id),
                _U32(len(nonce)),
                nonce,
                _U32(len(ciphertext)),
                ciphertext,
            )
        )


_FRAMER = _Framer()
hash_input = _FRAMER.hash_input
"""``prev_hash || uint64_be(height) || frame(event_id) || … || frame(ciphertext)``: the bytes
an entry hash is the SHA-256 of."""


def entry_hash(
    prev_hash: bytes,
    height: int,
    event_id: str,
    event_type: str,
    transaction_id: str,
    recorded_at: str,
    key_id: str,
    nonce: bytes,
    ciphertext: bytes,
) -> bytes:
    return hashlib.sha256(
        hash_input(
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
    ).digest()


def aad(event_id: str, event_type: str, transaction_id: str, key_id: str) -> bytes:
    return f"{event_id}|{event_type}|{transaction_id}|{key_id}".encode()


def seal(
    data_key: bytes | AESGCM,
    key_id: str,
    envelope: dict[str, Any],
    *,
    event_id: str,
    event_type: str,
    transaction_id: str,
) -> tuple[bytes, bytes]:
    """AES-256-GCM of the envelope's canonical JSON; returns (nonce, ciphertext)."""
    nonce = os.urandom(12)
    associated = aad(event_id, event_type, transaction_id, key_id)
    aead = data_key if isinstance(data_key, AESGCM) else AESGCM(data_key)
    return nonce, aead.encrypt(nonce, canonical_json(envelope), associated)


def open_sealed(
    data_key: bytes,
    key_id: str,
    nonce: bytes,
    ciphertext: bytes,
    *,
    event_id: str,
    event_type: str,
    transaction_id: str,
) -> dict[str, Any]:
    associated = aad(event_id, event_type, transaction_id, key_id)
    plain = AESGCM(data_key).decrypt(nonce, ciphertext, associated)
    decoded: dict[str, Any] = orjson.loads(plain)
    return decoded


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


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


# --------------------------------------------------------------------------- Merkle


def leaf_hash(entry: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + entry).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def _split(n: int) -> int:
    """The largest power of two smaller than n (n > 1)."""
    k = 1
    while k << 1 < n:
        k <<= 1
    return k


def _mth(leaves: Sequence[bytes]) -> bytes:
    n = len(leaves)
    if n == 0:
        return _EMPTY_ROOT
    if n == 1:
        return leaves[0]
    k = _split(n)
    return node_hash(_mth(leaves[:k]), _mth(leaves[k:]))


def merkle_root(entry_hashes: Sequence[bytes]) -> bytes:
    return _mth([leaf_hash(h) for h in entry_hashes])


def _path(m: int, leaves: Sequence[bytes]) -> list[bytes]:
    n = len(leaves)
    if n <= 1:
        return []
    k = _split(n)
    if m < k:
        return [*_path(m, leaves[:k]), _mth(leaves[k:])]
    return [*_path(m - k, leaves[k:]), _mth(leaves[:k])]


def inclusion_proof(leaf_index: int, entry_hashes: Sequence[bytes]) -> list[bytes]:
    """RFC 6962 §2.1.1 PATH(m, D[n]) for the tree of ``entry_hashes``."""
    if not 0 <= leaf_index < len(entry_hashes):
        raise ValueError("leaf index outside the tree")
    return _path(leaf_index, [leaf_hash(h) for h in entry_hashes])


def verify_inclusion(
    leaf_index: int, tree_size: int, entry: bytes, audit_path: Sequence[bytes], root: bytes
) -> bool:
    """RFC 9162 §2.1.3.2 (works for RFC 6962 paths)."""
    if not 0 <= leaf_index < tree_size:
        return False
    fn, sn = leaf_index, tree_size - 1
    r = leaf_hash(entry)
    for p in audit_path:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    return sn == 0 and r == root


@dataclass
class MerkleAccumulator:
    """Appends leaves in O(log n) memory and gives the RFC 6962 root at any size.

    ``frontier`` holds the roots of the perfect subtrees that make up the tree, largest
    first (one per set bit of ``size``). It can be stored and resumed.
    """

    size: int = 0
    frontier: list[bytes] = field(default_factory=list)

    def append(self, entry: bytes) -> None:
        self.extend([entry])

    def extend(self, entries: Sequence[bytes]) -> None:
        # Each step adds the largest perfect subtree that fits at the current size (a power
        # of two dividing it), built level by level: far fewer Python steps per leaf than
        # folding leaves one at a time, for the same hashes.
        sha256 = hashlib.sha256
        frontier = self.frontier
        level = [sha256(b"\x00" + entry).digest() for entry in entries]
        done, total = 0, len(level)
        while done < total:
            width = self.size & -self.size or 1 << 62
            while width > total - done:
                width >>= 1
            nodes = level[done : done + width]
            while len(nodes) > 1:
                nodes = [
                    sha256(b"\x01" + left + right).digest()
                    for left, right in zip(nodes[::2], nodes[1::2], strict=True)
                ]
            node = nodes[0]
            blocks = self.size // width
            while blocks & 1:
                node = sha256(b"\x01" + frontier.pop() + node).digest()
                blocks >>= 1
            frontier.append(node)
            self.size += width
            done += width

    def root(self) -> bytes:
        if not self.frontier:
            return _EMPTY_ROOT
        node = self.frontier[-1]
        for left in reversed(self.frontier[:-1]):
            node = node_hash(left, node)
        return node


# --------------------------------------------------------------------------- checkpoints


def checkpoint_payload(
    height: int, head_hash: bytes, merkle_root_: bytes, signed_at: str, signing_key_id: str
) -> bytes:
    return canonical_json(
        {
            "height": height,
            "head_hash": head_hash.hex(),
            "merkle_root": merkle_root_.hex(),
            "signed_at": signed_at,
            "signing_key_id": signing_key_id,
        }
    )


@dataclass(frozen=True)
class Checkpoint:
    height: int
    head_hash: bytes
    merkle_root: bytes
    signed_at: str
    signing_key_id: str
    signature: bytes

    def payload(self) -> bytes:
        return checkpoint_payload(
            self.height, self.head_hash, self.merkle_root, self.signed_at, self.signing_key_id
        )

    def to_export(self) -> dict[str, Any]:
        return {
            "type": "checkpoint",
            "height": self.height,
            "head_hash": self.head_hash.hex(),
            "merkle_root": self.merkle_root.hex(),
            "signed_at": self.signed_at,
            "signing_key_id": self.signing_key_id,
            "signature": _b64(self.signature),
        }

    @classmethod
    def from_export(cls, line: dict[str, Any]) -> Checkpoint:
        return cls(
            height=int(line["height"]),
            head_hash=bytes.fromhex(line["head_hash"]),
            merkle_root=bytes.fromhex(line["merkle_root"]),
            signed_at=str(line["signed_at"]),
            signing_key_id=str(line["signing_key_id"]),
            signature=base64.b64decode(line["signature"], validate=True),
        )


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
    try:
        public_key.verify(checkpoint.signature, checkpoint.payload())
    except InvalidSignature:
        return False
    return True


# --------------------------------------------------------------------------- verification


@dataclass(frozen=True)
class VerifyResult:
    valid: bool
    entries: int
    checkpoints: int
    first_bad_height: int | None = None
    reason: str | None = None
    head_height: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "valid": self.valid,
            "entries": self.entries,
            "checkpoints": self.checkpoints,
            "first_bad_height": self.first_bad_height,
            "reason": self.reason,
        }


@dataclass
class ChainVerifier:
    """Streams entries and checkpoints (in height order) and stops at the first fault.

    It can start from a verified state (``accumulator``, ``prev_hash``, ``next_height``), so
    verification resumes from the last verified checkpoint.
    """

    public_keys: dict[str, Ed25519PublicKey]
    next_height: int = 0
    prev_hash: bytes = GENESIS_PREV
    accumulator: MerkleAccumulator = field(default_factory=MerkleAccumulator)
    trust_first_prev: bool = False
    entries: int = 0
    checkpoints: int = 0
    failure: VerifyResult | None = None

    def _fail(self, height: int, reason: str) -> bool:
        self.failure = VerifyResult(False, self.entries, self.checkpoints, height, reason)
        return False

    def hashed_entry(
        self, height: int, prev_hash: bytes, stored_hash: bytes, content_ok: bool
    ) -> bool:
        """An entry whose hash was already recomputed elsewhere (``content_ok``)."""
        if height != self.next_height:
            return self._fail(
                min(height, self.next_height), f"expected height {self.next_height}, got {height}"
            )
        if self.trust_first_prev and self.entries == 0:
            self.prev_hash = prev_hash
        if prev_hash != self.prev_hash:
            return self._fail(height, "prev_hash does not match the previous entry")
        if not content_ok:
            return self._fail(height, "entry_hash does not match the entry's contents")
        self.accumulator.append(stored_hash)
        self.prev_hash = stored_hash
        self.next_height += 1
        self.entries += 1
        return True

    def hash_inputs(self, rows: Iterable[tuple[bytes, bytes]]) -> bool:
        """Entries as ``(hash input, stored entry_hash)``, the hash input being
        ``prev_hash || uint64_be(height) || frame(event_id) || …`` with a 32-byte
        ``prev_hash``: the same checks as :meth:`hashed_entry`, in one tight loop for long
        runs (verifying millions of entries). The first row that does not simply continue
        the chain goes to :meth:`hashed_entry`, which names the fault."""
        sha256 = hashlib.sha256
        prev, height = self.prev_hash, self.next_height
        run: list[bytes] = []
        for message, stored in rows:
            content_ok = sha256(message).digest() == stored
            if content_ok and message[:40] == prev + _U64(height):
                run.append(stored)
                prev = stored
                height += 1
                continue
            self._accept(run)
            run = []
            row_height = int.from_bytes(message[32:40], "big")
            if not self.hashed_entry(row_height, message[:32], stored, content_ok):
                return False
            prev, height = self.prev_hash, self.next_height
        self._accept(run)
        return True

    def _accept(self, run: list[bytes]) -> None:
        if run:
            self.accumulator.extend(run)
            self.prev_hash = run[-1]
            self.next_height += len(run)
            self.entries += len(run)

    def checkpoint(self, c: Checkpoint) -> bool:
        key = self.public_keys.get(c.signing_key_id)
        if key is None or not verify_checkpoint(key, c):
            return self._fail(max(c.height - 1, 0), f"checkpoint {c.height}: bad signature")
        if c.height != self.next_height:
            # Past the entries: the first one it vouches for that is missing is the fault.
            at = self.next_height if c.height > self.next_height else max(c.height - 1, 0)
            return self._fail(
                at, f"checkpoint {c.height} does not follow entry {self.next_height - 1}"
            )
        if c.head_hash != (self.prev_hash if c.height else GENESIS_PREV):
            return self._fail(c.height - 1, f"checkpoint {c.height}: head_hash mismatch")
        if not self.trust_first_prev and c.merkle_root != self.accumulator.root():
            return self._fail(c.height - 1, f"checkpoint {c.height}: merkle_root mismatch")
        self.checkpoints += 1
        return True

    def result(self) -> VerifyResult:
        if self.failure is not None:
            return self.failure
        return VerifyResult(True, self.entries, self.checkpoints, head_height=self.next_height - 1)


def _export_row(line: dict[str, Any]) -> tuple[bytes, bytes]:
    """An export's entry line as ``(hash input, entry_hash)``."""
    prev = bytes.fromhex(line["prev_hash"])
    if len(prev) != 32:
        raise ValueError("prev_hash is not 32 bytes")
    message = hash_input(
        prev,
        int(line["height"]),
        str(line["event_id"]),
        str(line["event_type"]),
        str(line["transaction_id"]),
        str(line["recorded_at"]),
        str(line["key_id"]),
        binascii.a2b_base64(line["nonce"], strict_mode=True),
        binascii.a2b_base64(line["ciphertext"], strict_mode=True),
    )
    return message, bytes.fromhex(line["entry_hash"])


def verify_lines(
    lines: Iterable[dict[str, Any]],
    public_keys: dict[str, Ed25519PublicKey],
    *,
    require_checkpoint_at_end: bool = False,
) -> VerifyResult:
    """Verify an export (parsed JSON lines). An export from a later height trusts its
    first ``prev_hash`` and can check checkpoint signatures and heads, not roots."""
    verifier: ChainVerifier | None = None
    run: list[tuple[bytes, bytes]] = []  # entry lines not checked yet
    for line in lines:
        kind = line.get("type")
        if verifier is None:
            first_height = int(line.get("height", 0)) if kind == "entry" else 0
            verifier = ChainVerifier(
                public_keys, next_height=first_height, trust_first_prev=first_height > 0
            )
        if kind == "entry":
            try:
                run.append(_export_row(line))
            except (KeyError, ValueError, TypeError) as exc:
                if verifier.hash_inputs(run):
                    verifier._fail(verifier.next_height, f"malformed line: {exc!r}")
                return verifier.result()
            if len(run) < 1024:
                continue
        ok = verifier.hash_inputs(run)
        run = []
        if ok and kind == "checkpoint":
            try:
                ok = verifier.checkpoint(Checkpoint.from_export(line))
            except (KeyError, ValueError, TypeError) as exc:
                ok = verifier._fail(max(verifier.next_height - 1, 0), f"malformed line: {exc!r}")
        elif ok and kind != "entry":
            ok = verifier._fail(verifier.next_height, f"unknown line type {kind!r}")
        if not ok:
            return verifier.result()
    if verifier is None:
        return VerifyResult(True, 0, 0)
    if not verifier.hash_inputs(run):
        return verifier.result()
    if require_checkpoint_at_end and verifier.checkpoints == 0 and verifier.entries:
        return VerifyResult(False, verifier.entries, 0, verifier.next_height - 1, "no checkpoint")
    return verifier.result()
