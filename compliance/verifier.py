"""The auditor's verifier of the compliance ledger (SPEC §6, export formats v1 and v2).

This one file holds every rule an auditor checks, and it imports only Python's standard
library and ``cryptography``: copy it alone and run it, with no engine, database or key
but the public ones::

    python verifier.py ledger.jsonl --public-key ledger.pem \\
        [--pin HEIGHT:HEAD_HASH]… [--witness-key witness.pem]… [--json]

Exit 0 when the export is valid, 1 when a check fails (the first failure names its height),
2 on bad usage. The engine uses the same code (``upi-engine ledger verify-export``, and its
own ``ledger verify`` on the database).

The engine's modules import its primitives (compliance/chain.py, compliance/tree.py), never
the other way round, since it must run alone. Its checks over an export therefore repeat,
on purpose, those that ``ledger verify`` makes on the database (compliance/ledger.py).

The rules, in short:

* ``frame(b) = uint32_be(len(b)) || b`` (strings as UTF-8);
  ``entry_hash = SHA-256(prev_hash || uint64_be(height) || frame(event_id) ||
  frame(event_type) || frame(transaction_id) || frame(recorded_at) || frame(key_id) ||
  frame(nonce) || frame(ciphertext))``; ``prev_hash`` of height 0 is 32 zero bytes.
* The Merkle tree over entry hashes is RFC 6962 §2.1 (leaf = SHA-256(0x00 || entry_hash),
  node = SHA-256(0x01 || left || right)); inclusion proofs are RFC 6962 §2.1.1 audit
  paths, consistency proofs RFC 9162 §2.1.4.
* Canonical JSON: UTF-8, keys sorted by code point at every level, no whitespace.
* A checkpoint signs (Ed25519) the canonical JSON of ``{height, head_hash, merkle_root,
  signed_at, signing_key_id}``; a witness cosigns (Ed25519) the canonical JSON of
  ``{height, head_hash, merkle_root, witness_key_id, cosigned_at}``. A witness key's id is
  ``wk-`` and the first 16 hex digits of the SHA-256 of its raw 32-byte public key.
* The AAD of an entry's AES-256-GCM seal is, in format 2, ``frame(event_id) ||
  frame(event_type) || frame(transaction_id) || frame(key_id)``; in format 1 (entries
  below the header's ``v2_from_height``) the UTF-8 of ``event_id|event_type|
  transaction_id|key_id``. The AAD matters only to whoever decrypts; hashes and
  signatures cover the ciphertext as it is.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import hashlib
import json
import struct
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

__all__ = [
    "EMPTY_ROOT",
    "GENESIS_PREV",
    "ChainVerifier",
    "Checkpoint",
    "Cosignature",
    "MerkleAccumulator",
    "VerifyResult",
    "WitnessState",
    "WitnessVerdict",
    "aad",
    "canonical_json",
    "checkpoint_payload",
    "cosignature_payload",
    "entry_hash",
    "frame",
    "hash_input",
    "leaf_hash",
    "load_public_key",
    "merkle_root",
    "node_hash",
    "parse_pin",
    "verify_consistency",
    "verify_export",
    "verify_inclusion",
    "witness_key_id",
    "witness_verdict",
]

GENESIS_PREV = bytes(32)
EMPTY_ROOT = hashlib.sha256(b"").digest()
_U32 = struct.Struct(">I").pack
_U64 = struct.Struct(">Q").pack


# --------------------------------------------------------------------------- encodings


def canonical_json(value: Any) -> bytes:
    """UTF-8, keys sorted by code point at every level, no whitespace."""
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode()


def frame(value: bytes | str) -> bytes:
    data = value.encode() if isinstance(value, str) else value
    return _U32(len(data)) + data


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(text: str) -> bytes:
    return binascii.a2b_base64(text, strict_mode=True)


def aad(event_id: str, event_type: str, transaction_id: str, key_id: str, fmt: int = 2) -> bytes:
    """The associated data an entry's payload is sealed with, in export format ``fmt``."""
    if fmt == 1:
        return f"{event_id}|{event_type}|{transaction_id}|{key_id}".encode()
    return b"".join(frame(v) for v in (event_id, event_type, transaction_id, key_id))


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


hash_input = _Framer().hash_input
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
    message = hash_input(
        prev_hash, height, event_id, event_type, transaction_id, recorded_at, key_id, nonce,
        ciphertext,
    )  # fmt: skip
    return hashlib.sha256(message).digest()


