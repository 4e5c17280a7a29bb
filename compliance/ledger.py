"""The compliance ledger: one append-only, encrypted, hash-chained, signed chain (SPEC §6).

Writing. :class:`LedgerWriter` consumes every event of every topic in batches. Appends are
serialised by a transaction-scoped advisory lock: however many ledger workers run, one
logical writer appends at a time, and the others wait their turn. A batch reads the head
and the Merkle frontier from ``ledger_state``, skips events already in the chain (unique
event id: a redelivery lands nowhere), seals each envelope under the active data key,
chains the hashes, signs a checkpoint whenever the size crosses a multiple of 1,000, and
stores everything in one transaction. A background task signs a checkpoint when 10 s have
passed with entries uncovered.

Reading. :func:`verify_ledger` streams the chain and checks hashes, Merkle roots and
signatures, resuming from the last verified checkpoint unless ``full``. :func:`export_lines`
writes the export format, :func:`transaction_audit` decrypts a transaction's events and
proves their inclusion.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import struct
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy.ext.asyncio import AsyncConnection

from compliance import chain, keys, tree
from core import tracing
from core.bus.base import Subscription
from core.clock import Clock
from core.crypto import MasterKey
from core.events import Envelope, Topic
from core.metrics import LEDGER_ENTRIES
from core.polling import poll_until_stopped
from core.storage import Database, sql_text

__all__ = [
    "CHECKPOINT_EVERY",
    "LedgerWriter",
    "ProofUnavailable",
    "checkpoint_at",
    "consistency_proof",
    "ensure_tree",
    "export_lines",
    "latest_checkpoint",
    "ledger_page",
    "public_key_pems",
    "transaction_audit",
    "verify_ledger",
]

_APPEND_LOCK = 0x5550_4C47  # "UPLG"
_UNIQUE_EVENT = "ledger_entries_event_id_key"
CHECKPOINT_EVERY = 1_000
_ENTRY_COLUMN_NAMES = [
    "height",
    "event_id",
    "event_type",
    "transaction_id",
    "recorded_at",
    "key_id",
    "nonce",
    "ciphertext",
    "prev_hash",
    "entry_hash",
]
CHECKPOINT_INTERVAL_S = 10.0
_COPY_CHUNK = 64
# Binary COPY (PostgreSQL's own format): a signature, then flags and extension length.
_COPY_SIGNATURE = b"PGCOPY\n\xff\r\n\x00"
_COPY_HEADER = _COPY_SIGNATURE + bytes(8)  # no flags, no header extension
_COPY_TRAILER = b"\xff\xff"
_ROW_START = b"\x00\x0a\x00\x00\x00\x08"
_UUID_LENGTH = b"\x00\x00\x00\x10"
_HASH_LENGTH = b"\x00\x00\x00\x20"


def _iso(at: datetime) -> str:
    return at.isoformat(timespec="microseconds").replace("+00:00", "Z")


@dataclass
class _State:
    size: int
    head: bytes
    accumulator: chain.MerkleAccumulator
    checkpoint_height: int
    checkpoint_at: datetime
    tiled: int = 0  # entries the stored tree covers
    v2_from: int = 0  # entries from this height are sealed in format 2


async def _load_state(conn: AsyncConnection, now: datetime) -> _State:
    row = (
        await conn.execute(
            sql_text(
                "SELECT size, head_hash, frontier, checkpoint_height, checkpoint_at, tiled,"
                " v2_from FROM ledger_state WHERE id = 1"
            )
        )
    ).first()
    if row is None:
        return _State(0, chain.GENESIS_PREV, chain.MerkleAccumulator(), 0, now)
    return _State(
        int(row.size),
        bytes(row.head_hash),
        chain.MerkleAccumulator(int(row.size), [bytes(f) for f in row.frontier]),
        int(row.checkpoint_height),
        row.checkpoint_at,
        int(row.tiled),
        int(row.v2_from),
    )


async def _save_state(conn: AsyncConnection, state: _State) -> None:
    await conn.execute(
        sql_text(
            "INSERT INTO ledger_state (id, size, head_hash, frontier, checkpoint_height,"
            " checkpoint_at, tiled, v2_from) VALUES (1, :s, :h, :f, :ch, :cat, :t, :v2)"
            " ON CONFLICT (id) DO UPDATE SET"
            " size = EXCLUDED.size, head_hash = EXCLUDED.head_hash,"
            " frontier = EXCLUDED.frontier, checkpoint_height = EXCLUDED.checkpoint_height,"
            " checkpoint_at = EXCLUDED.checkpoint_at, tiled = EXCLUDED.tiled"
        ),
        {
            "s": state.size,
            "h": state.head,
            "f": state.accumulator.frontier,
            "ch": state.checkpoint_height,
            "cat": state.checkpoint_at,
            "t": state.tiled,
            "v2": state.v2_from,
        },
    )


_TILES_READ = sql_text(
    "SELECT level, idx, hashes FROM ledger_tiles WHERE (level, idx) IN"
    " (SELECT * FROM unnest(CAST(:l AS smallint[]), CAST(:i AS bigint[])))"
)
_TILES_WRITE = sql_text(
    "INSERT INTO ledger_tiles (level, idx, hashes) SELECT * FROM unnest("
    "CAST(:l AS smallint[]), CAST(:i AS bigint[]), CAST(:h AS bytea[]))"
    " ON CONFLICT (level, idx) DO UPDATE SET hashes = EXCLUDED.hashes"
)


async def _read_tiles(
    conn: AsyncConnection, ids: Iterable[tree.TileId]
) -> dict[tree.TileId, bytes]:
    wanted = sorted(set(ids))
    if not wanted:
        return {}
    rows = await conn.execute(
        _TILES_READ, {"l": [t for t, _ in wanted], "i": [i for _, i in wanted]}
    )
    return {(int(r.level), int(r.idx)): bytes(r.hashes) for r in rows}


async def _write_tiles(conn: AsyncConnection, tiles: dict[tree.TileId, bytes]) -> None:
    if tiles:
        ids = sorted(tiles)
        await conn.execute(
            _TILES_WRITE,
            {"l": [t for t, _ in ids], "i": [i for _, i in ids], "h": [tiles[k] for k in ids]},
        )


_TILE_CATCH_UP_PAGE = 65_536


async def _catch_up_tiles(conn: AsyncConnection, state: _State) -> None:
    """Build the stored tree of entries appended before it existed (an older ledger), in
    pages, once; under the append lock."""
    while state.tiled < state.size:
        end = min(state.tiled + _TILE_CATCH_UP_PAGE, state.size)
        hashes = (
            await conn.execute(
                sql_text(
                    "SELECT entry_hash FROM ledger_entries WHERE height >= :a AND height < :b"
                    " ORDER BY height"
                ),
                {"a": state.tiled, "b": end},
            )
        ).scalars()
        partial = await _read_tiles(conn, tree.partial_tiles(state.tiled))
        builder = tree.TileBuilder(state.tiled, partial)
        await _write_tiles(conn, builder.extend([bytes(h) for h in hashes]))
        if builder.size != end:
            raise RuntimeError(f"ledger entries {state.tiled}..{end - 1} are not all there")
        state.tiled = end


async def _insert_checkpoints(conn: AsyncConnection, checkpoints: list[chain.Checkpoint]) -> None:
    for cp in checkpoints:
        await conn.execute(
            sql_text(
                "INSERT INTO ledger_checkpoints (height, head_hash, merkle_root, signed_at,"
                " signing_key_id, signature) VALUES (:h, :hh, :r, :at, :k, :sig)"
                " ON CONFLICT (height) DO NOTHING"
            ),
            {
                "h": cp.height,
                "hh": cp.head_hash,
                "r": cp.merkle_root,
                "at": cp.signed_at,
                "k": cp.signing_key_id,
                "sig": cp.signature,
            },
        )


class LedgerWriter:
    consumer = "ledger"

    def __init__(
        self,
        db: Database,
        master_key: MasterKey,
        clock: Clock,
        key_policy: keys.DataKeyPolicy | None = None,
    ) -> None:
        self._db = db
        self._master = master_key
        self._clock = clock
        self._key_policy = key_policy or keys.DataKeyPolicy()
        self._stopping = asyncio.Event()
        # The growing tiles as of a size this writer committed: valid while the stored size
        # is still that one (the ledger only grows, so nobody appended in between).
        self._open_tiles: tuple[int, dict[tree.TileId, bytes]] | None = None

    def subscription(self) -> Subscription:
        return Subscription(
            consumer=self.consumer,
            topics=tuple(t.value for t in Topic),
            handler=lambda envelope: self.append([envelope]),
            batch_handler=self.append,
        )

    async def append(self, envelopes: Sequence[Envelope]) -> int:
        """Append what is not in the chain yet; returns how many entries were added.

        Optimistic: a batch is written without looking for its events first (redelivery is
        rare, and the look costs an index probe per event); if one is there already, the
        unique event id refuses the whole batch, which is then written again without
        what was there. Each traced event gets a ``ledger.append`` span in its own trace."""
        with tracing.event_spans(envelopes, "ledger.append"):
            try:
                return await self._append(envelopes, look_first=False)
            except asyncpg.UniqueViolationError as exc:
                if exc.constraint_name != _UNIQUE_EVENT:
                    raise
                return await self._append(envelopes, look_first=True)

    async def _append(self, envelopes: Sequence[Envelope], *, look_first: bool) -> int:
        now = self._clock.now()
        async with self._db.transaction() as conn:
            await conn.execute(sql_text("SELECT pg_advisory_xact_lock(:k)"), {"k": _APPEND_LOCK})
            present: set[Any] = set()
            if look_first:
                present.update(
                    (
                        await conn.execute(
                            sql_text(
                                "SELECT event_id FROM ledger_entries WHERE event_id = ANY(:ids)"
                            ),
                            {"ids": [e.event_id for e in envelopes]},
                        )
                    ).scalars()
                )
            fresh: list[Envelope] = []
            for envelope in envelopes:
                if envelope.event_id not in present:
                    present.add(envelope.event_id)
                    fresh.append(envelope)
            if not fresh:
                return 0
            state = await _load_state(conn, now)
            if state.tiled < state.size:
                await _catch_up_tiles(conn, state)
            if self._open_tiles is not None and self._open_tiles[0] == state.size:
                partial = self._open_tiles[1]
            else:
                partial = await _read_tiles(conn, tree.partial_tiles(state.size))
            tiles = tree.TileBuilder(state.size, partial)
            data_key = await keys.data_key_for(
                conn, self._master, now, len(fresh), self._key_policy
            )
            signer: keys.SigningKey | None = None
            if (state.size + len(fresh)) // CHECKPOINT_EVERY > state.size // CHECKPOINT_EVERY:
                signer = await keys.active_signing_key(conn, self._master, now)
            checkpoints: list[chain.Checkpoint] = []
            leaves: list[bytes] = []  # the new entries' leaf hashes, for the tree
            # Binary COPY inside this transaction (several times faster than INSERTs), fed
            # in small chunks as the entries are sealed: the database stores the first rows
            # while the next ones are sealed here.
            raw = await conn.get_raw_connection()
            await raw.driver_connection.copy_to_table(  # type: ignore[union-attr]
                "ledger_entries",
                source=self._sealed(
                    fresh, state, data_key, _iso(now), signer, checkpoints, now, leaves
                ),
                columns=_ENTRY_COLUMN_NAMES,
                format="binary",
            )
            changed = tiles.extend_leaves(leaves)
            await _write_tiles(conn, changed)
            state.tiled = tiles.size
            await _insert_checkpoints(conn, checkpoints)
            await _save_state(conn, state)
        partial = {t: changed.get(t) or partial[t] for t in tree.partial_tiles(tiles.size)}
        self._open_tiles = (tiles.size, partial)
        LEDGER_ENTRIES.inc(len(fresh))
        return len(fresh)

    async def _sealed(
        self,
        envelopes: list[Envelope],
        state: _State,
        data_key: keys.DataKey,
        recorded_at: str,
        signer: keys.SigningKey | None,
        checkpoints: list[chain.Checkpoint],
        now: datetime,
        leaves: list[bytes],
    ) -> AsyncIterator[bytes]:
        """The envelopes sealed and chained on ``state``, as binary COPY data for
        ``_ENTRY_COLUMN_NAMES`` in chunks of ``_COPY_CHUNK`` rows; a checkpoint is signed each
        time the size crosses a multiple of 1,000.

        A row is built from the entry's hash input, whose frames (``int32 length || bytes``)
        are binary COPY's own field format: after ``prev_hash``, the height and the event
        id's 36-character text, the input is the row's fields from ``event_type`` to
        ``ciphertext``, as they are."""
        aead = AESGCM(data_key.key)
        key_id = data_key.key_id
        uncounted: list[bytes] = []  # leaf hashes not in the Merkle accumulator yet
        rows: list[bytes] = [_COPY_HEADER]
        for envelope in envelopes:
            payload = envelope.to_dict()
            # The envelope's transport headers (the trace context) are not the event: the
            # entry is the same whether tracing was on or off.
            payload.pop("headers", None)
            event_id = payload["event_id"]
            event_type = envelope.event_type
            txn = envelope.transaction_id or ""
            nonce, ciphertext = chain.seal(
                aead, key_id, payload, event_id=event_id, event_type=event_type, transaction_id=txn
            )
            prev = state.head
            message = chain.hash_input(
                prev, state.size, event_id, event_type, txn, recorded_at, key_id, nonce, ciphertext
            )
            digest = hashlib.sha256(message).digest()
            assert len(event_id) == 36 and len(prev) == 32
            rows.append(
                b"".join(
                    (
                        _ROW_START,  # 10 fields, then the height's length (8)
                        message[32:40],  # the height
                        _UUID_LENGTH,
                        envelope.event_id.bytes,
                        message[80:],  # event_type ... ciphertext, framed
                        _HASH_LENGTH,
                        prev,
                        _HASH_LENGTH,
                        digest,
                    )
                )
            )
            leaf = hashlib.sha256(b"\x00" + digest).digest()  # once, for accumulator and tiles
            uncounted.append(leaf)
            leaves.append(leaf)
            state.head = digest
            state.size += 1
            if state.size % CHECKPOINT_EVERY == 0:
                assert signer is not None
                state.accumulator.extend_leaves(uncounted)
                uncounted.clear()
                checkpoints.append(self._checkpoint(signer, state, now))
            if len(rows) >= _COPY_CHUNK:
                yield b"".join(rows)
                rows.clear()
                await asyncio.sleep(0)  # the transport sends it; the database stores it
        rows.append(_COPY_TRAILER)
        yield b"".join(rows)
        state.accumulator.extend_leaves(uncounted)

    def _checkpoint(
        self, signer: keys.SigningKey, state: _State, now: datetime
    ) -> chain.Checkpoint:
        state.checkpoint_height = state.size
        state.checkpoint_at = now
        return chain.sign_checkpoint(
            signer.private,
            height=state.size,
            head_hash=state.head,
            merkle_root_=state.accumulator.root(),
            signed_at=_iso(now),
            signing_key_id=signer.key_id,
        )

    async def checkpoint_if_due(self, *, force: bool = False) -> chain.Checkpoint | None:
        """Sign a checkpoint over uncovered entries once 10 s passed (or when forced)."""
        now = self._clock.now()
        async with self._db.transaction() as conn:
            await conn.execute(sql_text("SELECT pg_advisory_xact_lock(:k)"), {"k": _APPEND_LOCK})
            state = await _load_state(conn, now)
            if state.size == state.checkpoint_height:
                return None
            waited = (now - state.checkpoint_at).total_seconds()
            if not force and waited < CHECKPOINT_INTERVAL_S:
                return None
            signer = await keys.active_signing_key(conn, self._master, now)
            cp = self._checkpoint(signer, state, now)
            await _insert_checkpoints(conn, [cp])
            await _save_state(conn, state)
            return cp

    async def checkpoint_age_s(self) -> float:
        """Seconds since the last checkpoint while entries wait for one; 0 when every entry
        is covered (an idle ledger is not a stale one)."""
        return (await self.size_and_checkpoint_age())[1]

    async def size_and_checkpoint_age(self) -> tuple[int, float]:
        """The ledger's size, and :meth:`checkpoint_age_s`, in one read."""
        now = self._clock.now()
        async with self._db.connection() as conn:
            row = (
                await conn.execute(
                    sql_text(
                        "SELECT size, checkpoint_height, checkpoint_at FROM ledger_state"
                        " WHERE id = 1"
                    )
                )
            ).first()
        if row is None:
            return 0, 0.0
        if int(row.size) == int(row.checkpoint_height):
            return int(row.size), 0.0
        return int(row.size), max(0.0, float((now - row.checkpoint_at).total_seconds()))

    def stop(self) -> None:
        self._stopping.set()

    async def run_checkpointer(self, every_s: float = 1.0) -> None:
        async def step() -> int:
            await self.checkpoint_if_due()
            return 0  # look again in every_s, checkpoint or not

        await poll_until_stopped("ledger checkpointer", step, self._stopping, lambda: every_s)


