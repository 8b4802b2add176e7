"""The PostgreSQL projector: every shard's event log, archived and projected into history.

One consumer group, ``ledger-projector``, reads each shard's ``ledger:{s}:events``. It is
exclusive per shard (the runner's lease ``ledger:{s}:lease:ledger-projector``), so a shard's
events are applied in log order by one process at a time; another ``ledger serve --role
projector`` stands by and takes over when the holder dies.

A batch of entries is applied in ONE PostgreSQL transaction, in psycopg's pipeline mode (a
statement whose result is not needed is sent without waiting for it, so PostgreSQL archives the
batch while Python folds and encodes its final orders: measured +11 % rows/s on a catch-up):

1. lock the tracking record (``projector_checkpoints`` row of ``(ledger-projector, shard)``):
   the last stream entry whose effects are committed. Entries at or before it are skipped (a
   crash between COMMIT and XACK redelivers them) unless they are missing from the archive (an
   entry that failed earlier while later ones succeeded is still applied when retried);
2. archive every event into ``ledger_events`` (unknown event types too, when their envelope is
   readable; CONTRACT §5; when it is not, the entry is skipped and recorded as a gap), with its
   hash chain fields (``ledger.store.chain``): the exact data text (``data_raw``; the JSONB ``data``
   reorders keys), its number ``chain_n`` and its ``chain_hash``;
3. store every ``OrderFilled`` in ``fills``;
4. upsert ``positions`` for ``PositionClosed`` / ``PositionLiquidated`` (the event carries the
   whole position);
5. upsert ``orders`` for every order an event of the batch leaves in a final status (a late
   fill on a cancelled order included), with the full order state rebuilt by folding the
   order's archived events (this batch's included) through ``ledger.domain.evolution.apply``; when
   the archive misses one of them (its versions are not 1..n, or one cannot be applied) the
   order is written from its snapshot in Redis (``ledger:{s}:orders``) instead;
6. fill the gaps (below) of the orders and positions just written;
7. advance the tracking record to the batch's last entry, COMMIT.

Only then does the runner XACK the entries. Upserts never let an older version overwrite a
newer one, and every insert ignores a row already there, so applying any entry again changes
nothing: the history holds every event, fill, closed position and final order exactly once,
whatever crashes happen in between.

PostgreSQL being unavailable (``RETRYABLE``) makes the runner back off and retry the same
entries; it never dead-letters them. An event of a known type that cannot be decoded is
dead-lettered at once with the decoder's reason (``Undeliverable``: no retry can read it); an
entry that fails otherwise (a value PostgreSQL refuses, say) is retried alone and dead-lettered
after ``max_deliveries``. Either way history is never silently missing: before the dead letter
is written, the entry is recorded in ``projector_gaps`` (its type, event, order or position id
when readable, the code and the reason), and the gap is filled (``filled_at``) when that order
or position reaches history after all (at once, if it already has). ``open_gaps`` lists the
open ones per shard.

Two orders reported with the same venue order id on one exchange would break the
``(exchange, exchange_order_id)`` unique constraint: the order that comes second is written with
``exchange_order_id`` NULL and ``metadata.duplicate_exchange_order_id`` (plus
``metadata.duplicate_of_order_id``), and an error is logged with both ids.

"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from decimal import Decimal
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import msgspec
import psycopg
import psycopg_pool
import structlog
from psycopg import errors as pg_errors
from psycopg.types.json import Json

from consumers.backoff import Backoff, poll
from consumers.entries import Entry
from consumers.runner import ConsumerSettings, StreamConsumer, Undeliverable
from consumers.together import run_all
from ledger.config import Settings, known_url
from ledger.domain import wire
from ledger.domain.decider import Requirements
from ledger.domain.evolution import apply, position_from_event
from ledger.domain.mapping import ORDER, POSITION
from ledger.domain.state import Book, OrderState
from ledger.domain.values import check_identifier, ms_to_datetime
from ledger.sqlfiles import load_queries
from ledger.store.chain import chain_fields
from ledger.store.eventstore import EventStore
from ledger.store.keys import ShardKeys
from ledger.store.redis_conn import entry_order, entry_text, text
from projections.schema import apply_schema

__all__ = [
    "PROJECTOR",
    "RETRYABLE",
    "BatchResult",
    "HistoryRows",
    "Projector",
    "ProjectorService",
    "batch_rows",
    "checkpoint",
    "lease_key",
    "open_gaps",
    "open_pool",
    "projector_consumer",
    "projector_role",
    "redact",
    "write_fills",
    "write_orders",
    "write_positions",
]

PROJECTOR = "ledger-projector"

# PostgreSQL down, restarting, or a transaction that lost a race: back off and retry, never
# dead-letter (AdminShutdown and "connection is closed" are OperationalErrors; PoolTimeout is
# what the pool raises when it cannot hand out a connection in time).
RETRYABLE: tuple[type[BaseException], ...] = (
    psycopg.OperationalError,
    psycopg_pool.PoolTimeout,
    pg_errors.TransactionRollback,  # serialization failure, deadlock detected
)

POOL_TIMEOUT_S = 5.0
POOL_RECONNECT_TIMEOUT_S = 5.0
VENUE_ID_RETRIES = 3
VENUE_ID_CONSTRAINT = "orders_exchange_order_id_key"
GAP_TYPE_LENGTH = 64  # projector_gaps.type
GAP_CODE_LENGTH = 32  # projector_gaps.code
# A batch is one PostgreSQL transaction with fixed costs (locking the tracking record, a dozen
# round trips, the commit, the runner's read and acknowledgement): `serve`'s projector reads this
# many times the configured batch_size a batch (2,048 entries with the default 256). Catching up
# after an outage, 8 against 4: medians of three alternating runs 10,251 -> 11,545 rows/s; the
# price is a longer read script (about 33 ms of Redis per 2,048 entries) during a catch-up.
BATCH_FACTOR = 8
# After a batch shorter than that, `serve`'s projector waits this long before reading again, so
# that at a moderate rate its batches gather the events of many commands instead of one or two
# (history is off the order path; the archive is this much later at most).
LINGER_MS = 20
# Entries per statement within a batch's transaction: PostgreSQL inserts one chunk while Python
# builds the next (``Projector.project``).
CHUNK = 256

# The upserts' column lists are put in from each aggregate's one declaration (ledger.domain.mapping).
_SQL = {**load_queries("projections", "projector.sql")}
_SQL["upsert_positions"] = POSITION.sql(_SQL["upsert_positions"])
_SQL["upsert_orders"] = ORDER.sql(_SQL["upsert_orders"])
_POSITION_FINAL = (wire.PositionClosed, wire.PositionLiquidated)

log = structlog.get_logger("ledger.projector")


def lease_key(shard: int) -> str:
    """The lease that makes one projector active per shard (hash-tagged: cluster-safe)."""
    return ShardKeys(shard).lease(PROJECTOR)


# --------------------------------------------------------------------------- rows


class _Envelope(msgspec.Struct):
    """The envelope of an event of a type this reader does not know (archived, not applied)."""

    event_id: str
    stream: str
    version: int
    user_id: str
    ts: int
    command_id: str | None = None


_envelope_decoder = msgspec.json.Decoder(_Envelope)
_JSON = msgspec.json.Encoder()


@dataclass(slots=True)
class _Decoded:
    entry_id: str
    key: tuple[int, int]
    type: str
    data: str
    event: wire.Event | None  # None: an event type this reader does not know
    n: int | None = None  # the entry's place in the hash chain (None: appended before the chain)
    hash: str | None = None


@dataclass(slots=True)
class _Unreadable:
    """An event of a type this reader does not know whose envelope cannot be read either."""

    entry: Entry
    type: str
    data: str
    reason: str


def _decode(entry: Entry) -> _Decoded | _Unreadable:
    """Decode one stream entry (an unknown type whose envelope is unreadable: ``_Unreadable``).

    Raises ``Undeliverable`` for an entry of a known type that is not a valid event (the runner
    dead-letters it, and the projector records the gap).
    """
    type_name, raw = wire.entry_fields(entry.fields)
    try:
        event = wire.decode_entry(entry.id, entry.fields)
    except wire.WireError as error:
        raise Undeliverable(error.code, error.message) from error
    data = text(raw) or ""
    if event is None:
        try:
            _envelope_decoder.decode(data)
        except (msgspec.MsgspecError, RecursionError, UnicodeError) as exc:
            reason = f"unknown event type {type_name!r} with an unreadable envelope ({exc!r}): not archived"
            return _Unreadable(entry, type_name, data, reason)
    return _Decoded(entry.id, entry_order(entry.id), type_name, data, event, *chain_fields(entry.fields))


def _chain_columns(item: _Decoded) -> dict[str, Any]:
    """The archive's hash chain columns of an entry: what ``ledger verify --chain`` rehashes."""
    return {
        "data_raw": item.data,
        "chain_n": item.n,
        "chain_hash": None if item.hash is None else _storable(item.hash),
    }


