"""``ledger rebuild --projection live|postgres``: a projection rebuilt from the log while ``serve``
runs, readers never seeing it empty or partial.

**live.** Key names cannot be swapped on a Redis Cluster (the legacy keys span slots), so the live
keys are rebuilt in place, and only where they differ. The machinery is ``ledger verify
--repair``'s (``projections.verify``): the shards' log (both tiers, ``read_log``) is replayed
through the live projection's own ``projections.live.plan`` into the expected keys up to the
projection's checkpoint (the long part, with the projection running); then the projection is
paused by taking its lease (``consumers.pause``), the replay catches up to the now still
checkpoint, every live key is compared and each that differs gets its expected content and
fences in one script (atomic per key, also on a cluster); the lease is given back and the
projection goes on from the same checkpoint. A key that was right is never touched, and a reader
of a key sees its old content or its new one.

**postgres.** ``positions``, ``orders`` and ``fills`` (history; not the archive
``ledger_events``, which is the log's second tier itself) are rebuilt whole into shadow tables
in the schema ``ledger_rebuild`` (``CREATE TABLE ... (LIKE ... INCLUDING ALL)``: columns,
defaults, constraints, indexes, storage and comments; each index then gets its original's name,
so the constraint names the projector relies on hold; the owner and the table privileges are
copied). The rows come from the projector's own mapping, as ``ledger verify`` computes them: the
log up to each shard's projector checkpoint through ``HistoryRows`` and
``ledger.domain.evolution.apply``, written with the projector's statements (``write_orders`` resolves
duplicate venue ids as the projector does). Then one transaction pauses every shard's projector
(its tracking row in ``projector_checkpoints`` locked FOR UPDATE: a projector batch waits on it),
blocks other writers of the three tables, catches the shadows up to the locked checkpoints,
drops the old tables, moves the shadows in, sets every ``projector_gaps`` row's ``filled_at``
by whether its order or position is in the new history, and commits. The checkpoints are not
moved: the projectors go on from them into the new tables. A reader (READ COMMITTED) sees the
old tables until the commit and the complete new ones after it; one that queries during the swap
waits for the commit. The tables hold every shard's rows, so a postgres rebuild covers every
shard (``--shard`` is for live). Two postgres rebuilds never run at once (an advisory lock).

Each rebuild is recorded in ``ledger:ops`` (action ``rebuild``). Progress (events replayed of
those the log has held) is drawn with rich on stderr when it is a terminal.
"""

from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass, field
from typing import Any, TextIO

import psycopg
from psycopg import sql

from ledger.errors import OperationFailed
from ledger.progress import progress_bar
from ledger.sqlfiles import load_queries
from ledger.store.log import log_size
from ledger.store.operations import record_operation
from ledger.store.redis_conn import EntryKey, entry_order, entry_text
from projections import live
from projections.projector import _SQL as PROJECTOR_SQL
from projections.projector import PROJECTOR, HistoryRows, checkpoint, write_fills, write_orders, write_positions
from projections.verify import ExpectedLive, _expected_history, _live_checkpoints, _Replay, _Scope, _Verifier

__all__ = ["HISTORY_TABLES", "SHADOW_SCHEMA", "RebuildError", "Rebuilt", "rebuild_live", "rebuild_postgres"]

HISTORY_TABLES = ("positions", "orders", "fills")
SHADOW_SCHEMA = "ledger_rebuild"
_SQL = load_queries("projections", "rebuild.sql")
# "CREATE [UNIQUE] INDEX <name> ON [ONLY] <table> <rest>": what an index is, without its names.
_INDEX_DEF = re.compile(r"CREATE (UNIQUE )?INDEX \S+ ON (?:ONLY )?\S+ (.*)", re.DOTALL)


class RebuildError(OperationFailed):
    """A rebuild that cannot be done as asked (nothing was swapped): one line, exit status 1."""


@dataclass
class Rebuilt:
    """What a rebuild did (also the ``detail`` of its ``ledger:ops`` entry)."""

    projection: str
    shards: list[int]
    events: int
    seconds: float
    checkpoints: dict[str, str | None]  # shard -> the checkpoint the rebuilt state stands at
    changed: int | None = None  # live: keys (fields, members) rewritten
    rows: dict[str, int] = field(default_factory=dict)  # postgres: rows per table after the swap
    operation: str | None = None  # the entry id in ledger:ops

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        points = ", ".join(f"shard {s} at {c or 'nothing'}" for s, c in self.checkpoints.items())
        if self.projection == "live":
            done = f"{self.changed} live differences rewritten in place"
        else:
            done = "tables swapped in (" + ", ".join(f"{t}: {n} rows" for t, n in self.rows.items()) + ")"
        return f"rebuilt {self.projection} from {self.events} events in {self.seconds:.2f} s: {done}; {points}"


# --------------------------------------------------------------------------- progress


async def _log_total(redis: Any, shards: list[int]) -> int:
    return sum([await log_size(redis, shard) for shard in shards])


