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
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from compliance import chain, keys
from core.bus.base import Subscription
from core.clock import Clock
from core.crypto import MasterKey
from core.events import Envelope, Topic
from core.metrics import LEDGER_ENTRIES
from core.storage import Database

__all__ = [
    "CHECKPOINT_EVERY",
    "LedgerWriter",
    "export_lines",
    "latest_checkpoint",
    "ledger_page",
    "public_key_pems",
    "transaction_audit",
    "verify_ledger",
]

_log = logging.getLogger(__name__)
T = TypeVar("T")
_APPEND_LOCK = 0x5550_4C47  # "UPLG"
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


def _iso(at: datetime) -> str:
    return at.isoformat(timespec="microseconds").replace("+00:00", "Z")


@dataclass
class _State:
    size: int
    head: bytes
    accumulator: chain.MerkleAccumulator
    checkpoint_height: int
    checkpoint_at: datetime


async def _load_state(conn: AsyncConnection, now: datetime) -> _State:
    row = (
        await conn.execute(
            text(
                "SELECT size, head_hash, frontier, checkpoint_height, checkpoint_at"
                " FROM ledger_state WHERE id = 1"
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
    )


async def _save_state(conn: AsyncConnection, state: _State) -> None:
    await conn.execute(
        text(
            "INSERT INTO ledger_state (id, size, head_hash, frontier, checkpoint_height,"
            " checkpoint_at) VALUES (1, :s, :h, :f, :ch, :cat) ON CONFLICT (id) DO UPDATE SET"
            " size = EXCLUDED.size, head_hash = EXCLUDED.head_hash,"
            " frontier = EXCLUDED.frontier, checkpoint_height = EXCLUDED.checkpoint_height,"
            " checkpoint_at = EXCLUDED.checkpoint_at"
        ),
        {
            "s": state.size,
            "h": state.head,
            "f": state.accumulator.frontier,
            "ch": state.checkpoint_height,
            "cat": state.checkpoint_at,
        },
    )


async def _insert_checkpoints(conn: AsyncConnection, checkpoints: list[chain.Checkpoint]) -> None:
    for cp in checkpoints:
        await conn.execute(
            text(
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

    def __init__(self, db: Database, master_key: MasterKey, clock: Clock) -> None:
        self._db = db
        self._master = master_key
        self._clock = clock
        self._stopping = asyncio.Event()

    def subscription(self) -> Subscription:
        return Subscription(
            consumer=self.consumer,
            topics=tuple(t.value for t in Topic),
            handler=lambda envelope: self.append([envelope]),
            batch_handler=self.append,
        )

    async def append(self, envelopes: Sequence[Envelope]) -> int:
        """Append what is not in the chain yet; returns how many entries were added."""
        now = self._clock.now()
        async with self._db.transaction() as conn:
            await conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _APPEND_LOCK})
            ids = [e.event_id for e in envelopes]
            present = set(
                (
                    await conn.execute(
                        text("SELECT event_id FROM ledger_entries WHERE event_id = ANY(:ids)"),
                        {"ids": ids},
                    )
                ).scalars()
            )
            state = await _load_state(conn, now)
            data_key = await keys.active_data_key(conn, self._master, now)
            signer: keys.SigningKey | None = None
            recorded_at = _iso(now)
            aead = AESGCM(data_key.key)
            records: list[tuple[Any, ...]] = []
            checkpoints: list[chain.Checkpoint] = []
            key_id = data_key.key_id
            for envelope in envelopes:
                if envelope.event_id in present:
                    continue
                present.add(envelope.event_id)
                event_id = str(envelope.event_id)
                event_type = envelope.event_type
                txn = envelope.transaction_id or ""
                nonce, ciphertext = chain.seal(
                    aead,
                    key_id,
                    envelope.to_dict(),
                    event_id=event_id,
                    event_type=event_type,
                    transaction_id=txn,
                )
                prev = state.head
                digest = chain.entry_hash(
                    prev,
                    state.size,
                    event_id,
                    event_type,
                    txn,
                    recorded_at,
                    key_id,
                    nonce,
                    ciphertext,
                )
                records.append(
                    (
                        state.size,
                        envelope.event_id,
                        event_type,
                        txn,
                        recorded_at,
                        key_id,
                        nonce,
                        ciphertext,
                        prev,
                        digest,
                    )
                )
                state.accumulator.append(digest)
                state.head = digest
                state.size += 1
                if state.size % CHECKPOINT_EVERY == 0:
                    signer = signer or await keys.active_signing_key(conn, self._master, now)
                    checkpoints.append(self._checkpoint(signer, state, now))
            if not records:
                return 0
            # Binary COPY inside this transaction: several times faster than INSERTs.
            raw = await conn.get_raw_connection()
            await raw.driver_connection.copy_records_to_table(  # type: ignore[union-attr]
                "ledger_entries", columns=_ENTRY_COLUMN_NAMES, records=records
            )
            await _insert_checkpoints(conn, checkpoints)
            await _save_state(conn, state)
        LEDGER_ENTRIES.inc(len(records))
        return len(records)

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
            await conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _APPEND_LOCK})
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

    def stop(self) -> None:
        self._stopping.set()

    async def run_checkpointer(self, every_s: float = 1.0) -> None:
        while not self._stopping.is_set():
            try:
                await self.checkpoint_if_due()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                _log.warning("ledger checkpointer: %s", exc, exc_info=True)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), every_s)


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