def _archive_row(row: dict[str, Any], item: _Decoded) -> dict[str, Any]:
    """An event's row as ``insert_events`` takes it: ``data_raw`` (the exact text), of which the
    statement makes ``data`` (the JSONB object), so the text is sent once. A text that is one
    JSON object with nothing around it (what the ledger publishes) goes into the batch's JSON as
    that object, verbatim (``json_populate_recordset`` gives a text column a nested value's exact
    source text), which PostgreSQL scans without unescaping it; any other text goes as a JSON
    string. The text was decoded as one JSON value already (``_decode``), so it cannot break
    the batch's structure."""
    archived = {**row, **_chain_columns(item)}
    text = archived.pop("data")
    if text[:1] == "{" and text[-1:] == "}":
        archived["data_raw"] = msgspec.Raw(text)
    return archived


def _storable(value: str, limit: int | None = None) -> str:
    """Text PostgreSQL takes whatever an entry held: no NUL, no lone surrogate."""
    clean = value.encode("utf-8", "backslashreplace").decode("utf-8").replace("\x00", "\\x00")
    return clean[:limit]


def _gap_row(shard: int, entry_id: str, type_name: str, data: str | None, code: str, reason: str) -> dict[str, Any]:
    """A ``projector_gaps`` row; the event's ids and version only when they are readable."""
    try:
        envelope = wire.decode_json(data) if data is not None else None
    except wire.WireError:
        envelope = None
    if not isinstance(envelope, dict):
        envelope = {}

    def uuid_of(name: str) -> str | None:
        try:
            return check_identifier("uuid", envelope.get(name))
        except ValueError:
            return None

    version = envelope.get("version")
    ms, seq = entry_order(entry_id)
    return {
        "shard": shard,
        "entry_id": entry_id,
        "entry_ms": ms,
        "entry_seq": seq,
        "type": _storable(type_name, GAP_TYPE_LENGTH),
        "event_id": uuid_of("event_id"),
        "aggregate_id": uuid_of("stream"),
        "version": version if type(version) is int else None,
        "code": _storable(code, GAP_CODE_LENGTH),
        "reason": _storable(reason),
    }


