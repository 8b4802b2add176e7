"""``ledger replay`` (issue 9, part 3): positions and orders rebuilt from the log as of a moment
equal the state the live system showed at that moment (live keys for open positions and every
order, PostgreSQL history for closed positions: realized PnL, fees, entry and exit exact), across
shards, filtered, before and after a trim of archived entries. Real handler, live projection,
projector, Redis, PostgreSQL and the real ``ledger`` script."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
import pytest

from ledger.app.console import ORDER_COLUMNS
from ledger.app.replay import REPLAY_POSITION_COLUMNS, parse_moment
from ledger.client.queries import order_hashes, position_hashes
from ledger.store.keys import ShardKeys
from ledger.store.operations import iso_time
from tests.audit_helpers import ledger_cli
from tests.log_helpers import SYMBOL, T0, Rig, log_entries

ALICE, BOB, CAROL = "alice", "bob", "carol"  # shards 1, 0, 1 of 2
USERS = (ALICE, BOB, CAROL)
# PostgreSQL's size is what the position opened over its life; replay's is its size then (0).
CLOSED_FIELDS = ("status", "entry_price", "exit_price", "realized_pnl", "fees")


async def first_half(rig: Rig) -> None:
    """Alice: a closed round trip, an open long, a resting order; Bob: a long partly reduced, a
    cancelled order; Carol: a short (on another symbol)."""
    await rig.round_trip(ALICE, "100", "120")
    buy = await rig.place(ALICE, "buy", "2", "130")
    await rig.fill(ALICE, buy, "2", "130", fee="0.13")
    await rig.place(ALICE, "sell", "1", "150")
    bob_buy = await rig.place(BOB, "buy", "3", "90")
    await rig.fill(BOB, bob_buy, "3", "90", fee="0.27")
    bob_sell = await rig.place(BOB, "sell", "1", "95")
    await rig.fill(BOB, bob_sell, "1", "95", fee="0.095")
    cancelled = await rig.place(BOB, "buy", "1", "80")
    await rig.send(BOB, "cancel_order", order_id=cancelled)
    await rig.send(BOB, "order_cancelled", order_id=cancelled)
    short = await rig.send(
        CAROL, "place_order", exchange="okx", symbol="ETH-USDT-SWAP", side="sell", order_type="market",
        quantity="5", price="3000",
    )  # fmt: skip
    await rig.fill(CAROL, short["order_id"], "5", "3000", fee="1.5")


async def second_half(rig: Rig) -> None:
    """Alice closes her long and reopens; Bob closes his; Carol adds to her short."""
    await rig.round_trip(ALICE, "140", "135")
    close = await rig.send(ALICE, "close_position", position_id=await open_position_id(rig.redis, ALICE))
    await rig.fill(ALICE, close["order_id"], "2", "160", fee="0.16")
    sell = await rig.place(BOB, "sell", "2", "99")
    await rig.fill(BOB, sell, "2", "99", fee="0.198")
    more = await rig.send(
        CAROL, "place_order", exchange="okx", symbol="ETH-USDT-SWAP", side="sell", order_type="market",
        quantity="1", price="2900",
    )  # fmt: skip
    await rig.fill(CAROL, more["order_id"], "1", "2900", fee="0.29")


async def open_position_id(redis: Any, user: str) -> str:
    (fields,) = await position_hashes(redis, user, "okx", SYMBOL)
    return fields["id"]


async def captured(redis: Any, pg: psycopg.AsyncConnection[Any]) -> dict[str, Any]:
    """What the live system shows now: open positions and orders from the live keys (the fields
    replay prints), closed positions from PostgreSQL history."""
    positions = {}
    for fields in await position_hashes(redis):
        positions[fields["id"]] = {name: fields.get(name, "") for name in REPLAY_POSITION_COLUMNS}
    orders = {}
    for user in USERS:
        for fields in await order_hashes(redis, user):
            orders[fields["id"]] = {name: fields[name] for name in ORDER_COLUMNS}
    cur = await pg.execute(f"SELECT id::text, {', '.join(CLOSED_FIELDS)} FROM positions")
    closed = {row[0]: dict(zip(CLOSED_FIELDS, row[1:], strict=True)) for row in await cur.fetchall()}
    return {"open": positions, "orders": orders, "closed": closed}


def check(replayed: dict[str, Any], expected: dict[str, Any], users: tuple[str, ...] = USERS) -> None:
    positions = {p["id"]: p for p in replayed["positions"]}
    assert {i for i, p in positions.items() if p["status"] == "open"} == set(expected["open"])
    for position_id, fields in expected["open"].items():
        assert positions[position_id] == {**fields, "closed_at": ""}
    closed = {i: p for i, p in positions.items() if p["status"] != "open"}
    assert set(closed) == set(expected["closed"])
    for position_id, row in expected["closed"].items():
        got = closed[position_id]
        assert got["closed_at"] != "" and Decimal(got["size"]) == 0
        assert (got["status"], *(Decimal(got[n]) for n in CLOSED_FIELDS[1:])) == tuple(row.values())
    assert {o["id"]: o for o in replayed["orders"]} == expected["orders"]
    assert {p["user_id"] for p in replayed["positions"]} | {o["user_id"] for o in replayed["orders"]} == set(users)


def only(expected: dict[str, Any], user: str, replayed_ids: set[str]) -> dict[str, Any]:
    return {
        "open": {i: p for i, p in expected["open"].items() if p["user_id"] == user},
        "orders": {i: o for i, o in expected["orders"].items() if o["user_id"] == user},
        "closed": {i: row for i, row in expected["closed"].items() if i in replayed_ids},
    }


async def test_replay_at_a_moment_equals_the_state_captured_then_before_and_after_a_trim(
    redis: Any, redis_url: str, database_url: str, pg: psycopg.AsyncConnection[Any], tmp_path: Path
) -> None:
    rig = await Rig.start(redis, shards=2)
    settings = {"LEDGER_REDIS_URL": redis_url, "LEDGER_DATABASE_URL": database_url}

    async def replay(*args: str) -> Any:
        run = await ledger_cli(tmp_path, "replay", *args, "--json", **settings)
        parsed = run.json()
        assert run.stdout == json.dumps(parsed, indent=2) + "\n"  # the text json.dumps writes
        return parsed

    async with rig.projector(database_url):
        await first_half(rig)
        moment = rig.clock.now
        await rig.project()
        await rig.archive()
        then = await captured(redis, pg)
        assert len(then["open"]) == 3 and len(then["closed"]) == 1 and len(then["orders"]) == 8

        await second_half(rig)
        await rig.project()
        await rig.archive()
        now = await captured(redis, pg)
    assert len(now["closed"]) == 3 and len(now["orders"]) == 13

    replayed = await replay("--until", str(moment))
    assert replayed["until"] == moment
    check(replayed, then)
    assert await replay("--until", iso_time(moment)) == replayed
    check(await replay(), now)
    # Filters: a user (read from that user's shard only), an exchange, a symbol.
    alice = await replay("--until", str(moment), "--user", ALICE)
    check(alice, only(then, ALICE, {p["id"] for p in alice["positions"]}), users=(ALICE,))
    eth = await replay("--until", str(moment), "--symbol", "ETH-USDT-SWAP", "--exchange", "okx")
    check(eth, only(then, CAROL, {p["id"] for p in eth["positions"]}), users=(CAROL,))
    assert await replay("--until", str(moment), "--exchange", "binance") == {
        "until": moment,
        "positions": [],
        "orders": [],
    }

    # Trim every archived entry but the last two of each shard: the same answers, from the archive.
    for shard in range(2):
        ids = await log_entries(redis, shard)
        await redis.xtrim(ShardKeys(shard).events, minid=ids[-2], approximate=False)
        assert await redis.xlen(ShardKeys(shard).events) == 2
    assert await replay("--until", str(moment)) == replayed
    check(await replay(), now)

    # Without the archive, what Redis no longer holds cannot be replayed: one line, exit 1.
    run = await ledger_cli(tmp_path, "replay", LEDGER_REDIS_URL=redis_url)
    assert (run.status, run.stdout) == (1, "")
    assert run.stderr.startswith("ledger: ledger:{0}:events no longer holds ")
    assert run.stderr.endswith(
        "and the archive cannot be read (no postgres configured: set LEDGER_DATABASE_URL or start `ledger serve` "
        "first): give the ledger's PostgreSQL (--database-url or LEDGER_DATABASE_URL)\n"
    )

    # On a terminal: a heading, then the positions and the orders as tables.
    run = await ledger_cli(tmp_path, "replay", "--until", str(moment), "--user", BOB, **settings)
    assert run.status == 0, run.stderr
    lines = run.stdout.splitlines()
    assert lines[0] == f"as of {iso_time(moment)} ({moment}): 1 positions, 3 orders"
    assert lines[1].split() == [
        "id", "user_id", "exchange", "symbol", "side", "status", "size", "entry_price", "exit_price", "fees",
        "realized_pnl",
    ]  # fmt: skip
    bob = then["open"][await only_id(then, BOB)]
    assert lines[2].split() == [bob[n] for n in ("id", "user_id", "exchange", "symbol", "side", "status", "size",
                                                  "entry_price", "exit_price", "fees", "realized_pnl")]  # fmt: skip
    assert lines[3].split()[:3] == ["id", "user_id", "exchange"]
    assert len(lines) == 7


async def only_id(expected: dict[str, Any], user: str) -> str:
    (position_id,) = [i for i, p in expected["open"].items() if p["user_id"] == user]
    return position_id


def test_until_takes_epoch_milliseconds_or_iso_8601() -> None:
    assert parse_moment(str(T0)) == T0
    assert parse_moment("2026-01-01T00:00:00Z") == T0
    assert parse_moment("2026-01-01T09:00:00.250+09:00") == T0 + 250
    assert parse_moment("2026-01-01 00:00:01") == T0 + 1000  # no zone: UTC
    for bad in ("yesterday", "-1", "1e12", "99999999999999999"):
        with pytest.raises(ValueError) as error:
            parse_moment(bad)
        assert str(error.value) == (
            "must be epoch milliseconds or an ISO 8601 time such as 2026-01-02T14:03:00Z, from 1970 to 9999 "
            f"(got {bad!r})"
        )


async def test_a_bad_until_is_a_usage_error(redis_url: str, tmp_path: Path) -> None:
    run = await ledger_cli(tmp_path, "replay", "--until", "yesterday", LEDGER_REDIS_URL=redis_url)
    assert run.status == 2
    assert run.stderr.startswith(
        "ledger replay: argument --until: must be epoch milliseconds or an ISO 8601 time such as "
        "2026-01-02T14:03:00Z, from 1970 to 9999 (got 'yesterday')"
    )