async def _paged(
    db: Database,
    from_height: int,
    sql: str,
    chunk: int,
    convert: Callable[[Any], T],
    lanes: int = 1,
) -> AsyncIterator[T | chain.Checkpoint]:
    """Pages of ``sql`` (params: first height, end height exclusive) converted row by row,
    with each checkpoint h right after entry h-1 (the export order), up to the height found
    at the start. With ``lanes`` > 1 that many pages are fetched at once on as many
    connections, so the database works on the next pages (on other cores) while this one
    is consumed. Uses raw asyncpg connections: reading the chain is bound by per-row
    overhead."""
    async with contextlib.AsyncExitStack() as stack:
        conn = await stack.enter_async_context(db.connection())
        checkpoints = iter(
            [
                _checkpoint_of(r)
                for r in await conn.execute(
                    text(
                        f"SELECT {_CHECKPOINT_COLUMNS} FROM ledger_checkpoints WHERE height > :h"
                        " ORDER BY height"
                    ),
                    {"h": from_height},
                )
            ]
        )
        top = (
            await conn.execute(text("SELECT COALESCE(max(height), -1) FROM ledger_entries"))
        ).scalar_one()
        raws: list[Any] = [(await conn.get_raw_connection()).driver_connection]
        for _ in range(lanes - 1):
            extra = await stack.enter_async_context(db.connection())
            raws.append((await extra.get_raw_connection()).driver_connection)
        assert all(raw is not None for raw in raws)
        free = list(raws)
        starts = iter(range(from_height, int(top) + 1, chunk))
        in_flight: list[tuple[Any, asyncio.Task[list[Any]]]] = []

        def refill() -> None:
            while free:
                start = next(starts, None)
                if start is None:
                    return
                raw = free.pop()
                in_flight.append((raw, asyncio.create_task(raw.fetch(sql, start, start + chunk))))

        next_cp = next(checkpoints, None)
        try:
            refill()
            while in_flight:
                raw, task = in_flight.pop(0)
                rows = await task
                free.append(raw)
                refill()
                for n, row in enumerate(rows, 1):
                    while next_cp is not None and next_cp.height <= row[0]:
                        yield next_cp
                        next_cp = next(checkpoints, None)
                    yield convert(row)
                    if lanes > 1 and n % 250 == 0:
                        # Let the loop read the pages in flight: a consumer that never
                        # awaits would leave their sockets full and the database idle.
                        await asyncio.sleep(0)
        finally:
            for _, task in in_flight:
                task.cancel()
            if in_flight:
                await asyncio.gather(*(t for _, t in in_flight), return_exceptions=True)
        while next_cp is not None:
            yield next_cp
            next_cp = next(checkpoints, None)