# --------------------------------------------------------------------------- Merkle


def leaf_hash(entry: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + entry).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def _split(n: int) -> int:
    """The largest power of two smaller than n (n > 1)."""
    return 1 << ((n - 1).bit_length() - 1)


def _mth(leaves: Sequence[bytes]) -> bytes:
    n = len(leaves)
    if n == 0:
        return EMPTY_ROOT
    if n == 1:
        return leaves[0]
    k = _split(n)
    return node_hash(_mth(leaves[:k]), _mth(leaves[k:]))


def merkle_root(entry_hashes: Sequence[bytes]) -> bytes:
    """RFC 6962 MTH over the entry hashes (the reference definition; O(n) memory)."""
    return _mth([leaf_hash(h) for h in entry_hashes])


def verify_inclusion(
    leaf_index: int, tree_size: int, entry: bytes, audit_path: Sequence[bytes], root: bytes
) -> bool:
    """RFC 9162 §2.1.3.2: ``audit_path`` proves entry hash ``entry`` at ``leaf_index`` in the
    tree of ``tree_size`` whose root is ``root``."""
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


def verify_consistency(
    first: int, second: int, first_root: bytes, second_root: bytes, proof: Sequence[bytes]
) -> bool:
    """RFC 9162 §2.1.4.2: ``proof`` shows that the tree of ``second`` entries (root
    ``second_root``) extends the tree of ``first`` entries (root ``first_root``)."""
    if not 0 <= first <= second:
        return False
    if first == second:
        return not proof and first_root == second_root
    if first == 0:
        return not proof
    if not proof:
        return False
    path = list(proof)
    if first & (first - 1) == 0:  # an exact power of two: its root is a node of both trees
        path.insert(0, first_root)
    fn, sn = first - 1, second - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    return sn == 0 and fr == first_root and sr == second_root


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
        """Append entry hashes (their leaf hashes are computed here)."""
        self.extend_leaves([hashlib.sha256(b"\x00" + entry).digest() for entry in entries])

    def extend_leaves(
        self,
        level: Sequence[bytes],
        on_node: Callable[[int, int, bytes], None] | None = None,
    ) -> None:
        """Append leaf hashes. ``on_node(level, index, hash)`` hears of every node made
        whose level is a positive multiple of 8 (the bottom rows of a tiled tree's upper
        tiles), in index order for each level."""
        # Each step adds the largest perfect subtree that fits at the current size (a power
        # of two dividing it), built level by level: far fewer Python steps per leaf than
        # folding leaves one at a time, for the same hashes.
        sha256 = hashlib.sha256
        frontier = self.frontier
        done, total = 0, len(level)
        while done < total:
            width = self.size & -self.size or 1 << 62
            while width > total - done:
                width >>= 1
            start = self.size
            nodes = level[done : done + width]
            height = 0
            while len(nodes) > 1:
                nodes = [
                    sha256(b"\x01" + left + right).digest()
                    for left, right in zip(nodes[::2], nodes[1::2], strict=True)
                ]
                height += 1
                if on_node is not None and height % 8 == 0:
                    for j, made in enumerate(nodes):
                        on_node(height, (start >> height) + j, made)
            node = nodes[0]
            blocks = self.size // width
            while blocks & 1:
                node = sha256(b"\x01" + frontier.pop() + node).digest()
                blocks >>= 1
                height += 1
                if on_node is not None and height % 8 == 0:
                    on_node(height, start >> height, node)
            frontier.append(node)
            self.size += width
            done += width

    def root(self) -> bytes:
        if not self.frontier:
            return EMPTY_ROOT
        node = self.frontier[-1]
        for left in reversed(self.frontier[:-1]):
            node = node_hash(left, node)
        return node


# --------------------------------------------------------------------------- signatures


def load_public_key(pem: bytes) -> Ed25519PublicKey:
    key = serialization.load_pem_public_key(pem)
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError("not an Ed25519 public key")
    return key