def _event_row(shard: int, item: _Decoded) -> dict[str, Any]:
    event = item.event
    envelope: Any = event if event is not None else _envelope_decoder.decode(item.data)
    return {
        "event_id": envelope.event_id,
        "shard": shard,
        "entry_id": item.entry_id,
        "entry_ms": item.key[0],
        "entry_seq": item.key[1],
        "type": item.type,
        "aggregate_id": envelope.stream,
        "version": envelope.version,
        "command_id": envelope.command_id,
        "user_id": envelope.user_id,
        "data": item.data,
        "ts": ms_to_datetime(envelope.ts),
    }


def _fill_row(event: wire.OrderFilled) -> dict[str, Any]:
    return {
        "order_id": event.stream,
        "fill_id": event.fill_id,
        "event_id": event.event_id,
        "user_id": event.user_id,
        "exchange": str(event.exchange),
        "symbol": event.symbol,
        "side": str(event.side),
        "position_id": event.position_ids[0] if event.position_ids else None,
        "quantity": Decimal(event.quantity),
        "price": Decimal(event.price),
        "fee": Decimal(event.fee),
        "fee_currency": event.fee_currency,
        "overfill": event.overfill,
        "late": event.late,
        "ts": ms_to_datetime(event.fill_ts),
    }


def _position_row(event: wire.PositionEvent) -> dict[str, Any]:
    """The history row of the position an event leaves (``ledger.domain.mapping.POSITION``)."""
    return POSITION.to_row(POSITION.values(position_from_event(event)))


