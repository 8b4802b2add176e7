"""``ledger verify`` (issue 9, part 4): the live projection and the PostgreSQL history rebuilt
from the log and compared, key by key and row by row; ``--repair`` rewrites the live keys.

The ledger runs in-process (handler, live projection, paper venue and projector: the scripted
session of tests/live_helpers.py); verify runs as the real ``ledger`` script against it, while
it runs, on a plain Redis and on a Redis Cluster. Each tampering is reported exactly.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import psycopg

from ledger import OrderStatus
from ledger.store.keys import OPERATIONS, shard_of
from projections.live import LiveProjection
from projections.projector import checkpoint
from projections.verify import ABSENT, POSTGRES, REDIS, Difference, verify
from tests.audit_helpers import FAST, KEYS, LEDGER_BIN, USER, Ledger, Run, ledger_cli, projector
from tests.live_helpers import (
    BTC,
    GRID_USER,
    POS_USER,
    SOL,
    Session,
    hash_of,
    quiesce,
    run_session,
    running_ledger,
    wait_order_status,
)
from tests.pipeline_helpers import (
    ServeProcess,
    fill_json,
    ledger_env,
    outcomes_key,
    peek_reply,
    place_order_json,
    reply_key,
    serve_processes_fixture,  # noqa: F401 - the serve_processes fixture
    wait_until,
    xadd,
)

ROLES = ("handler", "projection", "paper", "projector")
GROUPS = ("ledger-paper", "ledger-projector")
COLUMNS = ["store", "key", "field", "expected", "found"]


async def cli_verify(home: Path, redis_url: str, database_url: str, *args: str) -> Run:
    return await ledger_cli(home, "verify", "--redis-url", redis_url, "--database-url", database_url, *args)


def differences(run: Run) -> list[Difference]:
    report = json.loads(run.stdout)
    return [Difference(**d) for d in report["differences"]]


async def api_verify(redis: Any, database_url: str, shards: int, **options: Any) -> list[Difference]:
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        report = await verify(redis, conn, list(range(shards)), shards, **options)
    return report.differences


async def session(redis: Any, shards: int) -> Session:
    s = await run_session(redis, shards)
    await quiesce(redis, shards, GROUPS)
    return s


async def test_healthy_session_verifies(redis: Any, redis_url: str, database_url: str, tmp_path: Path) -> None:
    async with running_ledger(redis_url, tmp_path, roles=ROLES, database_url=database_url):
        await session(redis, 1)
        run = await cli_verify(tmp_path, redis_url, database_url, "--json")
        assert run.status == 0, run.stdout + run.stderr
        report = json.loads(run.stdout)
        assert report["ok"] is True and report["differences"] == []


async def test_verify_takes_the_final_order_lifetime_the_live_projection_records(
    redis: Any, redis_url: str, database_url: str, tmp_path: Path
) -> None:
    """``serve`` with LEDGER_FINAL_ORDER_TTL_S=1 records it: a final order's hash gone a second
    after it ended is expected, even for a ``verify`` run without that setting (7 days)."""
    async with running_ledger(redis_url, tmp_path, roles=ROLES, database_url=database_url, final_order_ttl_s=1):
        s = await session(redis, 1)
        await asyncio.sleep(1.1)
        await redis.delete(f"orders:{s.orders['grid3']}")  # cancelled: past the recorded lifetime
        await redis.srem(f"orders:user:{GRID_USER}:okx", s.orders["grid3"])
        run = await cli_verify(tmp_path, redis_url, database_url, "--json")
        assert (run.status, differences(run)) == (0, []), run.stderr
        await redis.hset("ledger:meta", "final_order_ttl_s", 7 * 24 * 3600)  # as a week-long serve records
        run = await cli_verify(tmp_path, redis_url, database_url, "--json")
        assert run.status == 1
        found = {(d.key, d.field, d.found) for d in differences(run)}
        assert (f"orders:{s.orders['grid3']}", "", ABSENT) in found  # and every other final order's
        assert (f"orders:user:{GRID_USER}:okx", s.orders["grid3"], ABSENT) in found


ORDER_HASH = "a hash of 25 fields"  # CONTRACT §6 order fields and the ones this ledger adds


async def tamper_live(redis: Any, s: Session) -> list[Difference]:
    """One tampering of each kind on the live keys; the differences verify must report."""
    btc_key = f"positions:{POS_USER}:okx:{BTC}:long"
    ghost = "00000000-0000-4000-8000-000000000001"
    placed = f"orders:okx:user:{GRID_USER}:symbol:{SOL}:order_placed_index"
    await redis.hset(btc_key, "size", "9")  # a field changed
    await redis.delete(f"orders:{s.orders['grid2']}")  # an open order's hash missing
    await redis.delete(f"orders:{s.orders['grid3']}")  # a final order's hash, within its retention
    await redis.hset(f"orders:{ghost}", mapping={"id": ghost, "user_id": POS_USER})  # a key the log never wrote
    await redis.srem("positions:active", s.btc)  # a member missing
    await redis.sadd(f"orders:open:okx:{SOL}", ghost)  # a member the log never added
    await redis.hset(placed, "3", "1")  # a GRID level
    return sorted(
        [
            Difference(REDIS, f"orders:{ghost}", "", ABSENT, "a hash of 2 fields"),
            Difference(REDIS, f"orders:{s.orders['grid2']}", "", ORDER_HASH, ABSENT),
            Difference(REDIS, f"orders:{s.orders['grid3']}", "", ORDER_HASH, ABSENT),
            Difference(REDIS, f"orders:open:okx:{SOL}", ghost, ABSENT, "member"),
            Difference(REDIS, placed, "3", "0", "1"),
            Difference(REDIS, btc_key, "size", "0.15", "9"),
            Difference(REDIS, "positions:active", s.btc, "member", ABSENT),
        ],
        key=lambda d: d.key,
    )


async def tamper_history(redis: Any, pg: Any, s: Session) -> list[Difference]:
    """One tampering of each kind on the PostgreSQL rows; the differences verify must report."""
    row = await (await pg.execute("SELECT realized_pnl FROM positions WHERE id = %s", (s.eth,))).fetchone()
    await pg.execute("UPDATE positions SET realized_pnl = realized_pnl + 1 WHERE id = %s", (s.eth,))
    fill = await (await pg.execute("SELECT fill_id FROM fills WHERE order_id = %s", (s.orders["grid0"],))).fetchone()
    await pg.execute("DELETE FROM fills WHERE order_id = %s", (s.orders["grid0"],))
    await pg.execute("DELETE FROM orders WHERE id = %s", (s.orders["grid3"],))
    cur = await pg.execute(
        "UPDATE ledger_events SET data = jsonb_set(data, '{symbol}', '\"XRP-USDT-SWAP\"')"
        " WHERE aggregate_id = %s AND version = 1 RETURNING entry_id, type, data::text",
        (s.orders["grid4"],),
    )
    entry_id, type_name, edited = await cur.fetchone()
    assert type_name == "OrderPlaced"
    ((_id, appended),) = await redis.xrange("ledger:{0}:events", entry_id, entry_id)
    return [
        Difference(POSTGRES, f"positions {s.eth}", "realized_pnl", str(row[0]), str(row[0] + 1)),
        Difference(POSTGRES, f"orders {s.orders['grid3']}", "", "row", ABSENT),
        Difference(POSTGRES, f"fills {s.orders['grid0']}/{fill[0]}", "", "row", ABSENT),
        Difference(POSTGRES, f"ledger_events 0/{entry_id}", "data", appended["data"], edited),
    ]


async def test_each_tampering_is_reported_and_repair_fixes_the_live_ones(
    redis: Any, redis_url: str, database_url: str, pg: Any, tmp_path: Path
) -> None:
    async with running_ledger(redis_url, tmp_path, roles=ROLES, database_url=database_url):
        s = await session(redis, 1)
        assert await api_verify(redis, database_url, 1) == []
        live = await tamper_live(redis, s)
        history = await tamper_history(redis, pg, s)
        assert await api_verify(redis, database_url, 1) == live + history

        # Past its retention a final order's hash may be gone (and its id from orders:user:...).
        await redis.srem(f"orders:user:{GRID_USER}:okx", s.orders["grid3"])
        retained = [d for d in live if d.key != f"orders:{s.orders['grid3']}"]
        assert await api_verify(redis, database_url, 1, final_order_ttl_s=0) == retained + history
        missing_member = Difference(REDIS, f"orders:user:{GRID_USER}:okx", s.orders["grid3"], "member", ABSENT)
        live = sorted([*live, missing_member], key=lambda d: d.key)

        run = await cli_verify(tmp_path, redis_url, database_url)
        assert run.status == 1, run.stderr
        *lines, summary = run.stdout.splitlines()
        cells = [COLUMNS, *([str(d.as_dict()[c]) for c in COLUMNS] for d in live + history)]
        widths = [max(len(row[i]) for row in cells) for i in range(len(COLUMNS))]  # text columns: left-aligned
        assert lines == ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells]
        assert summary.startswith("live state and history 12 differences from the log (shard 0: live at ")

        run = await cli_verify(tmp_path, redis_url, database_url, "--json", "--repair")
        assert run.status == 1, run.stderr
        assert differences(run) == live + history
        assert json.loads(run.stdout)["repaired"] == len(live)

        run = await cli_verify(tmp_path, redis_url, database_url, "--json")
        assert (run.status, differences(run)) == (1, history)
        grid3 = await hash_of(redis, f"orders:{s.orders['grid3']}")
        assert grid3["status"] == "cancelled" and 0 < await redis.ttl(f"orders:{s.orders['grid3']}") <= 7 * 24 * 3600
        (operation,) = [f for _id, f in await redis.xrange(OPERATIONS) if f["action"] == "repair"]
        assert operation["target"] == "ledger:{0}:projection" and operation["reason"] == "ledger verify --repair"
        assert len(json.loads(operation["detail"])["differences"]) == len(live)

        # The projection took its lease back and goes on from its checkpoint.
        await redis.hset("marks:okx", SOL, "135")  # fills grid levels 2 (136) and 0 (135)
        for label in ("grid2", "grid0b"):
            await wait_order_status(redis, s.orders[label], OrderStatus.FILLED)
        await quiesce(redis, 1, GROUPS)
        assert await api_verify(redis, database_url, 1) == history


async def test_lag_is_no_difference(redis: Any, redis_url: str, database_url: str, tmp_path: Path) -> None:
    """Events the projections have not applied yet (both stopped) are compared with nothing."""
    async with running_ledger(redis_url, tmp_path, roles=ROLES, database_url=database_url):
        s = await session(redis, 1)
    async with running_ledger(redis_url, tmp_path, roles=("handler",)):
        data = {"command_id": "lagging-1", "user_id": POS_USER, "position_id": s.btc, "price": "48000"}
        await redis.xadd("ledger:{0}:commands", {"type": "close_position", "data": json.dumps(data)})
        reply = await redis.blpop(["ledger:{0}:reply:user123:lagging-1"], timeout=10)
        assert reply is not None and json.loads(reply[1])["status"] == "accepted"
    run = await cli_verify(tmp_path, redis_url, database_url, "--json")
    assert run.status == 0, run.stdout + run.stderr
    report = json.loads(run.stdout)
    last = (await redis.xrevrange("ledger:{0}:events", count=1))[0][0]
    assert report["shards"]["0"]["live"] == report["shards"]["0"]["history"] != last


async def test_cluster_verify_per_shard_and_repair(
    redis_cluster: Any, redis_cluster_url: str, database_url: str, tmp_path: Path
) -> None:
    shards = 4
    async with running_ledger(redis_cluster_url, tmp_path, roles=ROLES, shards=shards, database_url=database_url):
        s = await session(redis_cluster, shards)
        run = await cli_verify(tmp_path, redis_cluster_url, database_url)
        assert run.status == 0, run.stdout + run.stderr
        pos_shard, grid_shard = (shard_of(user, shards) for user in (POS_USER, GRID_USER))
        assert pos_shard != grid_shard
        btc_key = f"positions:{POS_USER}:okx:{BTC}:long"
        grid_active = f"okx:user:{GRID_USER}:symbol:{SOL}:active_grid:2"
        ghost = "00000000-0000-4000-8000-000000000002"
        await redis_cluster.hset(btc_key, "entry_price", "1")
        await redis_cluster.sadd("positions:active", ghost)  # no shard knows it: every shard reports it
        await redis_cluster.delete(grid_active)
        pos_diffs = [
            Difference(REDIS, "positions:active", ghost, ABSENT, "member"),
            Difference(REDIS, btc_key, "entry_price", "45500", "1"),
        ]
        grid_diffs = [
            Difference(REDIS, grid_active, "", "a hash of 25 fields", ABSENT),
            Difference(REDIS, "positions:active", ghost, ABSENT, "member"),
        ]
        run = await cli_verify(tmp_path, redis_cluster_url, database_url, "--json", "--shard", str(pos_shard))
        assert (run.status, differences(run)) == (1, pos_diffs)
        run = await cli_verify(tmp_path, redis_cluster_url, database_url, "--json", "--shard", str(grid_shard))
        assert (run.status, differences(run)) == (1, grid_diffs)
        run = await cli_verify(tmp_path, redis_cluster_url, database_url, "--json", "--repair")
        assert run.status == 1 and json.loads(run.stdout)["repaired"] == 3, run.stdout + run.stderr
        assert await hash_of(redis_cluster, grid_active) == await hash_of(redis_cluster, f"orders:{s.orders['grid2']}")
        run = await cli_verify(tmp_path, redis_cluster_url, database_url)
        assert run.status == 0, run.stdout + run.stderr


async def test_verify_speed(redis: Any, database_url: str) -> None:
    """Verify of a book of ``LEDGER_VERIFY_EVENTS`` events (2,000 here; 100,000 by hand), built
    by the real handler, live projection and projector; prints the events per second."""
    wanted = int(os.environ.get("LEDGER_VERIFY_EVENTS", "2000"))
    ledger = await Ledger.start(redis)
    orders = wanted // 4  # placed, accepted, filled, position opened or increased
    commands = [("place_order", f"p{i}", PLACE) for i in range(orders)]
    await publish(ledger, commands)
    replies = [json.loads(r) for r in await pipelined(redis, [KEYS.reply(USER, f"p{i}") for i in range(orders)])]
    ids = [reply["order_id"] for reply in replies]
    await publish(
        ledger, [("order_accepted", f"a{i}", {"order_id": o, "exchange_order_id": f"x{i}"}) for i, o in enumerate(ids)]
    )
    fill = {"quantity": "0.001", "price": "100", "fee": "0.001"}
    await publish(
        ledger, [("record_fill", f"f{i}", {"order_id": o, "fill_id": f"t{i}", **fill}) for i, o in enumerate(ids)]
    )
    await LiveProjection(redis, 0).consumer(FAST).burst()
    async with projector(redis, database_url) as consumer:
        await consumer.burst()
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        report = await verify(redis, conn, [0], 1)
    assert report.ok and report.events == 4 * orders, report.differences[:5]
    print(f"\nverify: {report.events} events in {report.seconds:.2f} s, {report.events_per_s} events/s")


PLACE = {
    "exchange": "okx",
    "symbol": "BTC-USDT-SWAP",
    "side": "buy",
    "order_type": "limit",
    "quantity": "0.001",
    "price": "100",
}


async def publish(ledger: Ledger, commands: list[tuple[str, str, dict[str, Any]]]) -> None:
    for start in range(0, len(commands), 1000):
        pipe = ledger.redis.pipeline(transaction=False)
        for type_, command_id, data in commands[start : start + 1000]:
            body = {"command_id": command_id, "user_id": USER, **data}
            pipe.xadd(KEYS.commands, {"type": type_, "data": json.dumps(body)})
        await pipe.execute()
    await ledger.consumer.burst(max_rounds=1_000_000)


async def pipelined(redis: Any, reply_keys: list[str]) -> list[str]:
    pipe = redis.pipeline(transaction=False)
    for key in reply_keys:
        pipe.lindex(key, 0)
    return list(await pipe.execute())


async def test_verify_passes_after_kill_9_rounds(
    redis: Any, redis_url: str, database_url: str, tmp_path: Path, serve_processes: list[ServeProcess]
) -> None:
    """``ledger serve`` (handler, projection, projector) killed with SIGKILL twice mid-stream, then
    restarted: once it has caught up, verify finds nothing."""
    env = {"LEDGER_DATABASE_URL": database_url, "LEDGER_EXECUTION": "external", "LEDGER_CLAIM_IDLE_MS": "1000"}
    users = [f"k9-{n}" for n in range(5)]

    def serve(name: str) -> ServeProcess:
        log = tmp_path / f"{name}.log"
        with open(log, "wb") as out:
            process = subprocess.Popen(
                [str(LEDGER_BIN), "serve", *(a for role in ROLES[:2] + ROLES[3:] for a in ("--role", role))],
                cwd=tmp_path,
                env=ledger_env(redis_url, **env),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        serve_processes.append(ServeProcess(process, log))
        return serve_processes[-1]

    running = serve("first")
    places = [(u, f"{u}:o{k}") for u in users for k in range(4)]
    for user, cid in places:
        await xadd(redis, 0, {"type": "place_order", "data": place_order_json(user, cid, quantity="10")})
    orders = [(u, (await peek_reply(redis, reply_key(0, u, c), timeout=30))["order_id"]) for u, c in places]
    fills = [(u, f"{u}:f{i}", o) for i, (u, o) in enumerate(orders * 30)]
    for user, cid, order_id in fills:
        fill = fill_json(user, cid, order_id, f"T{cid}", quantity="0.01")
        await xadd(redis, 0, {"type": "record_fill", "data": fill})
    total = len(places) + len(fills)
    for round_, at in enumerate((total // 3, 2 * total // 3)):

        async def reached(at: int = at) -> bool:
            return bool(await redis.hlen(outcomes_key(0)) >= at)

        await wait_until(reached, timeout=60, interval=0.005, what=f"{at} commands handled")
        running.process.send_signal(signal.SIGKILL)
        assert running.process.wait(timeout=10) == -signal.SIGKILL
        running = serve(f"restart-{round_}")

    async def caught_up() -> bool:
        last = await redis.xrevrange("ledger:{0}:events", count=1)
        async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
            history = await checkpoint(conn, 0)
        return bool(
            await redis.hlen(outcomes_key(0)) == total
            and last[0][0] == await redis.get("ledger:{0}:projection") == history
        )

    await wait_until(caught_up, timeout=90, interval=0.1, what="the restarted ledger to catch up")
    run = await cli_verify(tmp_path, redis_url, database_url, "--json")
    assert run.status == 0, run.stdout + run.stderr
    assert json.loads(run.stdout)["events"] == len(places) + 2 * len(fills)
    assert running.stop() == 0