def _raw(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def witness_key_id(key: Ed25519PublicKey) -> str:
    return "wk-" + hashlib.sha256(_raw(key)).hexdigest()[:16]


def _signed_by(key: Ed25519PublicKey, signature: bytes, payload: bytes) -> bool:
    try:
        key.verify(signature, payload)
    except InvalidSignature:
        return False
    return True


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


def cosignature_payload(
    height: int, head_hash: bytes, merkle_root_: bytes, witness_key_id_: str, cosigned_at: str
) -> bytes:
    return canonical_json(
        {
            "height": height,
            "head_hash": head_hash.hex(),
            "merkle_root": merkle_root_.hex(),
            "witness_key_id": witness_key_id_,
            "cosigned_at": cosigned_at,
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

    def signed_by(self, key: Ed25519PublicKey) -> bool:
        return _signed_by(key, self.signature, self.payload())

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
            signature=_unb64(line["signature"]),
        )


@dataclass(frozen=True)
class Cosignature:
    height: int
    witness_key_id: str
    cosigned_at: str
    signature: bytes

    def valid_for(self, checkpoint: Checkpoint, key: Ed25519PublicKey) -> bool:
        payload = cosignature_payload(
            checkpoint.height,
            checkpoint.head_hash,
            checkpoint.merkle_root,
            self.witness_key_id,
            self.cosigned_at,
        )
        return self.height == checkpoint.height and _signed_by(key, self.signature, payload)

    def to_export(self) -> dict[str, Any]:
        return {
            "type": "cosignature",
            "height": self.height,
            "witness_key_id": self.witness_key_id,
            "cosigned_at": self.cosigned_at,
            "signature": _b64(self.signature),
        }

    @classmethod
    def from_export(cls, line: dict[str, Any]) -> Cosignature:
        return cls(
            height=int(line["height"]),
            witness_key_id=str(line["witness_key_id"]),
            cosigned_at=str(line["cosigned_at"]),
            signature=_unb64(line["signature"]),
        )


# --------------------------------------------------------------------------- the chain


@dataclass(frozen=True)
class VerifyResult:
    valid: bool
    entries: int
    checkpoints: int
    first_bad_height: int | None = None
    reason: str | None = None
    head_height: int | None = None
    witnessed: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "valid": self.valid,
            "entries": self.entries,
            "checkpoints": self.checkpoints,
            "first_bad_height": self.first_bad_height,
            "reason": self.reason,
        }
        if self.witnessed:
            out["witnessed"] = dict(self.witnessed)
        return out


@dataclass
class ChainVerifier:
    """Streams entries and checkpoints (in height order) and stops at the first fault.

    It can start from a verified state (``accumulator``, ``prev_hash``, ``next_height``), so
    verification resumes from the last verified checkpoint. ``public_keys`` maps signing
    key ids to keys; a key in ``any_of`` (an auditor's PEM files, without the engine's key
    ids) verifies a checkpoint of any key id.
    """

    public_keys: dict[str, Ed25519PublicKey]
    any_of: list[Ed25519PublicKey] = field(default_factory=list)
    # Each accepted run's leaf hashes, and the nodes of levels 8, 16, … the tree makes of
    # them (a stored tree can be checked against both without hashing anything again).
    on_leaves: Callable[[list[bytes]], None] | None = None
    on_node: Callable[[int, int, bytes], None] | None = None
    next_height: int = 0
    prev_hash: bytes = GENESIS_PREV
    accumulator: MerkleAccumulator = field(default_factory=MerkleAccumulator)
    trust_first_prev: bool = False
    entries: int = 0
    checkpoints: int = 0
    failure: VerifyResult | None = None

    def fail(self, height: int, reason: str) -> bool:
        self.failure = VerifyResult(False, self.entries, self.checkpoints, height, reason)
        return False

    def hashed_entry(
        self, height: int, prev_hash: bytes, stored_hash: bytes, content_ok: bool
    ) -> bool:
        """An entry whose hash was already recomputed elsewhere (``content_ok``)."""
        if height != self.next_height:
            return self.fail(
                min(height, self.next_height), f"expected height {self.next_height}, got {height}"
            )
        if self.trust_first_prev and self.entries == 0:
            self.prev_hash = prev_hash
        if prev_hash != self.prev_hash:
            return self.fail(height, "prev_hash does not match the previous entry")
        if not content_ok:
            return self.fail(height, "entry_hash does not match the entry's contents")
        self._accept([stored_hash])
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
            sha256 = hashlib.sha256
            leaves = [sha256(b"\x00" + h).digest() for h in run]
            if self.on_leaves is not None:
                self.on_leaves(leaves)
            self.accumulator.extend_leaves(leaves, self.on_node)
            self.prev_hash = run[-1]
            self.next_height += len(run)
            self.entries += len(run)

    def _signed(self, c: Checkpoint) -> bool:
        key = self.public_keys.get(c.signing_key_id)
        if key is not None and c.signed_by(key):
            return True
        return any(c.signed_by(k) for k in self.any_of)

    def checkpoint(self, c: Checkpoint) -> bool:
        if not self._signed(c):
            return self.fail(max(c.height - 1, 0), f"checkpoint {c.height}: bad signature")
        if c.height != self.next_height:
            # Past the entries: the first one it vouches for that is missing is the fault.
            at = self.next_height if c.height > self.next_height else max(c.height - 1, 0)
            return self.fail(
                at, f"checkpoint {c.height} does not follow entry {self.next_height - 1}"
            )
        if c.head_hash != (self.prev_hash if c.height else GENESIS_PREV):
            return self.fail(c.height - 1, f"checkpoint {c.height}: head_hash mismatch")
        if not self.trust_first_prev and c.merkle_root != self.accumulator.root():
            return self.fail(c.height - 1, f"checkpoint {c.height}: merkle_root mismatch")
        self.checkpoints += 1
        return True

    def result(self) -> VerifyResult:
        if self.failure is not None:
            return self.failure
        return VerifyResult(True, self.entries, self.checkpoints, head_height=self.next_height - 1)


# --------------------------------------------------------------------------- exports


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
        _unb64(line["nonce"]),
        _unb64(line["ciphertext"]),
    )
    return message, bytes.fromhex(line["entry_hash"])


