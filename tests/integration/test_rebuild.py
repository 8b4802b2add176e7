"""``ledger rebuild --projection live|postgres`` (issue 9, part 8) while ``serve`` runs, and the
paper venue's rebuild over both tiers of the log after a trim.

The ledger runs in-process (``running_ledger``: handler, live projection, paper venue, projector);
the rebuild runs as the real ``ledger`` script against it, or in-process where the test must
interleave with it. Readers poll all along and must only ever see whole states.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest

from consumers.paper import PaperKeys
from ledger import OrderManager, OrderStatus
from ledger.store.keys import OPERATIONS, ShardKeys, marks
from ledger.store.log import LogError
from projections.live import LiveProjection
from projections.projector import PROJECTOR, checkpoint
from projections.rebuild import rebuild_postgres
from projections.trim import trim_shard
from projections.verify import verify
from tests.audit_helpers import ledger_cli, projector
from tests.integration.test_paper import LINEAR, Rig
from tests.live_helpers import BTC, GRID_USER, POS_USER, SOL, hash_of, members, quiesce, run_session, running_ledger
from tests.live_helpers import shard_of_user as shard_of

ROLES = ("handler", "projection", "paper", "projector")
GROUPS = ("ledger-paper", "ledger-projector")
TABLES = ("positions", "orders", "fills")
READER_ROLE = "ledger_rebuild_reader"


async def poll_while(task: asyncio.Task[Any], read: Callable[[], Awaitable[Any]]) -> list[Any]:
    """Read again and again until ``task`` is done (and once more after); return every reading."""
    seen = []
    while not task.done():
        seen.append(await read())
        await asyncio.sleep(0)
    seen.append(await read())
    return seen


async def rebuild_cli(home: Path, redis_url: str, database_url: str, *args: str) -> Any:
    return await ledger_cli(home, "rebuild", "--redis-url", redis_url, "--database-url", database_url, *args)


async def verified(redis: Any, database_url: str, shards: int) -> list[Any]:
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        return (await verify(redis, conn, list(range(shards)), shards)).differences


# --------------------------------------------------------------------------- live


async def test_live_rebuild_rewrites_only_differences_and_readers_never_see_a_hole(
    redis: Any, redis_url: str, database_url: str, tmp_path: Path
) -> None:
    async with running_ledger(redis_url, tmp_path, roles=ROLES, database_url=database_url):
        s = await run_session(redis, 1)
        await quiesce(redis, 1, GROUPS)
        btc_key = f"positions:{POS_USER}:okx:{BTC}:long"
        grid_order = f"orders:{s.orders['grid2']}"
        whole = (
            await hash_of(redis, btc_key),
            await hash_of(redis, grid_order),
            await members(redis, "positions:active"),
        )
        ghost = "00000000-0000-4000-8000-000000000009"
        await redis.hset(f"orders:{s.orders['grid4']}", "price", "1")  # a field changed
        await redis.hset(f"orders:{ghost}", mapping={"id": ghost})  # a key the log never wrote
        await redis.srem(f"orders:open:okx:{SOL}", s.orders["grid4"])  # a member missing

        async def read() -> tuple[Any, ...]:
            return (
                await hash_of(redis, btc_key),
                await hash_of(redis, grid_order),
                await members(redis, "positions:active"),
            )

        task = asyncio.create_task(rebuild_cli(tmp_path, redis_url, database_url, "--projection", "live", "--json"))
        seen = await poll_while(task, read)
        run = task.result()
        assert (run.status, run.stderr) == (0, ""), run.stdout + run.stderr
        done = json.loads(run.stdout)
        assert (done["projection"], done["shards"], done["changed"]) == ("live", [0], 3)
        assert len(seen) > 1 and all(reading == whole for reading in seen)
        assert await hash_of(redis, f"orders:{s.orders['grid4']}") == {
            **await hash_of(redis, f"orders:{s.orders['grid4']}"),
            "price": "132",
        }
        assert not await redis.exists(f"orders:{ghost}")
        assert s.orders["grid4"] in await members(redis, f"orders:open:okx:{SOL}")
        assert await verified(redis, database_url, 1) == []
        ((op_id, op),) = [(i, f) for i, f in await redis.xrange(OPERATIONS) if f["action"] == "rebuild"]
        assert (op_id, op["target"], op["reason"]) == (done["operation"], "ledger:{0}:projection", "manual rebuild")
        assert len(json.loads(op["detail"])["differences"]) == 3
        # The projection goes on from its checkpoint: new events still reach the live keys.
        order = await OrderManager(redis, timeout=15).create_order(GRID_USER, "okx", SOL, "buy", "limit", "1", "120")
        assert (await hash_of(redis, f"orders:{order.id}"))["id"] == str(order.id)


# --------------------------------------------------------------------------- postgres


async def table_rows(conn: Any) -> dict[str, list[tuple[Any, ...]]]:
    rows = {}
    for table in TABLES:
        order = "order_id, fill_id" if table == "fills" else "id"
        rows[table] = await (await conn.execute(f"SELECT * FROM {table} ORDER BY {order}")).fetchall()
    return rows


async def table_shape(conn: Any) -> list[tuple[Any, ...]]:
    """Every index, constraint, privilege and owner of the history tables, by name."""
    cur = await conn.execute(
        """
        SELECT 'index', tablename, indexname, indexdef FROM pg_indexes WHERE tablename = ANY(%(t)s)
        UNION ALL
        SELECT 'constraint', conrelid::regclass::text, conname, pg_get_constraintdef(oid)
        FROM pg_constraint WHERE conrelid::regclass::text = ANY(%(t)s)
        UNION ALL
        SELECT 'table', relname, pg_get_userbyid(relowner), coalesce(relacl::text, '')
        FROM pg_class WHERE relname = ANY(%(t)s) AND relkind = 'r'
        ORDER BY 1, 2, 3
        """,
        {"t": list(TABLES)},
    )
    return await cur.fetchall()


async def test_postgres_rebuild_swaps_in_the_projectors_rows_and_readers_never_see_a_partial_table(
    redis: Any, redis_url: str, database_url: str, pg: Any, tmp_path: Path
) -> None:
    async with running_ledger(redis_url, tmp_path, roles=ROLES, database_url=database_url):
        s = await run_session(redis, 1)
        await quiesce(redis, 1, GROUPS)
        projected = await table_rows(pg)
        assert [len(projected[t]) for t in TABLES] == [1, 8, 7]  # eth closed; 8 final orders, 7 fills
        try:
            await pg.execute(f"CREATE ROLE {READER_ROLE}")
        except psycopg.errors.DuplicateObject:
            pass
        await pg.execute(f"GRANT SELECT ON positions, fills TO {READER_ROLE}")
        shape = await table_shape(pg)
        # History tampered with: a fill deleted, a position changed; gaps that disagree with it.
        await pg.execute("DELETE FROM fills WHERE order_id = %s", (s.orders["grid0"],))
        await pg.execute("UPDATE positions SET realized_pnl = 0 WHERE id = %s", (s.eth,))
        ghost = "00000000-0000-4000-8000-00000000000a"
        await pg.execute(
            "INSERT INTO projector_gaps (shard, entry_id, entry_ms, entry_seq, type, aggregate_id, code, reason, "
            "filled_at) VALUES (0, '1-1', 1, 1, 'OrderFilled', %s, 'X', 'test', now()), "
            "(0, '1-2', 1, 2, 'OrderFilled', %s, 'X', 'test', NULL)",
            (ghost, s.orders["grid1"]),
        )

        async def read() -> tuple[int, ...]:
            cur = await pg.execute(
                "SELECT (SELECT count(*) FROM positions), (SELECT count(*) FROM orders), (SELECT count(*) FROM fills)"
            )
            return tuple(await cur.fetchone())

        task = asyncio.create_task(rebuild_cli(tmp_path, redis_url, database_url, "--projection", "postgres", "--json"))
        seen = await poll_while(task, read)
        run = task.result()
        assert (run.status, run.stderr) == (0, ""), run.stdout + run.stderr
        assert len(seen) > 1 and set(seen) <= {(1, 8, 6), (1, 8, 7)} and seen[-1] == (1, 8, 7)
        done = json.loads(run.stdout)
        assert (done["projection"], done["rows"]) == ("postgres", {"positions": 1, "orders": 8, "fills": 7})
        assert done["checkpoints"] == {"0": await checkpoint(pg, 0, PROJECTOR)}
        assert await table_rows(pg) == projected
        assert await table_shape(pg) == shape
        gaps = await (
            await pg.execute("SELECT entry_id, filled_at IS NOT NULL FROM projector_gaps ORDER BY 1")
        ).fetchall()
        assert gaps == [("1-1", False), ("1-2", True)]
        left = await (await pg.execute("SELECT count(*) FROM pg_namespace WHERE nspname = 'ledger_rebuild'")).fetchone()
        assert left == (0,)
        ((op_id, op),) = [(i, f) for i, f in await redis.xrange(OPERATIONS) if f["action"] == "rebuild"]
        assert (op_id, op["target"], op["reason"]) == (
            done["operation"],
            "public.positions,public.orders,public.fills",
            "manual rebuild",
        )
        assert await verified(redis, database_url, 1) == []
        # The projector writes into the new tables.
        om = OrderManager(redis, timeout=15)
        order = await om.create_order(GRID_USER, "okx", SOL, "buy", "limit", "1", "120")
        assert await om.cancel_order(str(order.id)) is True
        await quiesce(redis, 1, GROUPS)
        found = await (await pg.execute("SELECT status FROM orders WHERE id = %s", (order.id,))).fetchone()
        assert found == ("cancelled",)
        run = await rebuild_cli(tmp_path, redis_url, database_url, "--projection", "postgres", "--shard", "0")
        assert (run.status, run.stderr) == (
            2,
            "ledger: --shard: the history tables hold every shard's rows and are rebuilt whole; drop --shard\n",
        )


async def test_postgres_rebuild_loses_no_row_the_projector_writes_meanwhile(
    redis: Any, redis_url: str, database_url: str, pg: Any, tmp_path: Path
) -> None:
    """Shard 0's tracking row is held by the test, so the rebuild waits there with its shadows
    built, while shard 1's projector goes on writing into the old tables; those rows must be in
    the new ones (the swap catches up to the locked checkpoints)."""
    shards = 2
    user = next(u for u in (f"late-{i}" for i in range(100)) if shard_of(u, shards) == 1)
    async with running_ledger(redis_url, tmp_path, roles=ROLES, shards=shards, database_url=database_url):
        await run_session(redis, shards)
        await quiesce(redis, shards, GROUPS)
        async with await psycopg.AsyncConnection.connect(database_url) as holder:
            await holder.execute("SELECT 1 FROM projector_checkpoints WHERE shard = 0 FOR UPDATE")
            async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
                task = asyncio.create_task(rebuild_postgres(redis, conn, shards))

                async def waiting() -> bool:
                    cur = await pg.execute(
                        "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE %s",
                        ("%projector_checkpoints%FOR UPDATE%",),
                    )
                    return bool((await cur.fetchone())[0])

                while not await waiting():
                    assert not task.done(), task
                    await asyncio.sleep(0.02)
                om = OrderManager(redis, timeout=15)
                order = await om.create_order(user, "okx", SOL, "buy", "limit", "1", "120")
                assert await om.cancel_order(str(order.id)) is True
                await quiesce(redis, shards, GROUPS)
                old = await (await pg.execute("SELECT status FROM orders WHERE id = %s", (order.id,))).fetchone()
                assert old == ("cancelled",)  # in the old table, after the shadows were filled
                await holder.rollback()
                done = await task
        found = await (await pg.execute("SELECT status FROM orders WHERE id = %s", (order.id,))).fetchone()
        assert found == ("cancelled",)
        assert done.checkpoints == {str(s): await checkpoint(pg, s, PROJECTOR) for s in range(shards)}
        assert await verified(redis, database_url, shards) == []


# --------------------------------------------------------------------------- the paper venue


async def test_paper_rebuild_reads_the_archive_after_a_trim(redis: Any, database_url: str) -> None:
    rig = Rig(redis)
    live = LiveProjection(redis, 0).consumer()
    await redis.hset(marks("okx"), LINEAR, "45000")
    resting = await rig.place(side="buy", order_type="limit", quantity="0.1", price="44000")
    await rig.place(side="buy", order_type="limit", quantity="0.1", price="45000")  # filled at once
    cancelled = await rig.place(side="buy", order_type="limit", quantity="0.1", price="43000")
    await rig.send("cancel_order", order_id=cancelled)
    await rig.settle()
    await live.burst()
    async with projector(redis, database_url) as consumer:
        await consumer.burst()
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        trimmed = await trim_shard(redis, conn, 0)
        assert sum(t.removed for t in trimmed if t.stream == ShardKeys(0).events) > 0
        assert await redis.xlen(ShardKeys(0).events) == 0  # every event is in the archive only
        await redis.delete(PaperKeys(0).resting)  # lost
        with pytest.raises(LogError, match="no longer holds .* entries .* and the archive cannot be read"):
            await rig.venue.rebuild()
        assert await redis.hlen(PaperKeys(0).resting) == 0
        assert await rig.venue.rebuild(conn) == 1
    assert set(await redis.hkeys(PaperKeys(0).resting)) == {resting}
    await rig.mark("43900")
    assert await rig.status(resting) is OrderStatus.FILLED