def _checkpoint_ids(points: dict[int, EntryKey]) -> dict[str, str | None]:
    return {str(s): entry_text(c) if c != (0, 0) else None for s, c in points.items()}


# --------------------------------------------------------------------------- live


async def rebuild_live(
    redis: Any,
    shards: list[int],
    shard_count: int,
    *,
    conn: psycopg.AsyncConnection[Any] | None = None,
    reason: str = "ledger rebuild --projection live",
    progress: TextIO | None = None,
    final_order_ttl_s: int = live.FINAL_ORDER_TTL_S,
) -> Rebuilt:
    """Rebuild the live keys of ``shards`` in place (module doc); ``conn`` reads the archive
    for what Redis no longer holds."""
    started = time.perf_counter()
    verifier = _Verifier(redis, conn, _Scope(sorted(shards), shard_count), final_order_ttl_s)
    with progress_bar(progress, "rebuild live", await _log_total(redis, shards)) as tick:
        for replay in verifier.replays.values():
            replay.on_event = tick
        await verifier.advance(await _live_checkpoints(redis, verifier.scope.shards))
        changed = await verifier.repair([], action="rebuild", reason=reason)
    return Rebuilt(
        "live",
        verifier.scope.shards,
        sum(r.events for r in verifier.replays.values()),
        time.perf_counter() - started,
        _checkpoint_ids({s: r.live_to for s, r in verifier.replays.items()}),
        changed=changed,
        operation=verifier.recorded.id if verifier.recorded else None,
    )


# --------------------------------------------------------------------------- postgres


def _table(schema: str, table: str) -> sql.Composed:
    return sql.SQL("{}.{}").format(sql.Identifier(schema), sql.Identifier(table))


def _regclass(schema: str, table: str) -> str:
    return _table(schema, table).as_string(None)


async def _home_schema(conn: psycopg.AsyncConnection[Any]) -> str:
    """The schema of the history tables as the session resolves them; all three in one."""
    found = set()
    for table in HISTORY_TABLES:
        row = await (await conn.execute(_SQL["table_schema"], {"table": table})).fetchone()
        if row is None or row[0] is None:
            raise psycopg.errors.UndefinedTable(f'relation "{table}" does not exist')
        found.add(str(row[0]))
    if len(found) != 1:
        raise RebuildError(f"positions, orders and fills are in different schemas ({', '.join(sorted(found))})")
    return found.pop()


def _index_shape(definition: str) -> str:
    match = _INDEX_DEF.fullmatch(definition)
    if match is None:
        raise RebuildError(f"cannot read the index definition {definition!r}")
    return f"{match.group(1) or ''}{match.group(2)}"


async def _indexes(conn: psycopg.AsyncConnection[Any], schema: str, table: str) -> dict[str, str]:
    """Index shape (definition without names) -> index name."""
    cur = await conn.execute(_SQL["indexes"], {"table": _regclass(schema, table)})
    shapes: dict[str, str] = {}
    for name, definition in await cur.fetchall():
        shape = _index_shape(definition)
        if shape in shapes:
            raise RebuildError(f"{schema}.{table} has two identical indexes ({shapes[shape]}, {name}): drop one")
        shapes[shape] = name
    return shapes


async def _create_shadows(conn: psycopg.AsyncConnection[Any], home: str) -> None:
    """Empty shadow tables, each like its original: indexes under the original names, owner and
    privileges copied."""
    await conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(SHADOW_SCHEMA)))
    await conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(SHADOW_SCHEMA)))
    for table in HISTORY_TABLES:
        shadow = _table(SHADOW_SCHEMA, table)
        await conn.execute(sql.SQL("CREATE TABLE {} (LIKE {} INCLUDING ALL)").format(shadow, _table(home, table)))
        originals, copies = await _indexes(conn, home, table), await _indexes(conn, SHADOW_SCHEMA, table)
        if originals.keys() != copies.keys():
            raise RebuildError(f"the shadow of {home}.{table} did not get the same indexes")
        for shape, name in originals.items():
            if copies[shape] != name:
                await conn.execute(
                    sql.SQL("ALTER INDEX {} RENAME TO {}").format(
                        _table(SHADOW_SCHEMA, copies[shape]), sql.Identifier(name)
                    )
                )
        await _copy_grants(conn, home, table)


async def _copy_grants(conn: psycopg.AsyncConnection[Any], home: str, table: str) -> None:
    shadow = _table(SHADOW_SCHEMA, table)
    cur = await conn.execute(_SQL["grants"], {"table": _regclass(home, table)})
    original = await cur.fetchall()
    owner = original[0][0]
    cur = await conn.execute(_SQL["grants"], {"table": _regclass(SHADOW_SCHEMA, table)})
    if (await cur.fetchall())[0][0] != owner:
        await conn.execute(sql.SQL("ALTER TABLE {} OWNER TO {}").format(shadow, sql.Identifier(owner)))
    cur = await conn.execute(_SQL["grants"], {"table": _regclass(SHADOW_SCHEMA, table)})
    for _owner, grantee, _privilege, _grantable in await cur.fetchall():
        if _privilege is not None and grantee != owner:
            await conn.execute(sql.SQL("REVOKE ALL ON {} FROM {}").format(shadow, _role(grantee)))
    for _owner, grantee, privilege, grantable in original:
        if privilege is None:
            continue
        grant = sql.SQL("GRANT {} ON {} TO {}").format(sql.SQL(privilege), shadow, _role(grantee))
        if grantable:
            grant = sql.SQL("{} WITH GRANT OPTION").format(grant)
        await conn.execute(grant)