@dataclass
class _Export:
    """What :func:`verify_export` learns beside the chain: checkpoints by height, the
    consistency proofs between them, cosignatures."""

    chain: ChainVerifier
    witness_keys: dict[str, Ed25519PublicKey]
    pins: dict[int, bytes]
    fmt: int = 1
    checkpoints: dict[int, Checkpoint] = field(default_factory=dict)
    last_checkpoint: Checkpoint | None = None
    linked: bool = True  # the last checkpoint has its consistency proof (or is the first)
    witnessed: dict[str, int] = field(default_factory=dict)

    def fail(self, height: int, reason: str) -> bool:
        return self.chain.fail(height, reason)

    def checkpoint(self, c: Checkpoint) -> bool:
        if not self.chain.checkpoint(c):
            return False
        if not self.linked and self.last_checkpoint is not None:
            return self._unlinked()
        pinned = self.pins.get(c.height)
        if pinned is not None and pinned != c.head_hash:
            return self.fail(
                c.height - 1, f"checkpoint {c.height} differs from the pinned one (a fork)"
            )
        self.linked = self.last_checkpoint is None or self.fmt == 1
        self.last_checkpoint = c
        self.checkpoints[c.height] = c
        return True

    def _unlinked(self) -> bool:
        last = self.last_checkpoint
        assert last is not None
        return self.fail(last.height - 1, f"checkpoint {last.height}: no consistency proof")

    def consistency(self, line: dict[str, Any]) -> bool:
        first, second = int(line["first"]), int(line["second"])
        proof = [bytes.fromhex(p) for p in line["proof"]]
        a, b = self.checkpoints.get(first), self.checkpoints.get(second)
        if a is None or b is None:
            return self.fail(
                max(second - 1, 0), f"consistency {first}→{second}: checkpoint not in the export"
            )
        if not verify_consistency(first, second, a.merkle_root, b.merkle_root, proof):
            return self.fail(second - 1, f"checkpoint {second} is not consistent with {first}")
        if self.last_checkpoint is b:
            self.linked = True
        return True

    def cosignature(self, line: dict[str, Any]) -> bool:
        cosig = Cosignature.from_export(line)
        key = self.witness_keys.get(cosig.witness_key_id)
        if key is None:
            return True  # a witness this auditor does not rely on
        c = self.checkpoints.get(cosig.height)
        if c is None:
            return self.fail(cosig.height, f"cosignature for checkpoint {cosig.height}: not found")
        if not cosig.valid_for(c, key):
            return self.fail(
                max(cosig.height - 1, 0),
                f"checkpoint {cosig.height}: bad cosignature of {cosig.witness_key_id}",
            )
        self.witnessed[cosig.witness_key_id] = max(
            self.witnessed.get(cosig.witness_key_id, 0), cosig.height
        )
        return True

    def finish(self) -> VerifyResult:
        result = self.chain.result()
        if not result.valid:
            return result
        if not self.linked:
            self._unlinked()
            return self.chain.result()
        top = self.chain.next_height  # entries 0..top-1 were seen
        first = top - self.chain.entries
        for height in sorted(self.pins):
            if height > top:
                self.fail(
                    top, f"the export ends at height {top}, below the pinned checkpoint {height}"
                )
                return self.chain.result()
            if height <= first:
                self.fail(first, f"the pinned checkpoint {height} is below the export's start")
                return self.chain.result()
        for key_id in self.witness_keys:
            if key_id not in self.witnessed:
                self.fail(max(top - 1, 0), f"no cosignature from the required witness {key_id}")
                return self.chain.result()
        return VerifyResult(
            True,
            result.entries,
            result.checkpoints,
            head_height=result.head_height,
            witnessed=dict(self.witnessed),
        )