# --------------------------------------------------------------------------- reading


def _entry(row: Any) -> chain.LedgerEntry:
    return chain.LedgerEntry(
        height=int(row.height),
        event_id=str(row.event_id),
        event_type=row.event_type,
        transaction_id=row.transaction_id,
        recorded_at=row.recorded_at,
        key_id=row.key_id,
        nonce=bytes(row.nonce),
        ciphertext=bytes(row.ciphertext),
        prev_hash=bytes(row.prev_hash),
        entry_hash=bytes(row.entry_hash),
    )


def _checkpoint_of(row: Any) -> chain.Checkpoint:
    return chain.Checkpoint(
        int(row.height),
        bytes(row.head_hash),
        bytes(row.merkle_root),
        row.signed_at,
        row.signing_key_id,
        bytes(row.signature),
    )


_ENTRY_COLUMNS = (
    "height, event_id, event_type, transaction_id, recorded_at, key_id, nonce, ciphertext,"
    " prev_hash, entry_hash"
)
_CHECKPOINT_COLUMNS = "height, head_hash, merkle_root, signed_at, signing_key_id, signature"


async def _checkpoints_and_top(
    conn: AsyncConnection, from_height: int
) -> tuple[Iterator[chain.Checkpoint], int]:
    """The checkpoints above ``from_height`` and then the highest entry: read in this
    order, every checkpoint's entries are within the height returned."""
    checkpoints = [
        _checkpoint_of(r)
        for r in await conn.execute(
            sql_text(
                f"SELECT {_CHECKPOINT_COLUMNS} FROM ledger_checkpoints WHERE height > :h"
                " ORDER BY height"
            ),
            {"h": from_height},
        )
    ]
    top = (
        await conn.execute(sql_text("SELECT COALESCE(max(height), -1) FROM ledger_entries"))
    ).scalar_one()
    return iter(checkpoints), int(top)


