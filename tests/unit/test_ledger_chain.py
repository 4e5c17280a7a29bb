"""The ledger's pure rules: hashes, Merkle tree, checkpoints, and tamper detection, checked
against hand computations and the independent verifier in tests/ledger_verifier.py."""

from __future__ import annotations

import base64
import copy
import hashlib
import os
import struct

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given
from hypothesis import strategies as st

from compliance import chain
from tests import ledger_verifier

KEY = Ed25519PrivateKey.generate()
PUB = KEY.public_key()
DATA_KEY = os.urandom(32)


def make_export(n: int, checkpoints: tuple[int, ...]) -> list[dict]:
    lines: list[dict] = []
    prev = chain.GENESIS_PREV
    hashes: list[bytes] = []
    for h in range(n):
        txn = "" if h % 7 == 3 else f"UPI{h:04d}"
        env = {"event_id": f"e{h}", "payload": {"amount_paise": h, "payer_vpa": "ravi@okhdfc"}}
        nonce, ct = chain.seal(
            DATA_KEY, "k1", env, event_id=f"e{h}", event_type="PaymentInitiated", transaction_id=txn
        )
        e = chain.build_entry(
            prev,
            h,
            event_id=f"e{h}",
            event_type="PaymentInitiated",
            transaction_id=txn,
            recorded_at=f"2026-01-01T00:00:{h % 60:02d}Z",
            key_id="k1",
            nonce=nonce,
            ciphertext=ct,
        )
        lines.append(e.to_export())
        prev = e.entry_hash
        hashes.append(e.entry_hash)
        if h + 1 in checkpoints:
            cp = chain.sign_checkpoint(
                KEY,
                height=h + 1,
                head_hash=prev,
                merkle_root_=chain.merkle_root(hashes),
                signed_at="2026-01-01T00:01:00Z",
                signing_key_id="s1",
            )
            lines.append(cp.to_export())
    return lines


def both(lines: list[dict]) -> tuple[chain.VerifyResult, tuple[bool, int | None, str]]:
    return chain.verify_lines(lines, {"s1": PUB}), ledger_verifier.verify(lines, PUB)


def test_entry_hash_known_answer():
    nonce, ct = b"\x01" * 12, b"\x02\x03"
    by_hand = hashlib.sha256(
        bytes(32)
        + struct.pack(">Q", 0)
        + b"".join(
            struct.pack(">I", len(p)) + p
            for p in [
                b"ev1",
                b"PaymentInitiated",
                b"UPI1",
                b"2026-01-01T00:00:00Z",
                b"k1",
                nonce,
                ct,
            ]
        )
    ).digest()
    assert (
        chain.entry_hash(
            bytes(32), 0, "ev1", "PaymentInitiated", "UPI1", "2026-01-01T00:00:00Z", "k1", nonce, ct
        )
        == by_hand
    )

    # Frames of repeated values are remembered: the same bytes for repeats, for new values,
    # and after the memory is full and starts again.
    def hand(prev, height, *fields):
        body = b"".join(struct.pack(">I", len(f)) + f for f in fields)
        return hashlib.sha256(prev + struct.pack(">Q", height) + body).digest()

    for n in range(5_000):
        stamp, kind = f"2026-01-01T00:00:{n % 4_500:05d}Z", ("A", "B", "")[n % 3]
        expected = hand(
            bytes([n % 256]) * 32, n, b"e", kind.encode(), b"", stamp.encode(), b"k", nonce, ct
        )
        got = chain.entry_hash(bytes([n % 256]) * 32, n, "e", kind, "", stamp, "k", nonce, ct)
        assert got == expected, n


def naive_root(hashes: list[bytes]) -> bytes:
    leaves = [hashlib.sha256(b"\x00" + h).digest() for h in hashes]

    def mth(xs):
        if not xs:
            return hashlib.sha256(b"").digest()
        if len(xs) == 1:
            return xs[0]
        k = 1
        while k * 2 < len(xs):
            k *= 2
        return hashlib.sha256(b"\x01" + mth(xs[:k]) + mth(xs[k:])).digest()

    return mth(leaves)