def _order_row(order: OrderState) -> dict[str, Any]:
    """The history row of an order (``ledger.domain.mapping.ORDER``; ``metadata`` a dict)."""
    return ORDER.to_row(ORDER.values(order))


def batch_rows(rows: Iterable[dict[str, Any]]) -> dict[str, Json]:
    """The parameter of a batch statement: its rows as ONE JSON array, each row keyed by column,
    that the statement expands with ``json_populate_recordset`` (a row per element, typed by
    the table's own row type). One statement per table and batch instead of one per row; exact
    values (a ``Decimal`` is a JSON string, a time RFC 3339 with its zone)."""
    return {"rows": Json(list(rows), _JSON.encode)}


@dataclass(slots=True)
class HistoryRows:
    """The rows that decoded entries give, before any database: the projector's pure core
    (``projections.verify`` rebuilds the expected history with it)."""

    events: list[dict[str, Any]] = field(default_factory=list)
    fills: list[dict[str, Any]] = field(default_factory=list)
    positions: dict[str, dict[str, Any]] = field(default_factory=dict)  # closed and liquidated
    final_orders: dict[str, _Decoded] = field(default_factory=dict)  # order id -> the entry that made it final

    def add(self, shard: int, items: Iterable[_Decoded]) -> None:
        """Add the rows of entries, in log order."""
        for item in items:
            self.events.append(_event_row(shard, item))
            event = item.event
            if isinstance(event, wire.OrderFilled):
                self.fills.append(_fill_row(event))
            if isinstance(event, _POSITION_FINAL):
                row = _position_row(event)
                held = self.positions.get(event.stream)
                if held is None or held["version"] <= row["version"]:
                    self.positions[event.stream] = row
            elif event is not None and not isinstance(event, wire.PositionEvent | wire.DriftEvent):
                if event.status.is_final:  # type: ignore[attr-defined]
                    self.final_orders[event.stream] = item


# --------------------------------------------------------------------------- the projector


@dataclass(slots=True)
class BatchResult:
    """What one batch did (also logged)."""

    entries: int = 0
    skipped: int = 0
    events: int = 0
    fills: int = 0
    positions: int = 0
    orders: int = 0
    duplicate_venue_ids: list[str] = field(default_factory=list)
    checkpoint: str | None = None