_ENTRIES_PAGE = (
    f"SELECT {_ENTRY_COLUMNS} FROM ledger_entries WHERE height >= $1 AND height < $2"
    " ORDER BY height"
)


async def _cosignatures_above(conn: AsyncConnection, from_height: int) -> dict[int, list[Any]]:
    out: dict[int, list[Any]] = {}
    rows = await conn.execute(
        sql_text(
            "SELECT height, witness_key_id, cosigned_at, signature FROM ledger_cosignatures"
            " WHERE height > :h ORDER BY height, witness_key_id"
        ),
        {"h": from_height},
    )
    for r in rows:
        out.setdefault(int(r.height), []).append(
            chain.Cosignature(int(r.height), r.witness_key_id, r.cosigned_at, bytes(r.signature))
        )
    return out


async def _v2_from(conn: AsyncConnection) -> int:
    found = (await conn.execute(sql_text("SELECT v2_from FROM ledger_state WHERE id = 1"))).first()
    return int(found.v2_from) if found is not None else 0


def _format_of(height: int, v2_from: int) -> int:
    return 2 if height >= v2_from else 1


ExportItem = chain.LedgerEntry | chain.Checkpoint | dict[str, Any]


async def _stream(db: Database, from_height: int, chunk: int = 5_000) -> AsyncIterator[ExportItem]:
    """The export from ``from_height`` (SPEC §6): a header, then the entries in pages of
    ``chunk``, each checkpoint h right after entry h-1 and followed by its consistency proof
    from the checkpoint before it (when that one is in the export) and its cosignatures;
    up to the height found at the start. Uses the raw asyncpg connection: reading the
    chain is bound by per-row overhead."""
    await ensure_tree(db)
    async with db.connection() as conn:
        checkpoints, top = await _checkpoints_and_top(conn, from_height)
        cosignatures = await _cosignatures_above(conn, from_height)
        yield {
            "type": "header",
            "format": 2,
            "from_height": from_height,
            "v2_from_height": await _v2_from(conn),
        }
        raw = (await conn.get_raw_connection()).driver_connection
        assert raw is not None
        previous: chain.Checkpoint | None = None

        async def after(c: chain.Checkpoint) -> list[dict[str, Any]]:
            lines: list[dict[str, Any]] = []
            proof: list[bytes] | None = None
            if previous is not None:
                with contextlib.suppress(KeyError, LookupError, ValueError):
                    # A stored tree damaged (or a checkpoint above the entries, tampered):
                    # the line is left out, and the verifier names the checkpoint.
                    proof = await _consistency(conn, previous.height, c.height)
            if previous is not None and proof is not None:
                lines.append(
                    {
                        "type": "consistency",
                        "first": previous.height,
                        "second": c.height,
                        "proof": [h.hex() for h in proof],
                    }
                )
            lines += [cs.to_export() for cs in cosignatures.get(c.height, [])]
            return lines

        next_cp = next(checkpoints, None)
        for start in range(from_height, top + 1, chunk):
            for r in await raw.fetch(_ENTRIES_PAGE, start, start + chunk):
                while next_cp is not None and next_cp.height <= r[0]:
                    yield next_cp
                    for line in await after(next_cp):
                        yield line
                    previous, next_cp = next_cp, next(checkpoints, None)
                yield chain.LedgerEntry(
                    r[0], str(r[1]), r[2], r[3], r[4], r[5], r[6], r[7], r[8], r[9]
                )
        while next_cp is not None:
            yield next_cp
            for line in await after(next_cp):
                yield line
            previous, next_cp = next_cp, next(checkpoints, None)