def verify_export(
    lines: Iterable[dict[str, Any]],
    public_keys: dict[str, Ed25519PublicKey] | Sequence[Ed25519PublicKey],
    *,
    pins: dict[int, bytes] | None = None,
    witness_keys: Sequence[Ed25519PublicKey] = (),
    require_checkpoint_at_end: bool = False,
) -> VerifyResult:
    """Verify an export (parsed JSON lines) without the engine.

    ``public_keys``: the checkpoint keys, by ``signing_key_id`` or as a list (any of them may
    sign any checkpoint). ``pins``: ``{height: head_hash}`` of checkpoints the auditor holds;
    the export must reach each, with the same head. ``witness_keys``: witnesses whose
    cosignature the auditor requires (at least one valid cosignature each).

    An export from a later height trusts its first ``prev_hash`` and can check checkpoint
    signatures, heads and consistency proofs, not roots.
    """
    by_id, any_of = (
        (dict(public_keys), []) if isinstance(public_keys, dict) else ({}, list(public_keys))
    )
    export: _Export | None = None
    pins = dict(pins or {})
    pinned_entries = {h - 1: head for h, head in pins.items() if h > 0}
    run: list[tuple[bytes, bytes]] = []  # entry lines not checked yet
    fmt = 1
    for number, line in enumerate(lines):
        kind = line.get("type")
        if number == 0 and kind == "header":
            fmt = int(line.get("format", 1))
            if fmt not in (1, 2):
                return VerifyResult(False, 0, 0, 0, f"unknown export format {fmt}")
            continue
        if export is None:
            first_height = int(line.get("height", 0)) if kind == "entry" else 0
            chain = ChainVerifier(
                by_id, any_of, next_height=first_height, trust_first_prev=first_height > 0
            )
            export = _Export(chain, {witness_key_id(k): k for k in witness_keys}, pins, fmt=fmt)
        chain = export.chain
        if kind == "entry":
            try:
                row = _export_row(line)
            except (KeyError, ValueError, TypeError) as exc:
                if chain.hash_inputs(run):
                    chain.fail(chain.next_height, f"malformed line: {exc!r}")
                return chain.result()
            run.append(row)
            height = int(line["height"])
            if (
                height in pinned_entries
                and bytes.fromhex(line["entry_hash"]) != pinned_entries[height]
            ):
                if not chain.hash_inputs(run):
                    return chain.result()
                chain.fail(height, f"entry {height} differs from the pinned head (a fork)")
                return chain.result()
            if len(run) < 1024:
                continue
        ok = chain.hash_inputs(run)
        run = []
        if not ok:
            return chain.result()
        try:
            if kind == "checkpoint":
                ok = export.checkpoint(Checkpoint.from_export(line))
            elif kind == "consistency":
                ok = export.consistency(line)
            elif kind == "cosignature":
                ok = export.cosignature(line)
            elif kind != "entry":
                ok = export.fail(chain.next_height, f"unknown line type {kind!r}")
        except (KeyError, ValueError, TypeError) as exc:
            ok = export.fail(max(chain.next_height - 1, 0), f"malformed line: {exc!r}")
        if not ok:
            return chain.result()
    if export is None:
        if pins and max(pins) > 0:
            return VerifyResult(False, 0, 0, 0, "the export is empty, below a pinned checkpoint")
        return VerifyResult(True, 0, 0)
    if not export.chain.hash_inputs(run):
        return export.chain.result()
    chain = export.chain
    if require_checkpoint_at_end and chain.checkpoints == 0 and chain.entries:
        return VerifyResult(False, chain.entries, 0, chain.next_height - 1, "no checkpoint")
    return export.finish()


