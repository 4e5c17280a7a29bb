"""The ledger's stored Merkle tree: tiles, and proofs that read O(log n) of them.

Node ``(level, index)`` is the RFC 6962 hash of the leaves ``index·2^level …
(index+1)·2^level - 1`` (a perfect subtree); leaves (level 0) are SHA-256(0x00 ||
entry_hash). The tree is stored as tiles, as transparency logs store theirs (C2SP
tlog-tiles, Trillian/Tessera): tile ``(t, i)`` holds up to 256 consecutive nodes of level
``8t``, indices ``256i …``, concatenated. A node of level ``8t + r`` is recomputed from
``2^r`` (at most 128) hashes of one tile, so any node costs one tile read and at most 127
hashes. The last tile of each tile level is partial and grows in place as entries are
appended; every other tile is final.

An inclusion or consistency proof is a list of subtree hashes (RFC 6962 §2.1.1, RFC 9162
§2.1.4.1); each subtree splits into at most ~log n perfect nodes, so a proof reads a few
tiles per tile level, whatever the ledger's size. This module is pure: it says which tiles
a proof needs (:func:`tiles_for`) and computes the proof from them; the ledger reads them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence

from compliance.verifier import EMPTY_ROOT, _mth, _split, leaf_hash, node_hash

__all__ = [
    "TILE_HEIGHT",
    "TILE_WIDTH",
    "TileBuilder",
    "TileRows",
    "consistency_proof",
    "consistency_ranges",
    "inclusion_proof",
    "inclusion_ranges",
    "node_cache",
    "partial_tiles",
    "range_hash",
    "range_nodes",
    "reference_consistency_proof",
    "reference_inclusion_proof",
    "tiles_for",
]

TILE_HEIGHT = 8
TILE_WIDTH = 1 << TILE_HEIGHT
_H = 32

Range = tuple[int, int]  # leaves [start, end)
Node = tuple[int, int]  # (level, index)
TileId = tuple[int, int]  # (tile level, tile index)


# --------------------------------------------------------------------------- proof shapes


def inclusion_ranges(m: int, n: int) -> list[Range]:
    """RFC 6962 §2.1.1 PATH(m, D[n]) as the leaf ranges whose hashes make it up."""
    if not 0 <= m < n:
        raise ValueError(f"leaf {m} is not in a tree of {n}")
    out: list[Range] = []
    lo, hi = 0, n
    while hi - lo > 1:
        k = _split(hi - lo)
        if m < lo + k:
            out.append((lo + k, hi))
            hi = lo + k
        else:
            out.append((lo, lo + k))
            lo += k
    out.reverse()  # the path goes from the leaf up
    return out


def consistency_ranges(m: int, n: int) -> list[Range]:
    """RFC 9162 §2.1.4.1 PROOF(m, D[n]) as leaf ranges (0 < m ≤ n)."""
    if not 0 < m <= n:
        raise ValueError(f"no consistency proof from {m} to {n}")
    out: list[Range] = []
    lo, hi, whole = 0, n, True  # SUBPROOF(m - lo, D[lo:hi], whole)
    while True:
        if m == hi:
            if not whole:
                out.append((lo, hi))
            break
        k = _split(hi - lo)
        if m <= lo + k:
            out.append((lo + k, hi))
            hi = lo + k
        else:
            out.append((lo, lo + k))
            lo, whole = lo + k, False
    out.reverse()
    return out


def range_nodes(start: int, end: int) -> list[Node]:
    """The perfect subtrees that make up the leaves [start, end), left to right.

    The ranges of RFC 6962's recursion start at a multiple of a power of two at least as
    large as their width, so they split into perfect nodes by the bits of the width."""
    nodes: list[Node] = []
    at, width = start, end - start
    for level in range(width.bit_length() - 1, -1, -1):
        if width >> level & 1:
            if at % (1 << level):
                raise ValueError(f"[{start}, {end}) is not a subtree of an RFC 6962 tree")
            nodes.append((level, at >> level))
            at += 1 << level
    return nodes


def range_hash(start: int, end: int, node: Mapping[Node, bytes]) -> bytes:
    """MTH(D[start:end]) from the hashes of its perfect nodes."""
    parts = [node[n] for n in range_nodes(start, end)]
    if not parts:
        return EMPTY_ROOT
    h = parts[-1]
    for left in reversed(parts[:-1]):
        h = node_hash(left, h)
    return h


# --------------------------------------------------------------------------- tiles


def _tile_of(level: int, index: int) -> TileId:
    """The tile holding node (level, index): the one whose bottom row has its leaves'
    ancestors at level 8t."""
    t, r = divmod(level, TILE_HEIGHT)
    return t, (index << r) // TILE_WIDTH


def tiles_for(ranges: Iterable[Range]) -> set[TileId]:
    return {_tile_of(*n) for start, end in ranges for n in range_nodes(start, end)}


class _Nodes:
    """Nodes recomputed from tiles, each at most once: the nodes of one proof (and the
    proofs of a transaction's neighbouring entries) share most of their subtrees."""

    def __init__(self, tiles: Mapping[TileId, bytes]) -> None:
        self._tiles = tiles
        self._levels: dict[TileId, list[list[bytes]]] = {}

    def _tile_levels(self, tile_id: TileId) -> list[list[bytes]]:
        """The tile's nodes level by level, from its bottom row up (a partial tile's up to
        its last complete pair)."""
        levels = self._levels.get(tile_id)
        if levels is None:
            data = self._tiles[tile_id]
            row = [data[i : i + _H] for i in range(0, len(data), _H)]
            levels = [row]
            sha256 = hashlib.sha256
            while len(row) > 1:  # a partial row's odd last node has no parent yet
                pairs = zip(row[::2], row[1::2], strict=False)
                row = [sha256(b"\x01" + a + b).digest() for a, b in pairs]
                levels.append(row)
            self._levels[tile_id] = levels
        return levels

    def node(self, level: int, index: int) -> bytes:
        tile_id = _tile_of(level, index)
        r = level % TILE_HEIGHT
        levels = self._tile_levels(tile_id)
        at = index % (TILE_WIDTH >> r)
        if r >= len(levels) or at >= len(levels[r]):
            raise LookupError(f"node ({level}, {index}) is not in the stored tree")
        return levels[r][at]

    def range_hash(self, start: int, end: int) -> bytes:
        return range_hash(start, end, {n: self.node(*n) for n in range_nodes(start, end)})


def _hashes(ranges: Sequence[Range], nodes: _Nodes) -> list[bytes]:
    return [nodes.range_hash(s, e) for s, e in ranges]


def inclusion_proof(
    m: int, n: int, tiles: Mapping[TileId, bytes], *, nodes: _Nodes | None = None
) -> list[bytes]:
    """PATH(m, D[n]) from the tiles of :func:`tiles_for` ``(inclusion_ranges(m, n))``; pass
    one ``nodes`` (:func:`node_cache`) to proofs over the same tiles to share the work."""
    return _hashes(inclusion_ranges(m, n), nodes or _Nodes(tiles))


def consistency_proof(m: int, n: int, tiles: Mapping[TileId, bytes]) -> list[bytes]:
    """PROOF(m, D[n]) from the tiles of :func:`tiles_for` ``(consistency_ranges(m, n))``."""
    return _hashes(consistency_ranges(m, n), _Nodes(tiles))


def node_cache(tiles: Mapping[TileId, bytes]) -> _Nodes:
    return _Nodes(tiles)


def partial_tiles(size: int) -> dict[TileId, int]:
    """The tiles still growing in a tree of ``size`` leaves, with how many hashes each
    holds: the last tile of every tile level whose count is not a multiple of 256."""
    out: dict[TileId, int] = {}
    count, t = size, 0
    while count:
        if count % TILE_WIDTH:
            out[(t, count // TILE_WIDTH)] = count % TILE_WIDTH
        count //= TILE_WIDTH
        t += 1
    return out


class TileRows:
    """The growing tile of each tile level, filled with consecutive nodes of its level."""

    def __init__(self) -> None:
        self.open: dict[int, tuple[int, bytearray]] = {}  # tile level -> (index, hashes)

    def add(
        self, t: int, index: int, nodes: Sequence[bytes]
    ) -> list[tuple[TileId, bytes | bytearray, bool]]:
        """Append ``nodes`` (of level 8t, from ``index`` on); returns each tile changed,
        with whether it is now full (a full one leaves the open tiles). ValueError if they
        do not continue the open tile."""
        changed: list[tuple[TileId, bytes | bytearray, bool]] = []
        pos = 0
        while pos < len(nodes):
            tile_index, offset = divmod(index + pos, TILE_WIDTH)
            current = self.open.get(t)
            if current is None or current[0] != tile_index:
                current = self.open[t] = (tile_index, bytearray())
            hashes = current[1]
            if len(hashes) != offset * _H:
                raise ValueError(f"the tree's nodes at tile level {t} came out of order")
            take = nodes[pos : pos + TILE_WIDTH - offset]
            hashes += b"".join(take)
            pos += len(take)
            if len(hashes) == TILE_WIDTH * _H:
                del self.open[t]
                changed.append(((t, tile_index), bytes(hashes), True))
            else:
                changed.append(((t, tile_index), hashes, False))
        return changed

    def growing(self) -> dict[TileId, bytes]:
        return {(t, index): bytes(h) for t, (index, h) in self.open.items() if h}


class TileBuilder:
    """Grows the tiles as leaves are appended.

    Start it from the partial tiles of the current size (:func:`partial_tiles`, read from
    the database); :meth:`extend` appends entry hashes and returns every tile it changed,
    whole, to be written back."""

    def __init__(self, size: int, partial: Mapping[TileId, bytes]) -> None:
        self.size = size
        self._rows = TileRows()
        for (t, i), count in partial_tiles(size).items():
            data = partial.get((t, i), b"")
            if len(data) != count * _H:
                raise ValueError(f"tile ({t}, {i}) holds {len(data) // _H} hashes, not {count}")
            self._rows.open[t] = (i, bytearray(data))

    def extend(self, entry_hashes: Iterable[bytes]) -> dict[TileId, bytes]:
        sha256 = hashlib.sha256
        return self.extend_leaves([sha256(b"\x00" + e).digest() for e in entry_hashes])

    def extend_leaves(self, leaves: Sequence[bytes]) -> dict[TileId, bytes]:
        """Append leaf hashes; returns every tile changed, whole. Works a tile at a time:
        a full tile's root is the next tile level's new node."""
        changed: dict[TileId, bytes | bytearray] = {}
        nodes, t = list(leaves), 0
        while nodes:
            parents: list[bytes] = []
            # The first new node's index: the nodes of level 8t before these.
            for tile_id, data, full in self._rows.add(t, self.size >> (TILE_HEIGHT * t), nodes):
                changed[tile_id] = data
                if full:
                    parents.append(_tile_root(bytes(data)))
            nodes, t = parents, t + 1
        self.size += len(leaves)
        return {tile_id: bytes(data) for tile_id, data in changed.items()}

    def open_tiles(self) -> dict[TileId, bytes]:
        """The tiles still growing at the current size (those of :func:`partial_tiles`)."""
        return self._rows.growing()


def _tile_root(tile: bytes) -> bytes:
    nodes = [tile[i : i + _H] for i in range(0, len(tile), _H)]
    while len(nodes) > 1:
        nodes = [node_hash(a, b) for a, b in zip(nodes[::2], nodes[1::2], strict=True)]
    return nodes[0]


# --------------------------------------------------------------------------- references


def reference_inclusion_proof(m: int, entry_hashes: Sequence[bytes]) -> list[bytes]:
    """PATH(m, D[n]) straight from RFC 6962's recursive definition, over every hash: for
    tests, and as the definition the stored tree must agree with."""
    leaves = [leaf_hash(h) for h in entry_hashes]

    def path(m: int, d: Sequence[bytes]) -> list[bytes]:
        if len(d) <= 1:
            return []
        k = _split(len(d))
        if m < k:
            return [*path(m, d[:k]), _mth(d[k:])]
        return [*path(m - k, d[k:]), _mth(d[:k])]

    if not 0 <= m < len(leaves):
        raise ValueError("leaf index outside the tree")
    return path(m, leaves)


def reference_consistency_proof(m: int, entry_hashes: Sequence[bytes]) -> list[bytes]:
    """PROOF(m, D[n]) straight from RFC 9162 §2.1.4.1's SUBPROOF."""
    leaves = [leaf_hash(h) for h in entry_hashes]

    def subproof(m: int, d: Sequence[bytes], whole: bool) -> list[bytes]:
        n = len(d)
        if m == n:
            return [] if whole else [_mth(d)]
        k = _split(n)
        if m <= k:
            return [*subproof(m, d[:k], whole), _mth(d[k:])]
        return [*subproof(m - k, d[k:], False), _mth(d[:k])]

    if not 0 < m <= len(leaves):
        raise ValueError("no consistency proof for these sizes")
    return subproof(m, leaves, True)
