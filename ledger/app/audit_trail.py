"""The audit trail of one order or position (``ledger history ID``, CONTRACT §11).

Every event of the aggregate in version order, with its time (the ledger's ``ts``), command id,
event id, stream entry id and the state after it, rebuilt step by step with
``ledger.domain.evolution.apply`` (the live system's own evolution).

Where the events come from:

* with a reachable PostgreSQL, the archive (``ledger_events``, read by its (aggregate_id,
  version) index) and, for the events the projector has not archived yet (it lags the log), the
  shard's Redis log after the projector's checkpoint, then the archive once more (an event
  archived while this ran, perhaps trimmed from Redis since, is found there). They are merged by
  version, an event in both counted once (the copy read first is shown);
* without one, the shard's Redis log, walked whole (``EventStore.read_aggregate``).

The trail must be whole: versions 1..n with no gap. When one is missing from the tiers read
(an event trimmed from Redis with no archive to read, or one the projector dead-lettered), the
log is walked whole once more, and if the version is still missing the trail fails with the
versions it lacks, never silently shorter. An id no tier knows fails as unknown.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import msgspec
import psycopg

from ledger.app import servers
from ledger.app.console import CliError, shard_count
from ledger.config import ServerNotConfigured, Settings
from ledger.domain import wire
from ledger.domain.evolution import DriftState, apply
from ledger.domain.state import OrderState, PositionState
from ledger.domain.values import format_decimal
from ledger.sqlfiles import load_queries
from ledger.store.eventstore import EventStore, StoredEvent
from ledger.store.keys import ShardKeys
from ledger.store.operations import iso_time
from ledger.store.redis_conn import CONNECT_TIMEOUT_S
from projections.projector import checkpoint

ARCHIVE = "archive"
REDIS = "redis"
# The state fields a terminal shows after each event (``--json`` gives the whole state).
SUMMARY = {
    "order": ("status", "filled_qty", "avg_fill_price", "exchange_order_id"),
    "position": ("status", "size", "entry_price", "exit_price", "realized_pnl", "fees"),
    "drift": ("status", "market", "kind", "resolution", "adjustment_event_id"),
}

_SQL = load_queries("projections", "trail.sql")


@dataclass(frozen=True, slots=True)
class Step:
    """One event of the trail and the aggregate's state after it."""

    entry_id: str
    event: wire.Event
    source: str  # ARCHIVE or REDIS
    state: OrderState | PositionState | DriftState

    def as_dict(self) -> dict[str, Any]:
        event = self.event
        return {
            "version": event.version,
            "type": event.type,
            "ts": event.ts,
            "time": iso_time(event.ts),
            "command_id": event.command_id,
            "event_id": event.event_id,
            "entry_id": self.entry_id,
            "source": self.source,
            "state": _plain(msgspec.to_builtins(self.state, builtin_types=(Decimal,))),
        }


@dataclass(frozen=True, slots=True)
class Trail:
    aggregate_id: str
    shard: int
    steps: list[Step]
    archive: str  # "read", or why PostgreSQL was not read

    @property
    def kind(self) -> str:
        event = self.steps[0].event
        if isinstance(event, wire.DriftEvent):
            return "drift"
        return "position" if isinstance(event, wire.PositionEvent) else "order"

    def as_dict(self) -> dict[str, Any]:
        first = self.steps[0].event
        return {
            "id": self.aggregate_id,
            "kind": self.kind,
            "shard": self.shard,
            "user_id": first.user_id,
            "exchange": str(first.exchange),
            "symbol": first.symbol,
            "archive": self.archive,
            "events": [step.as_dict() for step in self.steps],
        }

    def heading(self) -> str:
        first = self.steps[0].event
        archived = sum(step.source == ARCHIVE for step in self.steps)
        archive = "" if self.archive == "read" else f"; PostgreSQL not read: {self.archive}"
        return (
            f"{self.kind} {self.aggregate_id}: user {first.user_id}, {first.exchange} {first.symbol}, "
            f"shard {self.shard}; {len(self.steps)} events ({archived} from the archive, "
            f"{len(self.steps) - archived} from Redis{archive})"
        )

    def rows(self) -> tuple[list[dict[str, Any]], list[str]]:
        """The terminal table: one row per event with the state's main fields after it."""
        columns = ["version", "time", "type", "command_id", "entry_id", *SUMMARY[self.kind]]
        rows = []
        for step in self.steps:
            row = step.as_dict()
            row.update({name: row["state"][name] for name in SUMMARY[self.kind]})
            rows.append(row)
        return rows, columns