class Projector:
    """Applies batches of one shard's event entries to PostgreSQL (``handle`` for the runner)."""

    def __init__(
        self,
        pool: psycopg_pool.AsyncConnectionPool[Any],
        redis: Any,
        shard: int,
        *,
        name: str = PROJECTOR,
    ) -> None:
        self.pool = pool
        self.snapshots = EventStore(redis, shard)
        self.shard = shard
        self.name = name
        self.log = log.bind(shard=shard, projector=name)

    async def handle(self, entries: list[Entry]) -> None:
        await self.project(entries)

    async def record_gap(self, entry: Entry, code: str, reason: str) -> None:
        """Record an entry about to be dead-lettered (the runner's ``on_dead_letter``)."""
        type_name, data = wire.entry_fields(entry.fields)
        row = _gap_row(self.shard, entry.id, type_name, text(data), code, reason)
        async with self.pool.connection() as conn:
            await conn.execute(_SQL["insert_gap"], row)
        self.log.error(
            "event missing from history: gap recorded",
            entry_id=entry.id,
            event_id=row["event_id"],
            aggregate_id=row["aggregate_id"],
            code=code,
            reason=reason,
        )

    async def project(self, entries: Sequence[Entry]) -> BatchResult:
        """Apply entries (in log order) in one transaction; return what was written.

        The transaction runs in psycopg's pipeline mode and is sent in chunks of ``CHUNK``
        entries: each chunk's archive and fill rows are sent as soon as they are built, so
        PostgreSQL inserts one chunk while Python decodes the next; the first wait for the server
        after the checkpoint is the final orders' (their rows are built before it)."""
        result = BatchResult(entries=len(entries))
        if not entries:
            return result
        started = time.perf_counter()
        last = max(entry_order(e.id) for e in entries)
        async with self.pool.connection() as conn, conn.pipeline(), conn.transaction():
            applied = await self._lock_checkpoint(conn)
            archived = await self._archived(conn, entries, applied)
            rows = HistoryRows()
            fresh: list[_Decoded] = []
            for first in range(0, len(entries), CHUNK):
                chunk = await self._fresh(conn, entries[first : first + CHUNK], applied, archived)
                await self._archive(conn, rows, chunk)
                fresh += chunk
            result.skipped = len(entries) - len(fresh)
            if fresh:
                await self._finish(conn, rows, fresh, result)
            if last > applied:
                await conn.execute(
                    _SQL["checkpoint_advance"],
                    {
                        "projector": self.name,
                        "shard": self.shard,
                        "entry_ms": last[0],
                        "entry_seq": last[1],
                    },
                )
        result.checkpoint = entry_text(max(last, applied))
        self.log.info(
            "batch projected",
            first_entry_id=entries[0].id,
            last_entry_id=entries[-1].id,
            entries=result.entries,
            skipped=result.skipped,
            events=result.events,
            fills=result.fills,
            positions=result.positions,
            orders=result.orders,
            ms=round((time.perf_counter() - started) * 1000, 2),
        )
        return result

    # ----------------------------------------------------------------- steps

    async def _lock_checkpoint(self, conn: psycopg.AsyncConnection[Any]) -> tuple[int, int]:
        params = {"projector": self.name, "shard": self.shard}
        cur = await conn.execute(_SQL["checkpoint_lock"], params)
        row = await cur.fetchone()
        if row is None:
            await conn.execute(_SQL["checkpoint_init"], params)
            cur = await conn.execute(_SQL["checkpoint_lock"], params)
            row = await cur.fetchone()
            if row is None:
                raise RuntimeError(
                    f"projector_checkpoints has no row for {self.name} on shard {self.shard} after creating it"
                )
        return int(row[0]), int(row[1])

    async def _unreadable(self, conn: psycopg.AsyncConnection[Any], item: _Unreadable) -> None:
        """Skip an unknown event type that cannot be archived, and record the gap (once)."""
        gap = _gap_row(self.shard, item.entry.id, item.type, item.data, "UNKNOWN_TYPE", item.reason)
        await conn.execute(_SQL["insert_gap"], gap)
        self.log.warning("event skipped: gap recorded", entry_id=item.entry.id, type=gap["type"], reason=gap["reason"])

    async def _archived(
        self, conn: psycopg.AsyncConnection[Any], entries: Sequence[Entry], applied: tuple[int, int]
    ) -> set[tuple[int, int]]:
        """Which entries up to the checkpoint are archived (those after it never are: the
        checkpoint moves in the transaction that archives them)."""
        old = [key for e in entries if (key := entry_order(e.id)) <= applied]
        if not old:
            return set()
        first, last = min(old), max(old)
        cur = await conn.execute(
            _SQL["archived_entries"],
            {
                "shard": self.shard,
                "first_ms": first[0],
                "first_seq": first[1],
                "last_ms": last[0],
                "last_seq": last[1],
            },
        )
        return {(int(ms), int(seq)) for ms, seq in await cur.fetchall()}

    async def _fresh(
        self,
        conn: psycopg.AsyncConnection[Any],
        entries: Sequence[Entry],
        applied: tuple[int, int],
        archived: set[tuple[int, int]],
    ) -> list[_Decoded]:
        """The entries whose effects are not committed yet, decoded; an unknown type whose
        envelope is unreadable is not archived (its gap is recorded)."""
        fresh = []
        for entry in entries:
            item = _decode(entry)
            if isinstance(item, _Unreadable):
                await self._unreadable(conn, item)
            elif item.key > applied or item.key not in archived:
                fresh.append(item)
        return fresh

    async def _archive(self, conn: psycopg.AsyncConnection[Any], rows: HistoryRows, chunk: list[_Decoded]) -> None:
        """Add a chunk's rows and send its archive and fill rows."""
        if not chunk:
            return
        events, fills = len(rows.events), len(rows.fills)
        rows.add(self.shard, chunk)
        archive = [_archive_row(row, item) for row, item in zip(rows.events[events:], chunk, strict=True)]
        await conn.execute(_SQL["insert_events"], batch_rows(archive))
        await write_fills(conn, rows.fills[fills:])

    async def _finish(
        self, conn: psycopg.AsyncConnection[Any], rows: HistoryRows, fresh: list[_Decoded], result: BatchResult
    ) -> None:
        """The batch's closed positions and final orders, and the gaps they fill."""
        positions, final_orders = rows.positions, rows.final_orders
        await write_positions(conn, positions.values())
        result.events, result.fills, result.positions = len(rows.events), len(rows.fills), len(positions)
        written = list(positions)
        if final_orders:
            orders = await self._rebuild_orders(conn, final_orders, fresh)
            result.orders = len(orders)
            result.duplicate_venue_ids = await write_orders(conn, orders, self.log)
            written += [order.id for order in orders]
        if written:
            await conn.execute(_SQL["fill_gaps"], {"ids": written})

    async def _rebuild_orders(
        self, conn: psycopg.AsyncConnection[Any], final: dict[str, _Decoded], batch: list[_Decoded]
    ) -> list[OrderState]:
        """Fold each order's events into its state: from ``batch`` when it holds the order's whole
        history (``_whole_in_batch``: the archive then holds exactly those events), else from the
        archive (this transaction's inserts included).

        An order whose archived history is incomplete (a version missing: an event that was
        dead-lettered or is still being retried) or cannot be applied is taken from its Redis
        snapshot, which is at least as new; without a final snapshot, the gap is recorded.
        """
        states: dict[str, OrderState | None] = dict(_whole_in_batch(final, batch))
        archived = [order_id for order_id in final if order_id not in states]
        broken: dict[str, str] = {}
        rows = await (await conn.execute(_SQL["order_events"], {"ids": archived})).fetchall() if archived else []
        for aggregate_id, type_name, data in rows:
            if aggregate_id in broken:
                continue
            state = states.get(aggregate_id)
            try:
                states[aggregate_id] = _next_order(state, wire.decode_event(type_name, data))
            except Exception as exc:  # noqa: BLE001 - a broken history must not block the archive
                broken[aggregate_id] = f"{type_name}: {exc}" if str(exc) else repr(exc)
        broken.update((i, "no event in the archive") for i in archived if i not in states and i not in broken)
        if broken:
            await self._from_snapshots(conn, broken, final, states)
        return [state for i in final if (state := states.get(i)) is not None and state.status.is_final]

    async def _from_snapshots(
        self,
        conn: psycopg.AsyncConnection[Any],
        broken: dict[str, str],
        final: dict[str, _Decoded],
        states: dict[str, OrderState | None],
    ) -> None:
        book = Book()
        await self.snapshots.load(book, Requirements(order_ids=frozenset(broken)))
        for order_id, why in broken.items():
            snapshot = book.orders.get(order_id)
            if snapshot is not None and snapshot.status.is_final:
                states[order_id] = snapshot
                self.log.warning(
                    "order history incomplete in the archive: written from its snapshot",
                    order_id=order_id,
                    version=snapshot.version,
                    reason=why,
                )
                continue
            states[order_id] = None
            item = final[order_id]
            reason = f"order {order_id} cannot be rebuilt ({why}) and has no final snapshot"
            await conn.execute(
                _SQL["insert_gap"],
                _gap_row(self.shard, item.entry_id, item.type, item.data, "HISTORY_INCOMPLETE", reason),
            )
            self.log.error(
                "final order missing from history: gap recorded",
                order_id=order_id,
                entry_id=item.entry_id,
                reason=reason,
            )


