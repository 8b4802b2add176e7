"""``ledger history ID``: the audit trail of one order or position (issue 9, part 6).

Every event with its time, command id, entry id and the state after it, read from the PostgreSQL
archive and, for what the projector has not archived yet, from the Redis log (merged, no event
twice); from the Redis log alone without a database. Real handler, projector, Redis, PostgreSQL
and the real ``ledger`` script.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import psycopg

from ledger.app.servers import free_port
from ledger.store.operations import iso_time
from tests.audit_helpers import KEYS, SYMBOL, USER, Ledger, entries, ledger_cli, projector

ORDER_FIELDS = ("status", "filled_qty", "avg_fill_price", "exchange_order_id", "fill_ids", "version")
POSITION_FIELDS = ("status", "size", "entry_price", "exit_price", "realized_pnl", "fees", "version")

# The buy order's trail: (type, command id, status, filled_qty, avg_fill_price, exchange_order_id, fill ids).
ORDER_TRAIL = [
    ("OrderPlaced", "c-place", "pending", "0", None, None, []),
    ("OrderAccepted", "c-accept", "open", "0", None, "x-1", []),
    ("OrderFilled", "c-fill-1", "partially_filled", "0.4", "100", "x-1", ["f1"]),
    ("OrderFilled", "c-fill-2", "filled", "1.0", "106", "x-1", ["f1", "f2"]),
]
# The position's trail: (type, command id, status, size, entry, exit, net realized PnL, fees).
POSITION_TRAIL = [
    ("PositionOpened", "c-fill-1", "open", "0.4", "100", None, "-0.01", "0.01"),
    ("PositionIncreased", "c-fill-2", "open", "1.0", "106", None, "-0.02", "0.02"),
    ("PositionReduced", "c-fill-3", "open", "0.5", "106", "120", "6.97", "0.03"),
    ("PositionClosed", "c-fill-4", "closed", "0.0", "106", "125", "18.96", "0.04"),
]


async def buy(ledger: Ledger) -> str:
    """Place a limit buy of 1 @ 100 and have the venue accept it; return the order id."""
    placed = await ledger.accepted(
        "place_order",
        "c-place",
        exchange="okx",
        symbol=SYMBOL,
        side="buy",
        order_type="limit",
        quantity="1",
        price="100",
    )
    await ledger.accepted("order_accepted", "c-accept", order_id=placed["order_id"], exchange_order_id="x-1")
    return str(placed["order_id"])


async def fill_and_close(ledger: Ledger, order_id: str) -> str:
    """Fill the buy 0.4 @ 100 and 0.6 @ 110, then sell it all 0.5 @ 120 and 0.5 @ 130; return
    the sell order's id. Every fill pays a fee of 0.01."""
    fill = {"fee": "0.01"}
    await ledger.accepted(
        "record_fill", "c-fill-1", order_id=order_id, fill_id="f1", quantity="0.4", price="100", **fill
    )
    await ledger.accepted(
        "record_fill", "c-fill-2", order_id=order_id, fill_id="f2", quantity="0.6", price="110", **fill
    )
    sell = await ledger.accepted(
        "place_order",
        "c-sell",
        exchange="okx",
        symbol=SYMBOL,
        side="sell",
        order_type="limit",
        quantity="1",
        price="120",
    )
    sell_id = str(sell["order_id"])
    await ledger.accepted(
        "record_fill", "c-fill-3", order_id=sell_id, fill_id="f3", quantity="0.5", price="120", **fill
    )
    await ledger.accepted(
        "record_fill", "c-fill-4", order_id=sell_id, fill_id="f4", quantity="0.5", price="130", **fill
    )
    return sell_id


async def logged(redis: Any, aggregate_id: str) -> list[tuple[str, dict[str, Any]]]:
    """The aggregate's events in the Redis log: (entry id, data)."""
    found = [(i, json.loads(f["data"])) for i, f in await entries(redis, KEYS.events)]
    return [(i, data) for i, data in found if data["stream"] == aggregate_id]


def expected_events(log: list[tuple[str, dict[str, Any]]], trail: list[tuple[Any, ...]], sources: list[str]) -> list:
    """The ``events`` of ``history ID --json`` without their states, from the log itself."""
    assert len(log) == len(trail) == len(sources)
    return [
        {
            "version": n,
            "type": step[0],
            "ts": data["ts"],
            "time": iso_time(data["ts"]),
            "command_id": step[1],
            "event_id": data["event_id"],
            "entry_id": entry_id,
            "source": source,
        }
        for n, ((entry_id, data), step, source) in enumerate(zip(log, trail, sources, strict=True), start=1)
    ]