def _plain(value: Any) -> Any:
    """Builtins with every Decimal as a wire decimal string (never an exponent)."""
    if isinstance(value, Decimal):
        return format_decimal(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


async def read_trail(redis: Any, settings: Settings, aggregate_id: str) -> Trail:
    """The trail of ``aggregate_id`` from the archive and Redis, or Redis alone without PostgreSQL."""
    from ledger.app.service import database_url

    try:
        url = database_url(settings, start=False)
        conn = await psycopg.AsyncConnection.connect(url, autocommit=True, connect_timeout=int(CONNECT_TIMEOUT_S))
    except (psycopg.OperationalError, servers.ServerError, ServerNotConfigured) as exc:
        return await trail(redis, None, aggregate_id, unread=str(exc).strip().splitlines()[0])
    async with conn:
        return await trail(redis, conn, aggregate_id)


async def trail(
    redis: Any, conn: psycopg.AsyncConnection[Any] | None, aggregate_id: str, *, unread: str = "no database"
) -> Trail:
    """The trail of one aggregate (``conn`` None: from Redis alone; ``unread`` says why)."""
    found: dict[int, tuple[str, wire.Event, str]] = {}
    shard = None if conn is None else await _archived(conn, aggregate_id, found)
    not_read = "" if conn is not None else f" (PostgreSQL not read: {unread})"
    if shard is None:
        shard = await _shard_of(redis, aggregate_id)
    if shard is None:
        raise CliError(f"no order or position {aggregate_id} in this ledger{not_read}: check the id")
    store = EventStore(redis, shard)
    if conn is not None:
        after = await checkpoint(conn, shard) or "0"
        _merge(found, [stored async for stored in store.iterate(after) if stored.event.stream == aggregate_id])
        # Archived meanwhile (after the first read, at or before the checkpoint, or trimmed from
        # Redis since: a trim removes only archived entries): read once more, so none is lost.
        await _archived(conn, aggregate_id, found)
    if conn is None or _missing(found):
        _merge(found, await store.read_aggregate(aggregate_id))
    if not found:
        raise CliError(f"no event of {aggregate_id} in the Redis log of shard {shard} nor in the archive{not_read}")
    if missing := _missing(found):
        raise CliError(
            f"{aggregate_id}: versions {', '.join(map(str, missing))} are in neither the archive nor Redis{not_read}: "
            "its trail cannot be rebuilt (see `ledger status` for history gaps)"
        )
    steps: list[Step] = []
    state: OrderState | PositionState | DriftState | None = None
    for version in sorted(found):
        entry_id, event, source = found[version]
        state = apply(state, event)
        steps.append(Step(entry_id, event, source, state))
    return Trail(aggregate_id, shard, steps, "read" if conn is not None else unread)


async def _archived(
    conn: psycopg.AsyncConnection[Any], aggregate_id: str, found: dict[int, tuple[str, wire.Event, str]]
) -> int | None:
    """Add the aggregate's archived events to ``found`` (versions not there yet); return its shard."""
    shard = None
    cur = await conn.execute(_SQL["aggregate_events"], {"aggregate_id": aggregate_id})
    for archived_shard, entry_id, type_name, data in await cur.fetchall():
        shard = archived_shard
        event = _decoded(type_name, data)
        if event is not None:
            found.setdefault(event.version, (entry_id, event, ARCHIVE))
    return shard


def _decoded(type_name: str, data: str) -> wire.Event | None:
    try:
        return wire.decode_event(type_name, data)
    except wire.UnknownEventType:
        return None  # a type this reader does not know: its version shows up as missing


def _merge(found: dict[int, tuple[str, wire.Event, str]], stored: list[StoredEvent]) -> None:
    for item in stored:
        found.setdefault(item.event.version, (item.entry_id, item.event, REDIS))


def _missing(found: dict[int, tuple[str, wire.Event, str]]) -> list[int]:
    return [v for v in range(1, max(found, default=0) + 1) if v not in found]


async def _shard_of(redis: Any, aggregate_id: str) -> int | None:
    """The shard whose snapshots hold the aggregate (every order and position has one while in
    Redis), or whose archived aggregates' index does (one compaction moved out); for a drift,
    which has neither, the shard whose Redis log holds its events."""
    shards = await shard_count(redis)
    pipe = redis.pipeline(transaction=False)
    for shard in range(shards):
        pipe.hexists(ShardKeys(shard).orders, aggregate_id)
        pipe.hexists(ShardKeys(shard).positions, aggregate_id)
    held = await pipe.execute()
    for shard in range(shards):
        if held[2 * shard] or held[2 * shard + 1]:
            return shard
    for shard in range(shards):  # one compaction moved to PostgreSQL: in its shard's index
        if await EventStore(redis, shard).archived_aggregates([aggregate_id]):
            return shard
    for shard in range(shards):
        if await EventStore(redis, shard).read_aggregate(aggregate_id):
            return shard
    return None