@pytest.mark.parametrize("n", range(1, 21))
def test_merkle_root_and_every_inclusion_proof(n):
    hashes = [hashlib.sha256(bytes([i])).digest() for i in range(n)]
    root = chain.merkle_root(hashes)
    assert root == naive_root(hashes)
    for i in range(n):
        proof = chain.inclusion_proof(i, hashes)
        assert chain.verify_inclusion(i, n, hashes[i], proof, root)
        assert not chain.verify_inclusion(i, n, hashlib.sha256(b"other").digest(), proof, root)
        if n > 1:
            assert not chain.verify_inclusion((i + 1) % n, n, hashes[i], proof, root)


@given(st.integers(min_value=0, max_value=300))
def test_accumulator_matches_the_full_tree_at_every_size(n):
    acc = chain.MerkleAccumulator()
    hashes = [hashlib.sha256(str(i).encode()).digest() for i in range(n)]
    for h in hashes:
        acc.append(h)
    assert acc.root() == chain.merkle_root(hashes) and acc.size == n
    resumed = chain.MerkleAccumulator(acc.size, list(acc.frontier))
    extra = hashlib.sha256(b"next").digest()
    resumed.append(extra)
    assert resumed.root() == chain.merkle_root([*hashes, extra])


def test_accumulator_extended_in_runs_matches_the_full_tree():
    # Runs of every shape: odd sizes, runs that start at sizes that are and are not powers
    # of two, a run longer than any perfect subtree that fits.
    hashes = [hashlib.sha256(str(i).encode()).digest() for i in range(600)]
    acc = chain.MerkleAccumulator()
    at = 0
    for run in [1, 3, 8, 5, 64, 100, 2, 333, 0, 84]:
        acc.extend(hashes[at : at + run])
        at += run
        assert acc.size == at and acc.root() == chain.merkle_root(hashes[:at]), at


def test_seal_open_and_aad_binding():
    env = {"b": 1, "a": "₹ 100"}
    nonce, ct = chain.seal(DATA_KEY, "k1", env, event_id="e", event_type="T", transaction_id="t")
    assert (
        chain.open_sealed(
            DATA_KEY, "k1", nonce, ct, event_id="e", event_type="T", transaction_id="t"
        )
        == env
    )
    for changed in ({"event_id": "x"}, {"event_type": "X"}, {"transaction_id": "x"}):
        args = {"event_id": "e", "event_type": "T", "transaction_id": "t", **changed}
        with pytest.raises(InvalidTag):
            chain.open_sealed(DATA_KEY, "k1", nonce, ct, **args)
    with pytest.raises(InvalidTag):
        chain.open_sealed(
            DATA_KEY, "k2", nonce, ct, event_id="e", event_type="T", transaction_id="t"
        )
    assert chain.canonical_json(env) == '{"a":"₹ 100","b":1}'.encode()


def test_checkpoint_signature_covers_every_field():
    cp = chain.sign_checkpoint(
        KEY,
        height=3,
        head_hash=b"\x01" * 32,
        merkle_root_=b"\x02" * 32,
        signed_at="2026-01-01T00:00:00Z",
        signing_key_id="s1",
    )
    assert chain.verify_checkpoint(PUB, cp)
    for change in (
        {"height": 4},
        {"head_hash": b"\x03" * 32},
        {"merkle_root": b"\x03" * 32},
        {"signed_at": "2026-01-02T00:00:00Z"},
        {"signing_key_id": "s2"},
    ):
        forged = chain.Checkpoint(**{**cp.__dict__, **change})
        assert not chain.verify_checkpoint(PUB, forged)


def test_a_real_export_verifies_in_both_verifiers():
    lines = make_export(50, (20, 40, 50))
    mine, theirs = both(lines)
    assert mine.valid and mine.entries == 50 and mine.checkpoints == 3
    assert theirs == (True, None, "ok")


ENTRY_FIELDS = [
    "ciphertext",
    "nonce",
    "event_id",
    "event_type",
    "transaction_id",
    "recorded_at",
    "key_id",
    "prev_hash",
    "entry_hash",
]