def _role(name: str | None) -> sql.Composable:
    return sql.SQL("PUBLIC") if name is None else sql.Identifier(name)


async def _write_rows(conn: psycopg.AsyncConnection[Any], replays: list[_Replay]) -> None:
    """Write the replays' rows (the search path names the shadows first), then start the rows
    afresh: a later catch-up writes only what it adds (an upsert never moves a row back)."""
    expected = _expected_history(replays)
    async with conn.transaction():
        await write_fills(conn, expected["fills"].values())
        await write_positions(conn, expected["positions"].values())
        orders = [replay.orders[order_id] for replay in replays for order_id in replay.rows.final_orders]
        if orders:
            await write_orders(conn, orders)
    for replay in replays:
        replay.rows = HistoryRows()


async def _locked_checkpoints(conn: psycopg.AsyncConnection[Any], shards: list[int]) -> dict[int, tuple[int, int]]:
    """Lock every shard's tracking row (created when missing): its projector waits until commit."""
    points = {}
    for shard in shards:
        params = {"projector": PROJECTOR, "shard": shard}
        await conn.execute(PROJECTOR_SQL["checkpoint_init"], params)
        row = await (await conn.execute(PROJECTOR_SQL["checkpoint_lock"], params)).fetchone()
        points[shard] = (int(row[0]), int(row[1])) if row else (0, 0)
    return points


async def rebuild_postgres(
    redis: Any,
    conn: psycopg.AsyncConnection[Any],
    shard_count: int,
    *,
    reason: str = "ledger rebuild --projection postgres",
    progress: TextIO | None = None,
) -> Rebuilt:
    """Rebuild ``positions``, ``orders`` and ``fills`` of every shard into shadow tables and swap
    them in (module doc). ``conn`` is an autocommit connection of its own (its search path is
    changed while the rebuild runs)."""
    started = time.perf_counter()
    shards = list(range(shard_count))
    if not (await (await conn.execute(_SQL["try_lock"])).fetchone() or (False,))[0]:
        raise RebuildError("another `ledger rebuild --projection postgres` is running: wait for it to finish")
    try:
        home = await _home_schema(conn)
        await _create_shadows(conn, home)
        path = sql.SQL("SET search_path TO {}, {}").format(sql.Identifier(SHADOW_SCHEMA), sql.Identifier(home))
        await conn.execute(path)
        replays = [_Replay(shard) for shard in shards]
        with progress_bar(progress, "rebuild postgres", await _log_total(redis, shards)) as tick:
            for replay in replays:
                replay.on_event = tick
                applied = await checkpoint(conn, replay.shard)
                upto = (0, 0) if applied is None else entry_order(applied)
                await replay.advance(redis, conn, ExpectedLive(), (0, 0), upto)
            await _write_rows(conn, replays)
            for table in HISTORY_TABLES:
                await conn.execute(sql.SQL("ANALYZE {}").format(_table(SHADOW_SCHEMA, table)))
            async with conn.transaction():
                points = await _locked_checkpoints(conn, shards)
                originals = sql.SQL(", ").join(_table(home, t) for t in HISTORY_TABLES)
                await conn.execute(sql.SQL("LOCK TABLE {} IN SHARE ROW EXCLUSIVE MODE").format(originals))
                for replay in replays:
                    await replay.advance(redis, conn, ExpectedLive(), (0, 0), points[replay.shard])
                await _write_rows(conn, replays)
                await conn.execute(sql.SQL("DROP TABLE {}").format(originals))
                for table in HISTORY_TABLES:
                    await conn.execute(
                        sql.SQL("ALTER TABLE {} SET SCHEMA {}").format(
                            _table(SHADOW_SCHEMA, table), sql.Identifier(home)
                        )
                    )
                await conn.execute(_SQL["refill_gaps"])
                await conn.execute(sql.SQL("DROP SCHEMA {}").format(sql.Identifier(SHADOW_SCHEMA)))
                rows = {}
                for table in HISTORY_TABLES:
                    cur = await conn.execute(sql.SQL("SELECT count(*) FROM {}").format(_table(home, table)))
                    rows[table] = int((await cur.fetchone() or (0,))[0])
    finally:
        await conn.execute("RESET search_path")
        await conn.execute(_SQL["unlock"])
    result = Rebuilt(
        "postgres",
        shards,
        sum(r.events for r in replays),
        time.perf_counter() - started,
        _checkpoint_ids(points),
        rows=rows,
    )
    operation = await record_operation(
        redis, "rebuild", ",".join(f"{home}.{t}" for t in HISTORY_TABLES), reason, result.as_dict()
    )
    result.operation = operation.id
    return result