def _next_order(state: OrderState | None, event: wire.Event) -> OrderState:
    """``state`` after ``event``, which must be the order's next version: ``LookupError`` naming
    the version missing, ``TypeError`` for an event that leaves no order."""
    expected = 1 if state is None else state.version + 1
    if event.version != expected:
        raise LookupError(f"version {expected} is missing from the archive")
    folded = apply(state, event)
    if not isinstance(folded, OrderState):
        raise TypeError(f"{event.type} is not an order event")
    return folded


def _whole_in_batch(final: dict[str, _Decoded], batch: Iterable[_Decoded]) -> dict[str, OrderState]:
    """The orders of ``final`` whose every event is in ``batch`` (log order): versions 1, 2, ...
    up to the one that made it final, each applied without error; folded."""
    states: dict[str, OrderState] = {}
    partial: set[str] = set()
    for item in batch:
        event = item.event
        if event is None or event.stream not in final or event.stream in partial:
            continue
        try:
            states[event.stream] = _next_order(states.get(event.stream), event)
        except Exception:  # noqa: BLE001 - the archive's fold decides, and records what is broken
            partial.add(event.stream)
    whole: dict[str, OrderState] = {}
    for order_id, state in states.items():
        made_final = final[order_id].event
        if order_id not in partial and made_final is not None and state.version == made_final.version:
            whole[order_id] = state
    return whole


