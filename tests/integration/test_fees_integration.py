"""Fees and contract values through the command path (issue 11, item 1), on the real servers.

A strategy executing externally publishes ``place_order`` / ``open_position`` and reports its
fills with ``record_fill``; ``serve`` runs the handler, the live projection and the PostgreSQL
projector in this process. Checked by hand: a spot buy whose fee is paid in the bought coin, the
spot-short check on the size held, a computed fee marked in the log, and an inverse position that
keeps its contract value after the market data changes between two fills (the handler's context
takes the table a ``markets sync`` would have written). ``verify`` finds nothing to report and
``replay`` shows the same state.
"""

from __future__ import annotations

import dataclasses
import json
from decimal import Decimal as D
from pathlib import Path
from typing import Any

import psycopg
import pytest

import consumers.command_handler
import ledger.client.models
from ledger.app.replay import replay
from ledger.client.api import PositionManager
from ledger.domain.enums import Exchange
from ledger.store.log import read_log
from ledger.venues.markets import instrument_table
from projections.verify import verify
from tests.live_helpers import hash_of, quiesce, running_ledger
from tests.pipeline_helpers import blpop_reply, publish, reply_key

USER = "fees-1"
ROLES = ("handler", "projection", "projector")
GROUPS = ("ledger-projector",)
SPOT = "BTC-USDT"  # OKX spot, native id
INVERSE = "BTC-USD-SWAP"  # OKX inverse swap, face value 100 USD in the bundled snapshot


async def send(redis: Any, type_: str, command_id: str, **data: Any) -> dict[str, Any]:
    """Publish one command as a strategy does and wait for its reply."""
    await publish(redis, 1, type_, {"command_id": command_id, "user_id": USER, **data})
    _, reply = await blpop_reply(redis, reply_key(0, USER, command_id))
    return reply


async def accepted(redis: Any, type_: str, command_id: str, **data: Any) -> dict[str, Any]:
    reply = await send(redis, type_, command_id, **data)
    assert reply["status"] == "accepted", reply
    return reply


async def events(redis: Any) -> list[Any]:
    return [stored.event async for stored in read_log(redis, 0)]


def sync_face_value(monkeypatch: pytest.MonkeyPatch, value: D) -> None:
    """The market data after a ``markets sync`` that changed OKX BTC-USD-SWAP's face value: what
    the handler's decisions (its context) and the query models read in this process from now on."""
    table = dict(instrument_table())
    for key, instrument in table.items():
        if key[0] is Exchange.OKX and instrument.market == "BTC/USD:BTC":
            table[key] = dataclasses.replace(instrument, contract_value=value, contract_size=value)
    monkeypatch.setattr(consumers.command_handler, "instrument_table", lambda: table)
    monkeypatch.setattr(ledger.client.models, "instrument_table", lambda: table)


async def test_fees_and_contract_values_through_the_command_path(
    redis: Any, redis_url: str, database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with running_ledger(redis_url, tmp_path, roles=ROLES, database_url=database_url, execution="external"):
        # Spot: buy 1 BTC at 50000, the venue keeping 0.001 BTC.
        buy = await accepted(
            redis, "place_order", "buy", exchange="okx", symbol=SPOT, side="buy", order_type="market", quantity="1"
        )
        fill = await accepted(
            redis,
            "record_fill",
            "buy-fill",
            order_id=buy["order_id"],
            fill_id="t1",
            quantity="1",
            price="50000",
            fee="0.001",
            fee_currency="BTC",
        )
        spot_id = fill["position_id"]
        short = await send(
            redis, "place_order", "sell-1", exchange="okx", symbol=SPOT, side="sell", order_type="market", quantity="1"
        )
        assert short["status"] == "rejected"
        assert short["error"] == {
            "code": "SPOT_SHORT",
            "message": "selling 1 BTC-USDT spot would go short: 0.999 BTC held (fees paid in BTC are not held); "
            "sell at most 0.999",
        }
        # Inverse: 10 contracts long at 40000 (face value 100), the fee computed and marked so.
        entry = await accepted(
            redis, "open_position", "open", exchange="okx", symbol=INVERSE, side="long", size="10", leverage=2
        )
        await accepted(
            redis,
            "record_fill",
            "open-fill",
            order_id=entry["order_id"],
            fill_id="t2",
            quantity="10",
            price="40000",
            fee="0.000125",
            fee_currency="BTC",
            fee_source="computed",
        )
        inverse_id = entry["position_id"]

        sync_face_value(monkeypatch, D(200))  # between two fills of the position

        close = await accepted(redis, "close_position", "close", position_id=inverse_id, size="4")
        await accepted(
            redis, "record_fill", "close-fill", order_id=close["order_id"], fill_id="t3", quantity="4", price="50000"
        )
        await quiesce(redis, 1, GROUPS)

        spot = await hash_of(redis, f"positions:{USER}:okx:{SPOT}:long")
        assert (spot["size"], spot["entry_price"], spot["other_fees"], spot["contract_value"]) == (
            "0.999",
            "50000",
            "{}",
            "",
        )
        assert D(spot["fees"]) == D(50) and D(spot["realized_pnl"]) == D(-50)  # 0.001 BTC * 50000
        assert (await hash_of(redis, f"orders:{buy['order_id']}"))["filled_qty"] == "1"

        inverse = await hash_of(redis, f"positions:{USER}:okx:{INVERSE}:long")
        assert (inverse["size"], inverse["contract_value"]) == ("6", "100")
        # 4 * 100 * (1/40000 - 1/50000) = 400 * 0.000005 = 0.002 BTC (at 200 it would be 0.004)
        assert D(inverse["gross_pnl"]) == D("0.002")
        assert D(inverse["realized_pnl"]) == D("0.001875")  # 0.002 - 0.000125
        # Against a mark, the model uses the recorded 100 too: 6 * 100 * (1/40000 - 1/50000) = 0.003
        [model] = [p for p in await PositionManager(redis).get_positions(USER, "okx", INVERSE)]
        assert model.contract_value == D(100)
        assert model.unrealized_at(D(50000)) == D("0.003")

        log = await events(redis)
        placed = {e.stream: e for e in log if e.type == "OrderPlaced"}
        assert placed[entry["order_id"]].contract_value == "100"
        assert placed[close["order_id"]].contract_value == "100"  # the position's, not today's 200
        fills = [
            json.loads(fields["data"])
            for _, fields in await redis.xrange("ledger:{0}:events")
            if fields["type"] == "OrderFilled"
        ]
        assert [(f["fill_id"], f.get("fee_source")) for f in fills] == [("t1", None), ("t2", "computed"), ("t3", None)]

        async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
            report = await verify(redis, conn, [0], 1)
            book = await replay(redis, conn)
        assert report.differences == []
        rows = {row["id"]: row for row in book.positions}
        assert (rows[spot_id]["size"], rows[inverse_id]["size"]) == ("0.999", "6")
        assert D(rows[inverse_id]["realized_pnl"]) == D("0.001875")