# Verification streams the entries as binary COPY, whose fields are sent as
# ``int32 length || bytes``: exactly SPEC §6's frame(). Selected in this order, each row
# holds the entry's whole hash input as one run of bytes, from ``prev_hash || height`` (one
# column) to the end of the ciphertext's frame, and the first column says how long that run
# is. Python reads one length per entry and hashes the run in place (hashlib is several
# times faster than PostgreSQL's sha256()) while the database streams the next rows on the
# other core. A hash column that is not 32 bytes long (tampered) is sent as its SHA-256,
# which keeps the layout fixed and cannot match. Text goes out as UTF-8 (the client
# encoding); a uuid's text is always 36 bytes.
_HASH_INPUTS = """
SELECT 40 + 28 + 36 + octet_length(event_type) + octet_length(transaction_id)
         + octet_length(recorded_at) + octet_length(key_id) + octet_length(nonce)
         + octet_length(ciphertext),
       CASE WHEN octet_length(prev_hash) = 32 THEN prev_hash ELSE sha256(prev_hash) END
         || int8send(height),
       event_id::text, event_type, transaction_id, recorded_at, key_id, nonce, ciphertext,
       CASE WHEN octet_length(entry_hash) = 32 THEN entry_hash ELSE sha256(entry_hash) END
FROM ledger_entries WHERE height >= {first} AND height <= {last} ORDER BY height
"""
_VERIFY_PAGE = 16_384
_VERIFY_LANES = 2
_I32 = struct.Struct(">i").unpack_from