async def write_fills(conn: psycopg.AsyncConnection[Any], rows: Iterable[dict[str, Any]]) -> None:
    """Insert fill rows (``HistoryRows.fills``) in one statement; a fill already stored stays."""
    params = batch_rows(rows)
    if params["rows"].obj:
        await conn.execute(_SQL["insert_fills"], params)


async def write_positions(conn: psycopg.AsyncConnection[Any], rows: Iterable[dict[str, Any]]) -> None:
    """Upsert closed or liquidated position rows (``HistoryRows.positions``, one per position) in
    one statement; an older version never overwrites a newer."""
    params = batch_rows(rows)
    if params["rows"].obj:
        await conn.execute(_SQL["upsert_positions"], params)


async def write_orders(conn: psycopg.AsyncConnection[Any], orders: list[OrderState], logger: Any = log) -> list[str]:
    """Upsert final orders into ``orders``; return the ids of those written without their venue id
    (another order holds it: see the module doc). Used by the projector and ``ledger rebuild``."""
    attempt = 0
    while True:  # ends by returning, or by raising on the last attempt
        attempt += 1
        rows = [_order_row(order) for order in orders]
        duplicates = await _resolve_venue_ids(conn, rows, logger)
        try:
            # A savepoint: a concurrent writer (another shard's projector) may take a venue
            # id between the check and the write; then check again and retry.
            async with conn.transaction():
                await conn.execute(_SQL["upsert_orders"], batch_rows(rows))
        except pg_errors.UniqueViolation as exc:
            if exc.diag.constraint_name != VENUE_ID_CONSTRAINT or attempt == VENUE_ID_RETRIES:
                raise
            logger.warning("venue order id taken concurrently: checking again", attempt=attempt)
            continue
        return duplicates


async def _resolve_venue_ids(conn: psycopg.AsyncConnection[Any], rows: list[dict[str, Any]], logger: Any) -> list[str]:
    """Drop the venue id of rows whose (exchange, exchange_order_id) another order holds."""
    wanted = [(r["exchange"], r["exchange_order_id"]) for r in rows if r["exchange_order_id"]]
    if not wanted:
        return []
    cur = await conn.execute(
        _SQL["venue_id_holders"],
        {"exchanges": [w[0] for w in wanted], "venue_ids": [w[1] for w in wanted]},
    )
    holders: dict[tuple[str, str], str] = {}
    for exchange, venue_id, order_id in await cur.fetchall():
        holders[(exchange, venue_id)] = order_id
    duplicates = []
    for row in rows:
        venue_id = row["exchange_order_id"]
        if not venue_id:
            continue
        key = (row["exchange"], venue_id)
        holder = holders.setdefault(key, row["id"])
        if holder == row["id"]:
            continue
        row["exchange_order_id"] = None
        row["metadata"]["duplicate_exchange_order_id"] = venue_id
        row["metadata"]["duplicate_of_order_id"] = holder
        duplicates.append(row["id"])
        logger.error(
            "two orders reported with the same venue order id: stored without it",
            order_id=row["id"],
            other_order_id=holder,
            exchange=row["exchange"],
            exchange_order_id=venue_id,
            user_id=row["user_id"],
        )
    return duplicates


# --------------------------------------------------------------------------- wiring