def read_export(path: Path) -> Iterator[dict[str, Any]]:
    """The lines of an export file; ValueError names a line that is not a JSON object."""
    with path.open("rb") as f:
        for number, raw in enumerate(f, 1):
            if raw.strip():
                line = json.loads(raw)
                if not isinstance(line, dict):
                    raise ValueError(f"line {number} is not a JSON object")
                yield line


# --------------------------------------------------------------------------- witnesses


@dataclass(frozen=True)
class WitnessState:
    """The last checkpoint a witness accepted (what it keeps in its state file)."""

    height: int
    head_hash: bytes
    merkle_root: bytes

    def to_json(self) -> dict[str, Any]:
        return {
            "height": self.height,
            "head_hash": self.head_hash.hex(),
            "merkle_root": self.merkle_root.hex(),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> WitnessState:
        return cls(
            int(data["height"]),
            bytes.fromhex(data["head_hash"]),
            bytes.fromhex(data["merkle_root"]),
        )


@dataclass(frozen=True)
class WitnessVerdict:
    """``accept`` (cosign and move the state on), ``same`` (nothing new), or a refusal:
    ``bad_signature``, ``rollback``, ``fork`` (which the witness alerts on)."""

    decision: str
    reason: str

    @property
    def accepted(self) -> bool:
        return self.decision == "accept"

    @property
    def alarming(self) -> bool:
        return self.decision in ("rollback", "fork", "bad_signature")


def witness_verdict(
    state: WitnessState | None,
    checkpoint: Checkpoint,
    public_keys: Sequence[Ed25519PublicKey],
    proof: Sequence[bytes] | None,
) -> WitnessVerdict:
    """Decide on a new checkpoint, given the last one accepted (``None`` at first use) and
    the log's consistency proof from ``state.height`` to ``checkpoint.height``."""
    if not any(checkpoint.signed_by(k) for k in public_keys):
        return WitnessVerdict("bad_signature", f"checkpoint {checkpoint.height}: bad signature")
    if state is None:
        return WitnessVerdict("accept", f"first checkpoint seen: {checkpoint.height}")
    if checkpoint.height < state.height:
        return WitnessVerdict(
            "rollback",
            f"checkpoint {checkpoint.height} is older than {state.height}, already accepted",
        )
    if checkpoint.height == state.height:
        if (checkpoint.head_hash, checkpoint.merkle_root) == (state.head_hash, state.merkle_root):
            return WitnessVerdict("same", f"checkpoint {checkpoint.height} already accepted")
        return WitnessVerdict(
            "fork", f"two different checkpoints of height {checkpoint.height} (a fork)"
        )
    if proof is None or not verify_consistency(
        state.height, checkpoint.height, state.merkle_root, checkpoint.merkle_root, proof
    ):
        return WitnessVerdict(
            "fork",
            f"checkpoint {checkpoint.height} is not consistent with {state.height} (a fork)",
        )
    return WitnessVerdict("accept", f"checkpoint {checkpoint.height} extends {state.height}")


# --------------------------------------------------------------------------- command line


def parse_pin(text: str) -> tuple[int, bytes]:
    """``HEIGHT:HEAD_HASH`` (a positive height, 64 hex digits); ValueError otherwise."""
    height, _, head = text.partition(":")
    value = bytes.fromhex(head)
    if not height.isdigit() or int(height) < 1 or len(value) != 32:
        raise ValueError(f"not HEIGHT:HEAD_HASH (64 hex digits): {text}")
    return int(height), value


def _pin(text: str) -> tuple[int, bytes]:
    try:
        return parse_pin(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not HEIGHT:HEAD_HASH (64 hex digits): {text}") from None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Verify a upi-engine ledger export offline.")
    parser.add_argument("export", type=Path, help="the export (JSON Lines)")
    parser.add_argument("--public-key", type=Path, action="append", required=True)
    parser.add_argument("--pin", type=_pin, action="append", default=[])
    parser.add_argument("--witness-key", type=Path, action="append", default=[])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    try:
        public = [load_public_key(p.read_bytes()) for p in args.public_key]
        witnesses = [load_public_key(p.read_bytes()) for p in args.witness_key]
        result = verify_export(
            read_export(args.export), public, pins=dict(args.pin), witness_keys=witnesses
        )
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result.to_dict()))
    elif result.valid:
        print(f"valid: {result.entries} entries, {result.checkpoints} checkpoints")
    else:
        print(f"INVALID at height {result.first_bad_height}: {result.reason}")
    return 0 if result.valid else 1


if __name__ == "__main__":
    sys.exit(main())