class _HashInputRows:
    """Cuts PostgreSQL's binary COPY stream of ``_HASH_INPUTS`` into rows
    ``(hash input, entry_hash)``; a row may span two chunks, a page is one COPY."""

    def __init__(self) -> None:
        self._rest = b""
        self._header = True

    def feed(self, chunk: bytes) -> list[tuple[bytes, bytes]]:
        buf = self._rest + chunk if self._rest else chunk
        pos, size = 0, len(buf)
        rows: list[tuple[bytes, bytes]] = []
        while True:
            if self._header:  # each COPY (page) starts with one
                if pos + 19 > size:
                    break
                if buf[pos : pos + 11] != _COPY_SIGNATURE:
                    raise ValueError("not a binary COPY stream")
                pos += 19 + _I32(buf, pos + 15)[0]
                self._header = False
            # A row: int16 field count (10), the run's length as a field (4 + 4 bytes), the
            # run (its first field's length, 4 bytes, is not part of it), int32 32 and the
            # entry hash. The count -1 ends the COPY.
            if pos + 10 > size:
                break
            if buf[pos] == 0xFF:
                pos += 2
                self._header = True
                continue
            run_end = pos + 14 + _I32(buf, pos + 6)[0]
            end = run_end + 36
            if end > size:
                break
            # Copies, not memoryviews: a slice of bytes is cheaper to compare and hash.
            rows.append((buf[pos + 14 : run_end], buf[run_end + 4 : end]))
            pos = end
        self._rest = buf[pos:]
        return rows