def open_pool(
    database_url: str, *, max_size: int = 4, timeout: float = POOL_TIMEOUT_S
) -> psycopg_pool.AsyncConnectionPool[Any]:
    """A connection pool (not opened yet: ``await pool.open()``) in autocommit mode, so that
    each ``conn.transaction()`` is one explicit transaction."""
    return psycopg_pool.AsyncConnectionPool(
        database_url,
        min_size=1,
        max_size=max(1, max_size),
        timeout=timeout,
        reconnect_timeout=POOL_RECONNECT_TIMEOUT_S,
        check=psycopg_pool.AsyncConnectionPool.check_connection,
        kwargs={"autocommit": True},
        name=PROJECTOR,
        open=False,
    )


def projector_consumer(
    redis: Any,
    pool: psycopg_pool.AsyncConnectionPool[Any],
    shard: int,
    *,
    settings: ConsumerSettings | None = None,
    name: str | None = None,
) -> StreamConsumer:
    """The exclusive ``ledger-projector`` consumer of one shard's event stream."""
    keys = ShardKeys(shard)
    projector = Projector(pool, redis, shard)
    return StreamConsumer(
        redis,
        stream=keys.events,
        group=PROJECTOR,
        handler=projector.handle,
        dead_stream=keys.dead,
        name=name,
        settings=settings,
        lease_key=lease_key(shard),
        retryable=RETRYABLE,
        on_dead_letter=projector.record_gap,
    )


class ProjectorService:
    """The ``projector`` role: one pool, schema.sql applied, one projector per shard."""

    def __init__(
        self,
        redis: Any,
        database_url: str,
        shards: int,
        *,
        settings: ConsumerSettings | None = None,
    ) -> None:
        self.redis = redis
        self.database_url = database_url
        self.shards = shards
        self.settings = settings or ConsumerSettings()

    async def run(self, stop: asyncio.Event) -> None:
        pool = open_pool(self.database_url, max_size=self.shards + 1)
        await pool.open(wait=False)
        try:
            if not await self._apply_schema(pool, stop):
                return
            consumers = [
                projector_consumer(self.redis, pool, shard, settings=self.settings) for shard in range(self.shards)
            ]
            await run_all([consumer.run for consumer in consumers], stop)
        finally:
            await pool.close()

    async def _apply_schema(self, pool: psycopg_pool.AsyncConnectionPool[Any], stop: asyncio.Event) -> bool:
        """Apply schema.sql (idempotent), retrying while PostgreSQL is unavailable."""

        async def attempt() -> bool:
            async with pool.connection() as conn:
                await apply_schema(conn)
            log.info("schema.sql applied", database=redact(self.database_url))
            return True

        async def away(exc: BaseException, retry_in_s: float) -> None:
            log.warning("PostgreSQL unavailable, retrying", error=str(exc), retry_in_s=retry_in_s)

        backoff = Backoff(max_s=self.settings.backoff_max_s)
        return await poll(stop, attempt, retry_on=RETRYABLE, on_retry=away, backoff=backoff)


async def projector_role(redis: Any, settings: Settings) -> list[Any]:
    """``ledger serve --role projector``: the factory registered in ``ledger.app.service.ROLES``."""
    url = known_url(settings, "postgres")
    consumer = ConsumerSettings.from_settings(settings)
    consumer = replace(consumer, batch_size=consumer.batch_size * BATCH_FACTOR, linger_ms=LINGER_MS)
    return [ProjectorService(redis, url, settings.shards, settings=consumer)]


# --------------------------------------------------------------------------- reading


async def checkpoint(conn: psycopg.AsyncConnection[Any], shard: int, projector: str = PROJECTOR) -> str | None:
    """The last entry id of ``ledger:{shard}:events`` the projector committed (None: none)."""
    cur = await conn.execute(_SQL["checkpoint_get"], {"projector": projector, "shard": shard})
    row = await cur.fetchone()
    if row is None or (row[0], row[1]) == (0, 0):
        return None
    return entry_text((int(row[0]), int(row[1])))


async def open_gaps(conn: psycopg.AsyncConnection[Any]) -> dict[int, tuple[int, str]]:
    """Per shard, the gaps in history not filled yet: (how many, the first entry id)."""
    cur = await conn.execute(_SQL["open_gaps"])
    return {int(shard): (int(gaps), str(first)) for shard, gaps, first in await cur.fetchall()}


def redact(url: str) -> str:
    """A database URL without its password, for logs."""
    parts = urlsplit(url)
    if not parts.password:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return urlunsplit(parts._replace(netloc=netloc))