def without_states(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in e.items() if k != "state"} for e in events]


def order_states(events: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    return [tuple(e["state"][name] for name in ORDER_FIELDS) for e in events]


def position_states(events: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    return [tuple(e["state"][name] for name in POSITION_FIELDS) for e in events]


EXPECTED_ORDER_STATES = [(*step[2:], n) for n, step in enumerate(ORDER_TRAIL, start=1)]
EXPECTED_POSITION_STATES = [(*step[2:], n) for n, step in enumerate(POSITION_TRAIL, start=1)]


async def position_of(redis: Any) -> str:
    for _entry_id, fields in await entries(redis, KEYS.events):
        if fields["type"] == "PositionOpened":
            return str(json.loads(fields["data"])["stream"])
    raise AssertionError("no position was opened")


async def history(tmp_path: Path, redis_url: str, database_url: str, *args: str) -> Any:
    return (
        await ledger_cli(
            tmp_path, "history", *args, "--json", LEDGER_REDIS_URL=redis_url, LEDGER_DATABASE_URL=database_url
        )
    ).json()


async def test_trail_of_an_order_and_a_position_from_the_archive(
    redis: Any, redis_url: str, database_url: str, tmp_path: Path
) -> None:
    ledger = await Ledger.start(redis)
    order_id = await buy(ledger)
    await fill_and_close(ledger, order_id)
    position_id = await position_of(redis)
    async with projector(redis, database_url) as consumer:
        await consumer.burst()

    order = await history(tmp_path, redis_url, database_url, order_id)
    assert {k: v for k, v in order.items() if k != "events"} == {
        "id": order_id,
        "kind": "order",
        "shard": 0,
        "user_id": USER,
        "exchange": "okx",
        "symbol": SYMBOL,
        "archive": "read",
    }
    log = await logged(redis, order_id)
    assert without_states(order["events"]) == expected_events(log, ORDER_TRAIL, ["archive"] * 4)
    assert order_states(order["events"]) == EXPECTED_ORDER_STATES

    position = await history(tmp_path, redis_url, database_url, position_id.upper())  # ids in either case
    assert (position["id"], position["kind"]) == (position_id, "position")
    log = await logged(redis, position_id)
    assert without_states(position["events"]) == expected_events(log, POSITION_TRAIL, ["archive"] * 4)
    assert position_states(position["events"]) == EXPECTED_POSITION_STATES

    # On a terminal: a heading and one row per event with the main fields of the state after it.
    run = await ledger_cli(tmp_path, "history", order_id, LEDGER_REDIS_URL=redis_url, LEDGER_DATABASE_URL=database_url)
    assert run.status == 0, run.stderr
    lines = run.stdout.splitlines()
    assert lines[0] == (
        f"order {order_id}: user {USER}, okx {SYMBOL}, shard 0; 4 events (4 from the archive, 0 from Redis)"
    )
    assert lines[1].split() == [
        "version",
        "time",
        "type",
        "command_id",
        "entry_id",
        "status",
        "filled_qty",
        "avg_fill_price",
        "exchange_order_id",
    ]
    log = await logged(redis, order_id)
    assert [line.split()[:6] for line in lines[2:]] == [
        [str(n), iso_time(data["ts"]), step[0], step[1], entry_id, step[2]]
        for n, ((entry_id, data), step) in enumerate(zip(log, ORDER_TRAIL, strict=True), start=1)
    ]


async def test_projector_behind_the_archive_and_redis_merge_without_duplicates(
    redis: Any, redis_url: str, database_url: str, tmp_path: Path
) -> None:
    ledger = await Ledger.start(redis)
    order_id = await buy(ledger)
    async with projector(redis, database_url) as consumer:
        await consumer.burst()  # archives placed + accepted, then stops: the projector lags
    await fill_and_close(ledger, order_id)
    position_id = await position_of(redis)

    order = await history(tmp_path, redis_url, database_url, order_id)
    log = await logged(redis, order_id)
    sources = ["archive", "archive", "redis", "redis"]
    assert without_states(order["events"]) == expected_events(log, ORDER_TRAIL, sources)
    assert order_states(order["events"]) == EXPECTED_ORDER_STATES

    position = await history(tmp_path, redis_url, database_url, position_id)
    log = await logged(redis, position_id)
    assert without_states(position["events"]) == expected_events(log, POSITION_TRAIL, ["redis"] * 4)
    assert position_states(position["events"]) == EXPECTED_POSITION_STATES


async def test_an_event_missing_from_the_archive_is_read_from_redis_once(
    redis: Any, redis_url: str, database_url: str, pg: psycopg.AsyncConnection[Any], tmp_path: Path
) -> None:
    """The projector dead-lettered the OrderAccepted (PostgreSQL refused it) and archived the rest:
    the trail takes that one event from the Redis log and every other from the archive, once."""
    await pg.execute(
        "CREATE FUNCTION refuse_accepted() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
        "IF NEW.type = 'OrderAccepted' THEN RAISE EXCEPTION 'refused by the test'; END IF; RETURN NEW; END $$"
    )
    await pg.execute(
        "CREATE TRIGGER refuse_accepted BEFORE INSERT ON ledger_events FOR EACH ROW EXECUTE FUNCTION refuse_accepted()"
    )
    ledger = await Ledger.start(redis)
    order_id = await buy(ledger)
    await fill_and_close(ledger, order_id)
    async with projector(redis, database_url) as consumer:
        await consumer.burst()
    cur = await pg.execute("SELECT version FROM ledger_events WHERE aggregate_id = %s ORDER BY version", [order_id])
    assert [v for (v,) in await cur.fetchall()] == [1, 3, 4]

    order = await history(tmp_path, redis_url, database_url, order_id)
    log = await logged(redis, order_id)
    sources = ["archive", "redis", "archive", "archive"]
    assert without_states(order["events"]) == expected_events(log, ORDER_TRAIL, sources)
    assert order_states(order["events"]) == EXPECTED_ORDER_STATES


async def test_without_a_database_the_trail_is_read_from_the_redis_log(
    redis: Any, redis_url: str, tmp_path: Path
) -> None:
    ledger = await Ledger.start(redis)
    order_id = await buy(ledger)
    await fill_and_close(ledger, order_id)
    closed = f"postgresql://ledger@127.0.0.1:{free_port()}/ledger"

    order = await history(tmp_path, redis_url, closed, order_id)
    assert order["archive"].startswith("connection failed")
    log = await logged(redis, order_id)
    assert without_states(order["events"]) == expected_events(log, ORDER_TRAIL, ["redis"] * 4)
    assert order_states(order["events"]) == EXPECTED_ORDER_STATES

    # No database configured at all (no private server under LEDGER_HOME either).
    run = await ledger_cli(tmp_path, "history", order_id, "--json", LEDGER_REDIS_URL=redis_url)
    assert run.json()["archive"] == "no postgres configured: set LEDGER_DATABASE_URL or start `ledger serve` first"
    assert without_states(run.json()["events"]) == expected_events(log, ORDER_TRAIL, ["redis"] * 4)


async def test_an_unknown_id_or_no_id_is_one_line(
    redis: Any, redis_url: str, database_url: str, tmp_path: Path
) -> None:
    await (await Ledger.start(redis)).accepted(
        "place_order",
        "c-other",
        exchange="okx",
        symbol=SYMBOL,
        side="buy",
        order_type="market",
        quantity="1",
        price="100",
    )
    settings = {"LEDGER_REDIS_URL": redis_url, "LEDGER_DATABASE_URL": database_url}
    unknown = "00000000-0000-4000-8000-000000000000"

    run = await ledger_cli(tmp_path, "history", unknown, **settings)
    assert (run.status, run.stdout) == (1, "")
    assert run.stderr == f"ledger: no order or position {unknown} in this ledger: check the id\n"

    run = await ledger_cli(tmp_path, "history", **settings)
    assert (run.status, run.stderr) == (2, "ledger: history: give an order or position ID, or --user U\n")

    run = await ledger_cli(tmp_path, "history", unknown, "--user", USER, **settings)
    assert run.status == 2
    assert run.stderr == "ledger: history: give an order or position ID, or --user U (with filters), not both\n"

    run = await ledger_cli(tmp_path, "history", "not-an-id", **settings)
    assert run.status == 2
    assert run.stderr.startswith("ledger history: argument id: id: must be a UUID string (got 'not-an-id')")

    # The listing of closed positions and final orders stays.
    assert (await ledger_cli(tmp_path, "history", "--user", USER, "--json", **settings)).json() == {
        "positions": [],
        "orders": [],
    }


async def test_trail_on_a_redis_cluster(redis_cluster: Any, redis_cluster_url: str, tmp_path: Path) -> None:
    ledger = await Ledger.start(redis_cluster)
    order_id = await buy(ledger)
    closed = f"postgresql://ledger@127.0.0.1:{free_port()}/ledger"

    order = await history(tmp_path, redis_cluster_url, closed, order_id)
    log = await logged(redis_cluster, order_id)
    assert without_states(order["events"]) == expected_events(log, ORDER_TRAIL[:2], ["redis"] * 2)
    assert order_states(order["events"]) == EXPECTED_ORDER_STATES[:2]