_ENTRIES_PAGE = (
    f"SELECT {_ENTRY_COLUMNS} FROM ledger_entries WHERE height >= $1 AND height < $2"
    " ORDER BY height"
)


def _stream(db: Database, from_height: int) -> AsyncIterator[chain.LedgerEntry | chain.Checkpoint]:
    def entry(r: Any) -> chain.LedgerEntry:
        return chain.LedgerEntry(r[0], str(r[1]), r[2], r[3], r[4], r[5], r[6], r[7], r[8], r[9])

    return _paged(db, from_height, _ENTRIES_PAGE, 5_000, entry)


# SPEC §6's entry hash, computed by PostgreSQL next to the data: verification then moves
# 32-byte hashes into Python instead of every ciphertext. Same bytes as chain.entry_hash:
# int8send/int4send are big-endian, strings are UTF-8 (the database encoding).
_HASHED_ENTRIES = """
SELECT height, prev_hash, entry_hash,
       sha256(prev_hash || int8send(height)
              || int4send(octet_length(e)) || e || int4send(octet_length(t)) || t
              || int4send(octet_length(x)) || x || int4send(octet_length(r)) || r
              || int4send(octet_length(k)) || k
              || int4send(octet_length(nonce)) || nonce
              || int4send(octet_length(ciphertext)) || ciphertext) = entry_hash AS ok
FROM (SELECT height, prev_hash, entry_hash, nonce, ciphertext,
             convert_to(event_id::text, 'UTF8') AS e, convert_to(event_type, 'UTF8') AS t,
             convert_to(transaction_id, 'UTF8') AS x, convert_to(recorded_at, 'UTF8') AS r,
             convert_to(key_id, 'UTF8') AS k
      FROM ledger_entries WHERE height >= $1 AND height < $2 ORDER BY height) AS page
"""


def _stream_hashed(
    db: Database, from_height: int
) -> AsyncIterator[tuple[int, bytes, bytes, bool] | chain.Checkpoint]:
    """(height, prev_hash, entry_hash, hash_ok) per entry, with the checkpoints in order."""
    # Two pages in flight on two connections: PostgreSQL hashes the next page on the other
    # core while this one is checked (1.3-1.5x one lane on this machine).
    return _paged(
        db, from_height, _HASHED_ENTRIES, 2_500, lambda r: (r[0], r[1], r[2], r[3]), lanes=2
    )


async def export_lines(db: Database, from_height: int = 0) -> AsyncIterator[dict[str, Any]]:
    async for item in _stream(db, from_height):
        yield item.to_export()


async def verify_ledger(db: Database, clock: Clock, *, full: bool = False) -> chain.VerifyResult:
    """Verify the stored chain; resumes after the last verified checkpoint unless ``full``."""
    async with db.connection() as conn:
        public = await keys.public_keys(conn)
        resume = None
        if not full:
            resume = (
                await conn.execute(
                    text("SELECT height, head_hash, frontier FROM ledger_verified WHERE id = 1")
                )
            ).first()
    verifier = chain.ChainVerifier(public)
    if resume is not None:
        verifier.next_height = int(resume.height)
        verifier.prev_hash = bytes(resume.head_hash)
        verifier.accumulator = chain.MerkleAccumulator(
            int(resume.height), [bytes(f) for f in resume.frontier]
        )
    last_good: tuple[int, bytes, list[bytes]] | None = None
    async for item in _stream_hashed(db, verifier.next_height):
        if isinstance(item, chain.Checkpoint):
            if not verifier.checkpoint(item):
                break
            last_good = (item.height, item.head_hash, list(verifier.accumulator.frontier))
        elif not verifier.hashed_entry(*item):
            break
    result = verifier.result()
    if result.valid and last_good is not None:
        async with db.transaction() as conn:
            await conn.execute(
                text(
                    "INSERT INTO ledger_verified (id, height, head_hash, frontier, verified_at)"
                    " VALUES (1, :h, :hh, :f, :at) ON CONFLICT (id) DO UPDATE SET"
                    " height = EXCLUDED.height, head_hash = EXCLUDED.head_hash,"
                    " frontier = EXCLUDED.frontier, verified_at = EXCLUDED.verified_at"
                ),
                {"h": last_good[0], "hh": last_good[1], "f": last_good[2], "at": clock.now()},
            )
    return result


