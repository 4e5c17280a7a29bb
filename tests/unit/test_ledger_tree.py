"""The stored Merkle tree and its proofs (issue 16): RFC 6962 / RFC 9162 test vectors, every
tree size from 1 to 64 against every smaller size, the tile edges, and the verifiers'
refusals of corrupted proofs. Pure: no database."""

from __future__ import annotations

import hashlib
import random

import pytest

from compliance import tree
from compliance.verifier import (
    MerkleAccumulator,
    merkle_root,
    verify_consistency,
    verify_inclusion,
)

# Test vectors of the transparency-dev/merkle project (proof/verify_test.go), which checks
# RFC 6962 / RFC 9162 proofs: eight leaves of raw data, the root of each prefix, and known
# inclusion and consistency proofs (1-based leaf numbers, as there).
LEAVES = [bytes.fromhex(h) for h in ("", "00", "10", "2021", "3031", "40414243",
          "5051525354555657", "606162636465666768696a6b6c6d6e6f")]  # fmt: skip
ROOTS = [
    bytes.fromhex(h)
    for h in (
        "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
        "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
        "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
        "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
        "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
        "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
        "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
    )
]
INCLUSION = [  # (leaf number, tree size, proof)
    (1, 8, ["96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4"]),
    (6, 8, ["bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
            "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"]),
    (3, 3, ["fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125"]),
    (2, 5, ["6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b"]),
]  # fmt: skip
CONSISTENCY = [  # (size1, size2, proof)
    (1, 8, ["96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4"]),
    (6, 8, ["0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
            "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"]),
    (2, 5, ["5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b"]),
    (6, 7, ["0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
            "b08693ec2e721597130641e8211e7eedccb4c26413963eee6c1e2ed16ffb1a5f",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"]),
]  # fmt: skip


def _tiles(entries: list[bytes], batches: list[int] | None = None) -> dict[tuple[int, int], bytes]:
    """Every tile of the tree of ``entries``, built in ``batches`` as the ledger appends."""
    stored: dict[tuple[int, int], bytes] = {}
    size, rest = 0, list(entries)
    for n in batches or [len(entries)]:
        partial = {t: stored[t] for t in tree.partial_tiles(size)}
        builder = tree.TileBuilder(size, partial)
        stored.update(builder.extend(rest[:n]))
        rest, size = rest[n:], size + n
    assert not rest
    return stored


def _hashes(n: int, seed: int = 0) -> list[bytes]:
    return [hashlib.sha256(f"{seed}:{i}".encode()).digest() for i in range(n)]


def _h(hexes: list[str]) -> list[bytes]:
    return [bytes.fromhex(h) for h in hexes]


def test_roots_of_the_vectors():
    for n in range(1, 9):
        assert merkle_root(LEAVES[:n]) == ROOTS[n - 1]
        acc = MerkleAccumulator()
        acc.extend(LEAVES[:n])
        assert acc.root() == ROOTS[n - 1]


@pytest.mark.parametrize(("leaf", "size", "proof"), INCLUSION)
def test_inclusion_vectors(leaf, size, proof):
    stored = _tiles(LEAVES[:size])
    assert tree.inclusion_proof(leaf - 1, size, stored) == _h(proof)
    assert tree.reference_inclusion_proof(leaf - 1, LEAVES[:size]) == _h(proof)
    assert verify_inclusion(leaf - 1, size, LEAVES[leaf - 1], _h(proof), ROOTS[size - 1])


@pytest.mark.parametrize(("first", "second", "proof"), CONSISTENCY)
def test_consistency_vectors(first, second, proof):
    stored = _tiles(LEAVES[:second])
    assert tree.consistency_proof(first, second, stored) == _h(proof)
    assert tree.reference_consistency_proof(first, LEAVES[:second]) == _h(proof)
    assert verify_consistency(first, second, ROOTS[first - 1], ROOTS[second - 1], _h(proof))


def test_every_size_to_64_against_every_smaller_size():
    entries = _hashes(64)
    stored = _tiles(entries, batches=[1, 2, 5, 8, 16, 32])  # built the way appends build it
    roots = [merkle_root(entries[:n]) for n in range(65)]
    for n in range(1, 65):
        for m in range(n):
            path = tree.inclusion_proof(m, n, stored)
            assert path == tree.reference_inclusion_proof(m, entries[:n]), (m, n)
            assert verify_inclusion(m, n, entries[m], path, roots[n])
        for m in range(1, n + 1):
            proof = tree.consistency_proof(m, n, stored)
            assert proof == tree.reference_consistency_proof(m, entries[:n]), (m, n)
            assert verify_consistency(m, n, roots[m], roots[n], proof), (m, n)


def _corruptions(proof: list[bytes], root_a: bytes, root_b: bytes) -> list[list[bytes]]:
    bad = [[], [*proof, b""], [*proof, root_a], [root_b, *proof], [proof[0], *proof]]
    bad += [proof[:-1]] if proof else []
    for i in range(len(proof)):
        flipped = list(proof)
        flipped[i] = bytes([flipped[i][0] ^ 16]) + flipped[i][1:]
        bad.append(flipped)
    return bad


def test_corrupted_consistency_proofs_are_refused():
    entries = _hashes(64)
    stored = _tiles(entries)
    roots = [merkle_root(entries[:n]) for n in range(129)]
    for n in range(2, 65):
        for m in range(1, n):
            proof = tree.consistency_proof(m, n, stored)
            for bad in _corruptions(proof, roots[m], roots[n]):
                assert not verify_consistency(m, n, roots[m], roots[n], bad), (m, n, bad)
            # wrong sizes, wrong or swapped roots
            assert not verify_consistency(m - 1, n, roots[m], roots[n], proof) or m == 1
            assert not verify_consistency(m + 1, n, roots[m], roots[n], proof)
            assert not verify_consistency(m, n * 2, roots[m], roots[n], proof)
            assert not verify_consistency(m, n, roots[n], roots[m], proof)
            assert not verify_consistency(m, n, roots[m], roots[m], proof)


def test_the_edges_of_consistency():
    r = merkle_root(_hashes(3))
    assert verify_consistency(3, 3, r, r, [])
    assert not verify_consistency(3, 3, r, merkle_root(_hashes(3, seed=1)), [])
    assert not verify_consistency(3, 3, r, r, [r])
    assert verify_consistency(0, 3, b"anything", r, [])
    assert not verify_consistency(0, 3, b"anything", r, [r])
    assert not verify_consistency(4, 3, r, r, [r])  # time travel
    assert not verify_consistency(1, 2, r, r, [])  # an empty proof between different sizes
    with pytest.raises(ValueError):
        tree.consistency_ranges(0, 3)
    with pytest.raises(ValueError):
        tree.consistency_ranges(4, 3)
    with pytest.raises(ValueError):
        tree.inclusion_ranges(3, 3)


def test_inclusion_corruptions_are_refused():
    entries = _hashes(37)
    stored = _tiles(entries)
    root = merkle_root(entries)
    for m in (0, 1, 17, 31, 32, 36):
        path = tree.inclusion_proof(m, 37, stored)
        assert verify_inclusion(m, 37, entries[m], path, root)
        for bad in _corruptions(path, root, root):
            assert not verify_inclusion(m, 37, entries[m], bad, root), (m, bad)
        assert not verify_inclusion(m ^ 1, 37, entries[m], path, root)
        assert not verify_inclusion(m, 74, entries[m], path, root)
        assert not verify_inclusion(m, 37, b"wrong", path, root)


@pytest.mark.parametrize("size", [255, 256, 257, 511, 512, 513, 65_535, 65_536, 65_537])
def test_tile_edges(size):
    """Around full tiles of the first two tile levels: the proofs agree with the tree's
    root (as every checkpoint computes it) for leaves at the edges and at random."""
    entries = _hashes(size, seed=size)
    rng = random.Random(size)
    batches: list[int] = []
    while sum(batches) < size:
        batches.append(min(rng.choice([1, 7, 255, 256, 1000, 4096]), size - sum(batches)))
    stored = _tiles(entries, batches)
    acc = MerkleAccumulator()
    acc.extend(entries)
    root = acc.root()
    for m in {0, 1, 254, 255, 256, size - 2, size - 1, rng.randrange(size)}:
        if 0 <= m < size:
            assert verify_inclusion(
                m, size, entries[m], tree.inclusion_proof(m, size, stored), root
            )
    for first in {f for f in (1, 255, 256, 257, size // 2, size - 1) if f <= size}:
        small = MerkleAccumulator()
        small.extend(entries[:first])
        proof = tree.consistency_proof(first, size, stored)
        assert verify_consistency(first, size, small.root(), root, proof)
    # A proof reads few tiles: at most a handful per tile level.
    ranges = tree.inclusion_ranges(size // 3, size) + tree.consistency_ranges(size // 2, size)
    assert len(tree.tiles_for(ranges)) <= 4 * (1 + size.bit_length() // tree.TILE_HEIGHT)


def test_the_builder_refuses_tiles_that_do_not_fit_the_size():
    stored = _tiles(_hashes(300))
    partial = {t: stored[t] for t in tree.partial_tiles(300)}
    tree.TileBuilder(300, partial)
    with pytest.raises(ValueError):
        tree.TileBuilder(301, partial)
    with pytest.raises(ValueError):
        tree.TileBuilder(300, {})


def test_a_corrupted_tile_gives_a_proof_that_fails():
    entries = _hashes(600)
    stored = _tiles(entries)
    root = merkle_root(entries)
    tile = bytearray(stored[(0, 0)])
    tile[40] ^= 1  # the hash of leaf 1
    stored[(0, 0)] = bytes(tile)
    assert not verify_inclusion(5, 600, entries[5], tree.inclusion_proof(5, 600, stored), root)