class _TileCheck:
    """Checks the stored tree (what inclusion and consistency proofs are read from) in the
    verification pass, without hashing anything again: the verifier's leaf hashes are the
    bottom tiles, and the nodes of levels 8, 16, … its Merkle accumulator makes are the
    upper tiles' rows. Each tile is compared once complete, a page at a time on a
    connection of its own; the tiles still growing, at the end."""

    def __init__(self, db: Database) -> None:
        self._db = db
        self._rows = tree.TileRows()
        self._pending: dict[tree.TileId, bytes] = {}
        self._next_leaf = 0
        self.failure: str | None = None

    async def start(self, height: int) -> None:
        """From ``height``: the stored partial tiles as they were at that height (checked
        by the run that verified up to it)."""
        self._next_leaf = height
        counts = tree.partial_tiles(height)
        async with self._db.connection() as conn:
            stored = await _read_tiles(conn, counts)
        for (t, index), n in counts.items():
            data = stored.get((t, index), b"")
            if len(data) < n * 32:
                self.failure = f"the stored tree lacks tile ({t}, {index}) below height {height}"
            self._rows.open[t] = (index, bytearray(data[: n * 32]))

    def _add(self, t: int, index: int, nodes: list[bytes]) -> None:
        if self.failure is not None:
            return
        try:
            changed = self._rows.add(t, index, nodes)
        except ValueError as exc:
            self.failure = str(exc)
            return
        self._pending.update((tile_id, bytes(data)) for tile_id, data, full in changed if full)

    def leaves(self, leaves: list[bytes]) -> None:
        first, self._next_leaf = self._next_leaf, self._next_leaf + len(leaves)
        self._add(0, first, leaves)

    def node(self, level: int, index: int, hash_: bytes) -> None:
        self._add(level // tree.TILE_HEIGHT, index, [hash_])

    async def compare(self, *, final: bool = False) -> None:
        if self.failure is not None:
            return
        due, self._pending = self._pending, {}
        if final:
            due |= self._rows.growing()
        if not due:
            return
        async with self._db.connection() as conn:
            stored = await _read_tiles(conn, due)
        for tile_id in sorted(due):
            # A tile still growing at the height verified may have grown since: a prefix.
            if stored.get(tile_id, b"")[: len(due[tile_id])] != due[tile_id]:
                level, index = tile_id
                self.failure = f"the stored tree's tile ({level}, {index}) differs from the entries"
                return


async def _verify_stored(
    db: Database,
    verifier: chain.ChainVerifier,
    on_checkpoint: Callable[[chain.Checkpoint], None],
    tiles: _TileCheck | None = None,
) -> None:
    """Feed ``verifier`` every stored entry from its ``next_height`` and, in order, every
    checkpoint after it; stops at the first fault. With ``tiles``, the stored tree is
    compared as the pages go by."""
    async with db.connection() as conn:
        pending, top = await _checkpoints_and_top(conn, verifier.next_height)
        next_cp = next(pending, None)

        def check_due_checkpoints() -> bool:
            nonlocal next_cp
            while next_cp is not None and next_cp.height <= verifier.next_height:
                if not verifier.checkpoint(next_cp):
                    return False
                on_checkpoint(next_cp)
                next_cp = next(pending, None)
            return True

        # Pages of entries are read as binary COPY by two tasks on two connections, each
        # page into its own bounded queue, and checked in order: the database streams the
        # next page on the other core while this one is hashed. To stop early the readers
        # drop the rest of their page: cancelling a COPY from its sink leaves asyncpg's
        # connection unusable if the server already sent everything.
        # A reader's failure (the database gone) is put into every empty queue, so that
        # the check waiting on one wakes up and raises it.
        firsts = range(verifier.next_height, top + 1, _VERIFY_PAGE)
        pages: list[asyncio.Queue[bytes | Exception | None]] = [asyncio.Queue(64) for _ in firsts]
        failures: list[Exception] = []
        stop = False

        async def read(lane: int) -> None:
            async def sink(chunk: bytes) -> None:
                if not stop:
                    await page.put(chunk)

            try:
                async with contextlib.AsyncExitStack() as stack:
                    lane_conn = (
                        conn if lane == 0 else await stack.enter_async_context(db.connection())
                    )
                    raw = (await lane_conn.get_raw_connection()).driver_connection
                    assert raw is not None
                    for index in range(lane, len(pages), _VERIFY_LANES):
                        if stop:
                            return
                        page, first = pages[index], firsts[index]
                        last = min(first + _VERIFY_PAGE - 1, top)
                        await raw.copy_from_query(
                            _HASH_INPUTS.format(first=first, last=last),
                            output=sink,
                            format="binary",
                        )
                        if not stop:
                            await page.put(None)
            except Exception as exc:
                failures.append(exc)
                for waiting in pages:
                    if waiting.empty():
                        waiting.put_nowait(exc)

        if not check_due_checkpoints():
            return
        readers = [asyncio.create_task(read(lane)) for lane in range(_VERIFY_LANES)]
        rows_of = _HashInputRows()
        ok = True
        try:
            for queue in pages:
                while ok:
                    if failures and queue.empty():
                        raise failures[0]
                    chunk = await queue.get()
                    if chunk is None:
                        break
                    if isinstance(chunk, Exception):
                        raise chunk
                    rows = rows_of.feed(chunk)
                    done = 0
                    while ok and done < len(rows):
                        # Entries up to the next checkpoint's height, then that checkpoint.
                        take = len(rows) - done
                        if next_cp is not None:
                            take = min(take, next_cp.height - verifier.next_height)
                        run = rows[done : done + take]
                        ok = verifier.hash_inputs(run) and check_due_checkpoints()
                        done += take
                    await asyncio.sleep(0)  # let the loop read the sockets
                if not ok:
                    break
                if tiles is not None:
                    await tiles.compare()
        finally:
            stop = True
            while not all(reader.done() for reader in readers):
                for queue in pages:
                    while not queue.empty():
                        queue.get_nowait()  # unblocks a reader waiting on a full queue
                await asyncio.sleep(0.001)
        if not ok or not check_due_checkpoints():
            return
        # Checkpoints above the last entry vouch for entries that are not there: a fault.
        while next_cp is not None:
            if not verifier.checkpoint(next_cp):
                return
            on_checkpoint(next_cp)
            next_cp = next(pending, None)


def _line(item: ExportItem) -> dict[str, Any]:
    return item if isinstance(item, dict) else item.to_export()


async def export_lines(db: Database, from_height: int = 0) -> AsyncIterator[dict[str, Any]]:
    async for item in _stream(db, from_height):
        yield _line(item)


async def verify_ledger(
    db: Database,
    clock: Clock,
    *,
    full: bool = False,
    trusted_keys: Sequence[Ed25519PublicKey] | None = None,
) -> chain.VerifyResult:
    """Verify the stored chain; resumes after the last verified checkpoint unless ``full``.

    ``trusted_keys``: the checkpoint keys the caller trusts (an auditor's PEM files); by
    default the public keys stored beside the ledger, which whoever can write the
    database could also replace."""
    async with db.connection() as conn:
        public = {} if trusted_keys is not None else await keys.public_keys(conn)
        resume = None
        if not full:
            resume = (
                await conn.execute(
                    sql_text("SELECT height, head_hash, frontier FROM ledger_verified WHERE id = 1")
                )
            ).first()
    verifier = chain.ChainVerifier(public, list(trusted_keys or []))
    if resume is not None:
        verifier.next_height = int(resume.height)
        verifier.prev_hash = bytes(resume.head_hash)
        verifier.accumulator = chain.MerkleAccumulator(
            int(resume.height), [bytes(f) for f in resume.frontier]
        )
    last_good: tuple[int, bytes, list[bytes]] | None = None
    last_root = b""

    def verified(checkpoint: chain.Checkpoint) -> None:
        nonlocal last_good, last_root
        last_good = (checkpoint.height, checkpoint.head_hash, list(verifier.accumulator.frontier))
        last_root = checkpoint.merkle_root

    await ensure_tree(db)
    tiles = _TileCheck(db)
    await tiles.start(verifier.next_height)
    verifier.on_leaves, verifier.on_node = tiles.leaves, tiles.node
    await _verify_stored(db, verifier, verified, tiles)
    result = verifier.result()
    if result.valid:
        await tiles.compare(final=True)
    if result.valid:
        # The chain holds; and the stored tree that proofs are read from? Every tile of
        # the entries verified was compared above; and its root at the last checkpoint.
        bad_tree = tiles.failure
        if (
            bad_tree is None
            and last_good is not None
            and await _tree_root(db, last_good[0]) != last_root
        ):
            bad_tree = f"the stored tree's root at checkpoint {last_good[0]} is not signed"
        if bad_tree is not None:
            at = (last_good[0] if last_good else verifier.next_height) - 1
            return chain.VerifyResult(False, result.entries, result.checkpoints, at, bad_tree)
    if result.valid and last_good is not None:
        async with db.transaction() as conn:
            await conn.execute(
                sql_text(
                    "INSERT INTO ledger_verified (id, height, head_hash, frontier, verified_at)"
                    " VALUES (1, :h, :hh, :f, :at) ON CONFLICT (id) DO UPDATE SET"
                    " height = EXCLUDED.height, head_hash = EXCLUDED.head_hash,"
                    " frontier = EXCLUDED.frontier, verified_at = EXCLUDED.verified_at"
                ),
                {"h": last_good[0], "hh": last_good[1], "f": last_good[2], "at": clock.now()},
            )
    return result


async def _tree_root(db: Database, size: int) -> bytes:
    """The root of the tree of ``size`` entries as the stored tiles give it."""
    await ensure_tree(db)
    async with db.connection() as conn:
        tiles = await _read_tiles(conn, tree.tiles_for([(0, size)]))
    try:
        return tree.node_cache(tiles).range_hash(0, size)
    except (KeyError, LookupError):
        return b""  # tiles missing or short: not the signed root


async def public_key_pems(db: Database) -> dict[str, str]:
    async with db.connection() as conn:
        rows = await conn.execute(
            sql_text("SELECT key_id, public_pem FROM ledger_signing_keys ORDER BY created_at")
        )
        return {r.key_id: r.public_pem for r in rows}


# --------------------------------------------------------------------------- the tree


async def ensure_tree(db: Database) -> None:
    """Build the stored tree of an older ledger's entries if it lags (once, under the
    append lock); a no-op when the tree covers every entry, as it does from then on."""
    async with db.connection() as conn:
        row = (
            await conn.execute(sql_text("SELECT size, tiled FROM ledger_state WHERE id = 1"))
        ).first()
    if row is None or int(row.tiled) >= int(row.size):
        return
    async with db.transaction() as conn:
        await conn.execute(sql_text("SELECT pg_advisory_xact_lock(:k)"), {"k": _APPEND_LOCK})
        state = await _load_state(conn, datetime.now(UTC))
        await _catch_up_tiles(conn, state)
        await conn.execute(
            sql_text("UPDATE ledger_state SET tiled = :t WHERE id = 1"), {"t": state.tiled}
        )


async def _tree_size(conn: AsyncConnection) -> int:
    row = (await conn.execute(sql_text("SELECT tiled FROM ledger_state WHERE id = 1"))).first()
    return int(row.tiled) if row is not None else 0


async def _consistency(conn: AsyncConnection, first: int, second: int) -> list[bytes]:
    ranges = tree.consistency_ranges(first, second)
    tiles = await _read_tiles(conn, tree.tiles_for(ranges))
    return await asyncio.to_thread(tree.consistency_proof, first, second, tiles)  # off the loop


class ProofUnavailable(ValueError):
    """The sizes asked for are not trees the ledger has (yet)."""


async def consistency_proof(db: Database, first: int, second: int) -> list[bytes]:
    """RFC 9162 §2.1.4 proof that the tree of ``second`` entries extends that of ``first``;
    reads O(log n) tiles."""
    await ensure_tree(db)
    async with db.connection() as conn:
        size = await _tree_size(conn)
        if not 0 < first <= second <= size:
            raise ProofUnavailable(
                f"need 0 < first <= second <= {size} (the ledger's size), got {first}, {second}"
            )
        return await _consistency(conn, first, second)


async def checkpoint_at(db: Database, height: int) -> tuple[chain.Checkpoint, list[Any]] | None:
    """The checkpoint of that height and its cosignatures."""
    async with db.connection() as conn:
        row = (
            await conn.execute(
                sql_text(f"SELECT {_CHECKPOINT_COLUMNS} FROM ledger_checkpoints WHERE height = :h"),
                {"h": height},
            )
        ).first()
        if row is None:
            return None
        cosigs = (await _cosignatures_above(conn, height - 1)).get(height, [])
    return _checkpoint_of(row), cosigs


async def latest_checkpoint(
    db: Database, *, witnesses_required: int = 0
) -> chain.Checkpoint | None:
    """The newest checkpoint; with ``witnesses_required`` N > 0, the newest *published* one,
    cosigned by at least N of the witnesses the operator registered."""
    async with db.connection() as conn:
        return await _latest_checkpoint(conn, witnesses_required)


async def _latest_checkpoint(
    conn: AsyncConnection, witnesses_required: int
) -> chain.Checkpoint | None:
    if witnesses_required <= 0:
        query = f"SELECT {_CHECKPOINT_COLUMNS} FROM ledger_checkpoints ORDER BY height DESC LIMIT 1"
    else:
        query = (
            f"SELECT {_CHECKPOINT_COLUMNS} FROM ledger_checkpoints WHERE height ="
            " (SELECT height FROM ledger_cosignatures GROUP BY height"
            "  HAVING count(*) >= :n ORDER BY height DESC LIMIT 1)"
        )
    row = (await conn.execute(sql_text(query), {"n": witnesses_required})).first()
    return _checkpoint_of(row) if row is not None else None


async def ledger_page(db: Database, from_height: int, limit: int) -> list[dict[str, Any]]:
    """Export lines from ``from_height``: at most ``limit`` entries, with the checkpoints
    (and their consistency proofs and cosignatures) up to the last entry's."""
    lines: list[dict[str, Any]] = []
    end = from_height + limit
    async for item in _stream(db, from_height):
        if isinstance(item, chain.LedgerEntry) and item.height >= end:
            break
        if isinstance(item, chain.Checkpoint) and item.height > end:
            break
        line = _line(item)
        if (
            line["type"] in ("consistency", "cosignature")
            and line.get("second", line.get("height", 0)) > end
        ):
            break
        lines.append(line)
    return lines


async def transaction_audit(
    db: Database, master: MasterKey, transaction_id: str, *, witnesses_required: int = 0
) -> dict[str, Any]:
    """The decrypted events of a transaction, each with its inclusion proof in the tree of
    the latest published checkpoint (entries newer than it carry no proof yet).

    One connection and five reads, whatever the ledger's size: the state, the checkpoint,
    the transaction's entries (by index), the O(log n) tiles their proofs need, and each
    data key once."""
    async with db.connection() as conn:
        state = (
            await conn.execute(sql_text("SELECT size, tiled, v2_from FROM ledger_state"))
        ).first()
    if state is not None and int(state.tiled) < int(state.size):
        await ensure_tree(db)  # an older ledger's first read builds its tree
    v2_from = int(state.v2_from) if state is not None else 0
    async with db.connection() as conn:
        checkpoint = await _latest_checkpoint(conn, witnesses_required)
        rows = (
            await conn.execute(
                sql_text(
                    f"SELECT {_ENTRY_COLUMNS} FROM ledger_entries WHERE transaction_id = :t"
                    " ORDER BY height"
                ),
                {"t": transaction_id},
            )
        ).all()
        entries = [_entry(row) for row in rows]
        size = checkpoint.height if checkpoint is not None else 0
        ranges = {
            e.height: tree.inclusion_ranges(e.height, size) for e in entries if e.height < size
        }
        tiles = await _read_tiles(conn, tree.tiles_for(r for rs in ranges.values() for r in rs))
        nodes = tree.node_cache(tiles)
        data_keys: dict[str, keys.DataKey | None] = {}
        for key_id in {e.key_id for e in entries}:
            try:
                data_keys[key_id] = await keys.data_key(conn, master, key_id)
            except keys.KeyDestroyed:
                data_keys[key_id] = None

    def decrypt_and_prove() -> list[dict[str, Any]]:
        """The CPU part (AES-GCM, the proofs' hashes), run off the event loop."""
        events = []
        for entry in entries:
            key = data_keys[entry.key_id]
            payload: dict[str, Any] | None = None
            unreadable = "data key destroyed (crypto-shredded)" if key is None else None
            if key is not None:
                payload = chain.open_sealed(
                    key.key,
                    key.key_id,
                    entry.nonce,
                    entry.ciphertext,
                    event_id=entry.event_id,
                    event_type=entry.event_type,
                    transaction_id=entry.transaction_id,
                    fmt=_format_of(entry.height, v2_from),
                )
            proof = None
            if entry.height in ranges:
                path = tree.inclusion_proof(entry.height, size, tiles, nodes=nodes)
                proof = {
                    "leaf_index": entry.height,
                    "tree_size": size,
                    "audit_path": [p.hex() for p in path],
                }
            events.append(
                {
                    "entry": entry.to_export(),
                    "event": payload,
                    "unreadable": unreadable,
                    "inclusion_proof": proof,
                }
            )
        return events

    events = await asyncio.to_thread(decrypt_and_prove)
    return {
        "transaction_id": transaction_id,
        "events": events,
        "checkpoint": checkpoint.to_export() if checkpoint else None,
    }