async def public_key_pems(db: Database) -> dict[str, str]:
    async with db.connection() as conn:
        rows = await conn.execute(
            text("SELECT key_id, public_pem FROM ledger_signing_keys ORDER BY created_at")
        )
        return {r.key_id: r.public_pem for r in rows}


async def latest_checkpoint(db: Database) -> chain.Checkpoint | None:
    async with db.connection() as conn:
        row = (
            await conn.execute(
                text(
                    f"SELECT {_CHECKPOINT_COLUMNS} FROM ledger_checkpoints"
                    " ORDER BY height DESC LIMIT 1"
                )
            )
        ).first()
    return _checkpoint_of(row) if row is not None else None


async def ledger_page(db: Database, from_height: int, limit: int) -> list[dict[str, Any]]:
    lines: list[dict[str, Any]] = []
    async for item in _stream(db, from_height):
        if isinstance(item, chain.LedgerEntry) and item.height >= from_height + limit:
            break
        if isinstance(item, chain.Checkpoint) and item.height > from_height + limit:
            break
        lines.append(item.to_export())
    return lines


async def transaction_audit(db: Database, master: MasterKey, transaction_id: str) -> dict[str, Any]:
    """The decrypted events of a transaction, each with its inclusion proof in the tree of
    the latest checkpoint (entries newer than it say so and carry no proof yet)."""
    checkpoint = await latest_checkpoint(db)
    async with db.connection() as conn:
        rows = (
            await conn.execute(
                text(
                    f"SELECT {_ENTRY_COLUMNS} FROM ledger_entries WHERE transaction_id = :t"
                    " ORDER BY height"
                ),
                {"t": transaction_id},
            )
        ).all()
        hashes: list[bytes] = []
        if checkpoint is not None and rows:
            hashes = [
                bytes(h)
                for h in (
                    await conn.execute(
                        text(
                            "SELECT entry_hash FROM ledger_entries WHERE height < :n"
                            " ORDER BY height"
                        ),
                        {"n": checkpoint.height},
                    )
                ).scalars()
            ]
        events = []
        for row in rows:
            entry = _entry(row)
            try:
                key = await keys.data_key(conn, master, entry.key_id)
                payload: dict[str, Any] | None = chain.open_sealed(
                    key.key,
                    key.key_id,
                    entry.nonce,
                    entry.ciphertext,
                    event_id=entry.event_id,
                    event_type=entry.event_type,
                    transaction_id=entry.transaction_id,
                )
                unreadable = None
            except keys.KeyDestroyed:
                payload, unreadable = None, "data key destroyed (crypto-shredded)"
            proof = None
            if checkpoint is not None and entry.height < checkpoint.height:
                proof = {
                    "leaf_index": entry.height,
                    "tree_size": checkpoint.height,
                    "audit_path": [p.hex() for p in chain.inclusion_proof(entry.height, hashes)],
                }
            events.append(
                {
                    "entry": entry.to_export(),
                    "event": payload,
                    "unreadable": unreadable,
                    "inclusion_proof": proof,
                }
            )
    return {
        "transaction_id": transaction_id,
        "events": events,
        "checkpoint": checkpoint.to_export() if checkpoint else None,
    }