def flip(line: dict, field: str) -> None:
    value = line[field]
    if field in ("nonce", "ciphertext"):
        raw = bytearray(base64.b64decode(value))
        raw[len(raw) // 2] ^= 0x01
        line[field] = base64.b64encode(bytes(raw)).decode()
    elif field in ("prev_hash", "entry_hash", "merkle_root", "head_hash"):
        raw = bytearray(bytes.fromhex(value))
        raw[5] ^= 0x01
        line[field] = bytes(raw).hex()
    else:
        line[field] = value + "x" if value else "x"


@pytest.mark.parametrize("field", ENTRY_FIELDS)
def test_any_changed_byte_of_any_entry_is_found_at_its_height(field):
    lines = make_export(50, (20, 40, 50))
    index = next(
        i for i, line in enumerate(lines) if line.get("height") == 27 and line["type"] == "entry"
    )
    flip(lines[index], field)
    mine, theirs = both(lines)
    assert not mine.valid and mine.first_bad_height == 27, mine
    assert not theirs[0] and theirs[1] == 27, theirs


def entry_index(lines: list[dict], height: int) -> int:
    return next(
        i for i, line in enumerate(lines) if line["type"] == "entry" and line["height"] == height
    )


def test_deleted_reordered_and_inserted_entries_are_found():
    lines = make_export(50, (20, 40, 50))
    deleted = copy.deepcopy(lines)
    del deleted[entry_index(deleted, 33)]
    swapped = copy.deepcopy(lines)
    a, b = entry_index(swapped, 33), entry_index(swapped, 34)
    swapped[a], swapped[b] = swapped[b], swapped[a]
    inserted = copy.deepcopy(lines)
    forged_prev = bytes.fromhex(inserted[entry_index(inserted, 32)]["entry_hash"])
    forged = chain.build_entry(
        forged_prev,
        33,
        event_id="evil",
        event_type="PaymentSucceeded",
        transaction_id="UPI9999",
        recorded_at="2026-01-01T00:00:00Z",
        key_id="k1",
        nonce=b"\0" * 12,
        ciphertext=b"forged",
    )
    inserted.insert(entry_index(inserted, 33), forged.to_export())
    for tampered in (deleted, swapped, inserted):
        mine, theirs = both(tampered)
        assert not mine.valid and mine.first_bad_height == 33, mine
        assert not theirs[0] and theirs[1] == 33, theirs


@pytest.mark.parametrize("field", ["merkle_root", "head_hash", "height", "signature", "signed_at"])
def test_an_altered_checkpoint_is_found_at_its_height(field):
    lines = make_export(50, (20, 40, 50))
    cp = next(line for line in lines if line["type"] == "checkpoint" and line["height"] == 40)
    if field == "height":
        cp["height"] = 41
    elif field == "signature":
        sig = bytearray(base64.b64decode(cp["signature"]))
        sig[0] ^= 1
        cp["signature"] = base64.b64encode(bytes(sig)).decode()
    elif field == "signed_at":
        cp["signed_at"] = "2030-01-01T00:00:00Z"
    else:
        flip(cp, field)
    mine, theirs = both(lines)
    # A checkpoint of height 40 covers entries 0..39: it is reported at 39, the last entry it
    # vouches for (at 40 when its height itself was moved to 41).
    expected = 40 if field == "height" else 39
    assert not mine.valid and mine.first_bad_height == expected, mine
    assert not theirs[0] and theirs[1] == expected, theirs


def test_a_checkpoint_re_signed_over_a_wrong_root_is_found():
    lines = make_export(30, (30,))
    cp = lines[-1]
    forged = chain.sign_checkpoint(
        KEY,
        height=30,
        head_hash=bytes.fromhex(cp["head_hash"]),
        merkle_root_=b"\x09" * 32,
        signed_at=cp["signed_at"],
        signing_key_id="s1",
    )
    lines[-1] = forged.to_export()
    mine, theirs = both(lines)
    assert not mine.valid and mine.first_bad_height == 29 and "merkle_root" in (mine.reason or "")
    assert theirs[:2] == (False, 29)
