"""Model-based test of the books (issue 7): random command sequences against the real system.

A hypothesis state machine publishes commands of two users (orders, partial fills, cancels,
one-way flips, hedge mode, closes, liquidations, duplicates, fills of unknown orders, malformed
entries) as raw stream entries to a real Redis, runs two real command handlers taking turns (each
keeps the users it appended for in memory, which the other makes stale) and the live projection
(built by ``ledger serve``'s role factories: the handler's append step makes the live writes while
the projection is caught up) to quiescence after every step, and checks three views against each
other:

* a small independent model written here from CONTRACT §3, §6, §7 (not from the project's code):
  which commands are accepted, order statuses and filled quantities, and per side the one open
  position with its exact size, entry price, fees and net realized PnL;
* the live projection (the legacy keys of CONTRACT §6, read with plain Redis commands);
* a replay of the event log through the domain's ``evolve``, in which a ``PositionOpened`` never
  finds its side already open;

and, the projection having applied the whole log, that each order's snapshot (the handler's
state) maps to exactly its live hash: what ``OrderManager.create_order`` returns without reading
the hash.

Execution is ``external``: the test reports acceptances and fills itself. One linear contract
market per symbol, fees in the settlement currency, so every figure is exact.
"""

from __future__ import annotations

import asyncio
import json
import os
from dataclasses import dataclass, field
from decimal import ROUND_HALF_EVEN, Context, Decimal, localcontext
from pathlib import Path
from typing import Any

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from ledger.app.service import role_factory
from ledger.config import Settings, parse_execution
from ledger.domain import wire
from ledger.domain.evolution import evolve
from ledger.domain.mapping import ORDER
from ledger.domain.state import Book
from ledger.store.eventstore import ORDER_SNAPSHOT
from ledger.store.redis_conn import connect

USERS = ("alice", "bob")
SYMBOLS = ("BTC-USDT-SWAP", "ETH-USDT-SWAP")
SIDES = ("long", "short")
OPEN_STATUSES = {"pending", "open", "partially_filled", "pending_cancel"}
FINAL_STATUSES = {"filled", "cancelled", "rejected", "expired"}
DIVISION = Context(prec=28, rounding=ROUND_HALF_EVEN)  # CONTRACT §7
EXACT = Context(prec=1000)

quantities = st.sampled_from(["0.1", "0.2", "0.25", "0.5", "1", "1.5", "3"]).map(Decimal)
prices = st.sampled_from(["90", "95.5", "100", "104.25", "110", "120"]).map(Decimal)
fees = st.sampled_from(["0", "0", "0.01", "0.05", "0.3"]).map(Decimal)


def _text(value: Any) -> Any:
    return value.decode() if isinstance(value, bytes) else value


# --------------------------------------------------------------------------- the independent model


@dataclass
class MPosition:
    id: str | None = None
    size: Decimal = Decimal(0)
    entry_qty: Decimal = Decimal(0)
    entry_basis: Decimal = Decimal(0)
    entry_price: Decimal = Decimal(0)
    gross: Decimal = Decimal(0)
    fees: Decimal = Decimal(0)

    @property
    def realized(self) -> Decimal:
        return EXACT.subtract(self.gross, self.fees)


@dataclass
class MOrder:
    id: str
    user: str
    symbol: str
    side: str  # buy / sell
    quantity: Decimal
    position_side: str | None = None
    reduce_only: bool = False
    status: str = "pending"
    filled: Decimal = Decimal(0)
    fill_ids: set[str] = field(default_factory=set)
    accepted_by_venue: bool = False


@dataclass
class Model:
    orders: dict[str, MOrder] = field(default_factory=dict)
    positions: dict[tuple[str, str, str], MPosition] = field(default_factory=dict)  # open ones only

    def open(self, user: str, symbol: str, side: str) -> MPosition | None:
        return self.positions.get((user, symbol, side))

    def fill(self, order: MOrder, quantity: Decimal, price: Decimal, fee: Decimal) -> list[tuple[str, str, str]]:
        """Apply a fill to the order and the positions; return the slots opened afresh."""
        with localcontext(EXACT):
            order.filled += quantity
            if order.status not in ("cancelled", "rejected", "expired"):
                if order.filled >= order.quantity:
                    order.status = "filled"
                elif order.status != "pending_cancel":
                    order.status = "partially_filled"
            user, symbol = order.user, order.symbol
            if order.position_side is not None:
                side = order.position_side
                opening = "buy" if side == "long" else "sell"
                if order.side == opening:
                    return self._increase(user, symbol, side, quantity, price, fee)
                held = self.open(user, symbol, side)
                if held is not None:
                    self._reduce(user, symbol, side, min(quantity, held.size), price, fee)
                return []
            opening_side = "long" if order.side == "buy" else "short"
            other = "short" if opening_side == "long" else "long"
            opposite = self.open(user, symbol, other)
            if opposite is None:
                return [] if order.reduce_only else self._increase(user, symbol, opening_side, quantity, price, fee)
            closing = min(quantity, opposite.size)
            rest = quantity - closing
            closing_fee = fee if closing == quantity else DIVISION.divide(fee * closing, quantity)
            self._reduce(user, symbol, other, closing, price, closing_fee)
            if rest == 0 or order.reduce_only:
                return []
            return self._increase(user, symbol, opening_side, rest, price, fee - closing_fee)

    def _increase(
        self, user: str, symbol: str, side: str, quantity: Decimal, price: Decimal, fee: Decimal
    ) -> list[tuple[str, str, str]]:
        slot = (user, symbol, side)
        fresh = slot not in self.positions
        position = self.positions.setdefault(slot, MPosition())
        position.size += quantity
        position.entry_qty += quantity
        position.entry_basis += quantity * price
        position.entry_price = DIVISION.divide(position.entry_basis, position.entry_qty)
        position.fees += fee
        return [slot] if fresh else []

    def _reduce(self, user: str, symbol: str, side: str, quantity: Decimal, price: Decimal, fee: Decimal) -> None:
        position = self.positions[(user, symbol, side)]
        move = (price - position.entry_price) * quantity
        position.gross += move if side == "long" else -move
        position.fees += fee
        position.size -= quantity
        if position.size == 0:
            del self.positions[(user, symbol, side)]


# --------------------------------------------------------------------------- the machine


class Books(RuleBasedStateMachine):
    def __init__(self, redis_url: str, home: Path) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.redis_url = redis_url
        self.home = home
        self.model = Model()
        self.sent: list[tuple[str, dict[str, Any], dict[str, Any]]] = []  # (type, data, first reply)
        self.named_positions: dict[str, str] = {}  # open_position reply: position id -> entry order id
        self.n = 0

    # ------------------------------------------------------------ plumbing

    def run(self, coroutine: Any) -> Any:
        return self.loop.run_until_complete(coroutine)

    @initialize()
    def start(self) -> None:
        async def start() -> None:
            self.redis = await connect(self.redis_url)
            await self.redis.flushall()
            cfg = Settings(redis_url=self.redis_url, shards=1, execution=parse_execution("external"), home=self.home)
            self.handlers = [await role_factory("handler")(self.redis, cfg) for _ in range(2)]
            self.projection = await role_factory("projection")(self.redis, cfg)

        self.run(start())

    def teardown(self) -> None:
        if hasattr(self, "redis"):
            self.run(self.redis.aclose())
        self.loop.close()

    def send(self, type_name: str, data: dict[str, Any], *, raw: str | None = None) -> dict[str, Any]:
        """Publish one command entry, run the ledger to quiescence, return its reply."""
        self.n += 1
        data.setdefault("command_id", f"c-{self.n}")
        payload = raw if raw is not None else json.dumps(data)

        async def go() -> dict[str, Any]:
            await self.redis.xadd("ledger:{0}:commands", {"type": type_name, "data": payload})
            await self.settle()
            key = f"ledger:{{0}}:reply:{data['user_id']}:{data['command_id']}"
            replies = [json.loads(_text(r)) for r in await self.redis.lrange(key, 0, -1)]
            assert len(replies) == 1, (type_name, data, replies)
            return replies[0]

        reply: dict[str, Any] = self.run(go())
        if raw is None:
            self.sent.append((type_name, dict(data), reply))
        return reply

    async def settle(self) -> None:
        """Run the ledger until nothing moves. Two handlers take turns (the one that runs first
        takes the command): each keeps the users it appended for in memory, which the other's
        appends make stale every other command; the append step's token check must turn each
        stale decision into a conflict decided again on fresh state."""
        first, second = self.handlers if self.n % 2 else reversed(self.handlers)
        for _ in range(20):
            moved = 0
            for consumer in [*first, *second, *self.projection]:
                moved += await consumer.burst()
            if moved == 0:
                return
        raise AssertionError("the ledger did not settle")

    def accepted(self, reply: dict[str, Any], expected: bool, what: str) -> None:
        assert (reply["status"] == "accepted") is expected, (what, reply)

    def pick_order(self, data: st.DataObject, *, statuses: set[str] | None = None) -> MOrder | None:
        candidates = [o for o in self.model.orders.values() if statuses is None or o.status in statuses]
        return data.draw(st.sampled_from(candidates)) if candidates else None

    # ------------------------------------------------------------ orders

    @rule(
        user=st.sampled_from(USERS),
        symbol=st.sampled_from(SYMBOLS),
        side=st.sampled_from(["buy", "sell"]),
        quantity=quantities,
        position_side=st.sampled_from([None, None, "long", "short"]),
        reduce_only=st.booleans(),
        fill_at=st.one_of(st.none(), prices),
    )
    def place_order(
        self,
        user: str,
        symbol: str,
        side: str,
        quantity: Decimal,
        position_side: str | None,
        reduce_only: bool,
        fill_at: Decimal | None,
    ) -> None:
        """Place an order; with ``fill_at``, the venue fills it at once (so that sequences of
        positions, flips and hedges are drawn often, not only orders waiting for fills)."""
        data: dict[str, Any] = {
            "user_id": user,
            "exchange": "okx",
            "symbol": symbol,
            "side": side,
            "order_type": "market",
            "quantity": str(quantity),
            "reduce_only": reduce_only,
        }
        if position_side:
            data["position_side"] = position_side
        reply = self.send("place_order", data)
        if reduce_only:
            reduced = position_side or ("short" if side == "buy" else "long")
            opening = "buy" if reduced == "long" else "sell"
            expected = self.model.open(user, symbol, reduced) is not None and side != opening
        else:
            expected = True
        self.accepted(reply, expected, "place_order")
        if expected:
            order_id = reply["order_id"]
            order = self.model.orders[order_id] = MOrder(
                order_id, user, symbol, side, quantity, position_side, reduce_only
            )
            if fill_at is not None:
                self.report_fill(order, quantity, fill_at, Decimal(0))

    @rule(
        data=st.data(),
        side=st.sampled_from(["buy", "sell"]),
        position_side=st.sampled_from([None, None, "long", "short"]),
        change=st.sampled_from(["-0.1", "0", "0.1", "1"]).map(Decimal),
        price=prices,
    )
    def trade_on_an_open_market(
        self, data: st.DataObject, side: str, position_side: str | None, change: Decimal, price: Decimal
    ) -> None:
        """A filled order on a market where a position is open, about its size: flips, hedges
        beside it, reductions and increases, the sequences where books go wrong."""
        if not self.model.positions:
            return
        (user, symbol, _side), position = data.draw(st.sampled_from(sorted(self.model.positions.items())))
        quantity = max(position.size + change, Decimal("0.1"))
        self.place_order(user, symbol, side, quantity, position_side, False, price)

    @rule(
        user=st.sampled_from(USERS),
        symbol=st.sampled_from(SYMBOLS),
        side=st.sampled_from(SIDES),
        size=quantities,
        fill_at=st.one_of(st.none(), prices),
    )
    def open_position(self, user: str, symbol: str, side: str, size: Decimal, fill_at: Decimal | None) -> None:
        data = {"user_id": user, "exchange": "okx", "symbol": symbol, "side": side, "size": str(size), "leverage": 3}
        reply = self.send("open_position", data)
        self.accepted(reply, True, "open_position")
        held = self.model.open(user, symbol, side)
        if held is not None:
            assert reply["position_id"] == held.id, "open_position on an open side names the open position"
        order_id = reply["order_id"]
        order = self.model.orders[order_id] = MOrder(
            order_id, user, symbol, "buy" if side == "long" else "sell", size, position_side=side
        )
        self.named_positions[reply["position_id"]] = order_id
        if fill_at is not None:
            self.report_fill(order, size, fill_at, Decimal(0))

    @rule(data=st.data(), price=prices, size_part=st.sampled_from([None, "half", "all", "more"]))
    def close_position(self, data: st.DataObject, price: Decimal, size_part: str | None) -> None:
        if not self.model.positions:
            return
        (user, symbol, side), position = data.draw(st.sampled_from(sorted(self.model.positions.items())))
        command: dict[str, Any] = {"user_id": user, "position_id": position.id, "price": str(price)}
        size = position.size
        if size_part == "half":
            size = position.size / 2
        elif size_part == "more":
            size = position.size + 1
        if size_part is not None:
            command["size"] = str(size)
        reply = self.send("close_position", command)
        self.accepted(reply, size_part != "more", "close_position")
        if reply["status"] == "accepted":
            order_id = reply["order_id"]
            self.model.orders[order_id] = MOrder(
                order_id, user, symbol, "sell" if side == "long" else "buy", size, position_side=side, reduce_only=True
            )

    @rule(data=st.data(), price=prices)
    def liquidate(self, data: st.DataObject, price: Decimal) -> None:
        if not self.model.positions:
            return
        slot, position = data.draw(st.sampled_from(sorted(self.model.positions.items())))
        reply = self.send("liquidate_position", {"user_id": slot[0], "position_id": position.id, "price": str(price)})
        self.accepted(reply, True, "liquidate_position")
        with localcontext(EXACT):
            move = (price - position.entry_price) * position.size
            position.gross += move if slot[2] == "long" else -move
        del self.model.positions[slot]

    # ------------------------------------------------------------ the venue's reports

    @rule(data=st.data(), part=st.sampled_from(["all", "part", "over"]), price=prices, fee=fees)
    def record_fill(self, data: st.DataObject, part: str, price: Decimal, fee: Decimal) -> None:
        order = self.pick_order(data)
        if order is None:
            return
        remaining = max(order.quantity - order.filled, Decimal("0.1"))
        quantity = {"all": remaining, "part": remaining / 2, "over": remaining + Decimal("0.5")}[part]
        self.report_fill(order, quantity, price, fee)

    def report_fill(self, order: MOrder, quantity: Decimal, price: Decimal, fee: Decimal) -> None:
        fill_id = f"t-{self.n}"
        before = {slot: p.id for slot, p in self.model.positions.items()}
        reply = self.send(
            "record_fill",
            {
                "user_id": order.user,
                "order_id": order.id,
                "fill_id": fill_id,
                "quantity": str(quantity),
                "price": str(price),
                "fee": str(fee),
            },
        )
        self.accepted(reply, True, "record_fill")
        order.fill_ids.add(fill_id)
        opened = self.model.fill(order, quantity, price, fee)
        for slot in opened:
            self.model.positions[slot].id = self._live_position_id(slot)
        for slot, position in self.model.positions.items():
            if slot in before:
                assert position.id == before[slot], "a fill changed the id of an open position"

    def _live_position_id(self, slot: tuple[str, str, str]) -> str:
        user, symbol, side = slot
        value = self.run(self.redis.hget(f"positions:{user}:okx:{symbol}:{side}", "id"))
        assert value is not None, f"the live hash of {slot} is missing"
        return str(_text(value))

    @rule(data=st.data())
    def duplicate_fill(self, data: st.DataObject) -> None:
        filled = [o for o in self.model.orders.values() if o.fill_ids]
        if not filled:
            return
        order = data.draw(st.sampled_from(filled))
        fill_id = data.draw(st.sampled_from(sorted(order.fill_ids)))
        reply = self.send(
            "record_fill",
            {"user_id": order.user, "order_id": order.id, "fill_id": fill_id, "quantity": "1", "price": "100"},
        )
        assert reply["status"] == "rejected" and reply["error"]["code"] == "DUPLICATE_FILL", reply

    @rule(data=st.data())
    def accept(self, data: st.DataObject) -> None:
        order = self.pick_order(data)
        if order is None:
            return
        reply = self.send(
            "order_accepted", {"user_id": order.user, "order_id": order.id, "exchange_order_id": f"x-{self.n}"}
        )
        # The venue's acknowledgement is recorded once, for any order not yet final (after a
        # cancel request or a fill too); it moves only a pending order to open.
        expected = order.status in OPEN_STATUSES and not order.accepted_by_venue
        self.accepted(reply, expected, "order_accepted")
        if expected:
            order.accepted_by_venue = True
            if order.status == "pending":
                order.status = "open"

    @rule(data=st.data(), confirm=st.booleans())
    def cancel(self, data: st.DataObject, confirm: bool) -> None:
        order = self.pick_order(data)
        if order is None:
            return
        type_name = "order_cancelled" if confirm else "cancel_order"
        reply = self.send(type_name, {"user_id": order.user, "order_id": order.id})
        expected = order.status in OPEN_STATUSES  # CONTRACT §3: any order not yet final
        self.accepted(reply, expected, type_name)
        if expected:
            order.status = "cancelled" if confirm else "pending_cancel"

    # ------------------------------------------------------------ hostile input

    @rule(user=st.sampled_from(USERS))
    def fill_of_an_unknown_order(self, user: str) -> None:
        unknown = "00000000-0000-4000-8000-000000000000"
        reply = self.send(
            "record_fill", {"user_id": user, "order_id": unknown, "fill_id": "t-x", "quantity": "1", "price": "1"}
        )
        assert reply["status"] == "rejected" and reply["error"]["code"] == "UNKNOWN_ORDER", reply

    @rule(data=st.data())
    def another_users_order(self, data: st.DataObject) -> None:
        order = self.pick_order(data)
        if order is None:
            return
        other = USERS[1] if order.user == USERS[0] else USERS[0]
        reply = self.send("cancel_order", {"user_id": other, "order_id": order.id})
        assert reply["status"] == "rejected" and reply["error"]["code"] == "UNKNOWN_ORDER", reply

    @rule(user=st.sampled_from(USERS), bad=st.sampled_from(["1e5", "0.1\n", "NaN", "", "-1"]))
    def malformed(self, user: str, bad: str) -> None:
        self.n += 1
        data = {
            "command_id": f"c-{self.n}",
            "user_id": user,
            "exchange": "okx",
            "symbol": SYMBOLS[0],
            "side": "buy",
            "order_type": "market",
            "quantity": bad,
        }
        reply = self.send("place_order", data, raw=json.dumps(data))
        assert reply["status"] == "rejected", reply

    @precondition(lambda self: bool(self.sent))
    @rule(data=st.data())
    def duplicate_command(self, data: st.DataObject) -> None:
        type_name, command, first = data.draw(st.sampled_from(self.sent))
        events_before = self.run(self.redis.xlen("ledger:{0}:events"))
        payload = json.dumps(command)

        async def go() -> list[Any]:
            await self.redis.xadd("ledger:{0}:commands", {"type": type_name, "data": payload})
            await self.settle()
            key = f"ledger:{{0}}:reply:{command['user_id']}:{command['command_id']}"
            return [json.loads(_text(r)) for r in await self.redis.lrange(key, 0, -1)]

        assert self.run(go()) == [first]
        assert self.run(self.redis.xlen("ledger:{0}:events")) == events_before

    # ------------------------------------------------------------ the three views agree

    @invariant()
    def live_projection_matches_the_model(self) -> None:
        if not hasattr(self, "redis"):
            return
        self.run(self._check_live())

    async def _check_live(self) -> None:
        redis = self.redis
        open_ids: dict[str, set[str]] = {user: set() for user in USERS}
        for user in USERS:
            for symbol in SYMBOLS:
                for side in SIDES:
                    live = {
                        _text(k): _text(v)
                        for k, v in (await redis.hgetall(f"positions:{user}:okx:{symbol}:{side}")).items()
                    }
                    expected = self.model.open(user, symbol, side)
                    if expected is None:
                        assert live == {}, (user, symbol, side, live)
                        continue
                    assert live["id"] == expected.id and live["status"] == "open"
                    assert Decimal(live["size"]) == expected.size, (live, expected)
                    assert Decimal(live["entry_price"]) == expected.entry_price, (live, expected)
                    assert Decimal(live["fees"]) == expected.fees, (live, expected)
                    assert Decimal(live["realized_pnl"]) == expected.realized, (live, expected)
                    open_ids[user].add(live["id"])
        active = {_text(m) for m in await redis.smembers("positions:active")}
        assert active == set().union(*open_ids.values())
        for user in USERS:
            assert {_text(m) for m in await redis.smembers(f"positions:index:{user}:okx")} == open_ids[user]
        for order in self.model.orders.values():
            live = {_text(k): _text(v) for k, v in (await redis.hgetall(f"orders:{order.id}")).items()}
            assert live["status"] == order.status, (order, live)
            assert Decimal(live["filled_qty"]) == order.filled, (order, live)
            snapshot = ORDER_SNAPSHOT.decode(await redis.hget("ledger:{0}:orders", order.id))
            assert ORDER.to_live(ORDER.values(snapshot)) == live, (snapshot, live)
        for symbol in SYMBOLS:
            members = {_text(m) for m in await redis.smembers(f"orders:open:okx:{symbol}")}
            assert members == {
                o.id for o in self.model.orders.values() if o.symbol == symbol and o.status in OPEN_STATUSES
            }

    @invariant()
    def the_log_replays_to_the_same_books_with_one_position_per_side(self) -> None:
        if not hasattr(self, "redis"):
            return
        entries = self.run(self.redis.xrange("ledger:{0}:events"))
        book = Book()
        for _entry_id, fields in entries:
            event = wire.decode_event(
                _text(fields[b"type"] if b"type" in fields else fields["type"]),
                fields[b"data"] if b"data" in fields else fields["data"],
            )
            if isinstance(event, wire.PositionOpened):
                assert book.open_position(event.user_id, event.exchange, event.symbol, event.side) is None, (
                    "a second open position on one side",
                    event,
                )
            evolve(book, [event])
        replayed = {
            (p.user_id, p.symbol, p.side.value): p for p in book.positions.values() if p is not None and p.is_open
        }
        assert set(replayed) == set(self.model.positions)
        for slot, position in replayed.items():
            expected = self.model.positions[slot]
            assert (position.id, position.size, position.entry_price) == (
                expected.id,
                expected.size,
                expected.entry_price,
            )
            assert EXACT.subtract(position.gross_pnl, position.fees) == expected.realized
        for order_id, order in self.model.orders.items():
            state = book.orders[order_id]
            assert state is not None and state.status.value == order.status and state.filled_qty == order.filled
        logged = {e_id for e_id, p in book.positions.items() if p is not None}
        for position_id, order_id in self.named_positions.items():
            if self.model.orders[order_id].filled > 0:
                assert position_id in logged, f"open_position named {position_id}, which never existed"


# Bounded in ``make test`` (no shrinking: a failing run prints its steps as drawn); long and shrunk
# in ``make test-fuzz`` (LEDGER_FUZZ_EXAMPLES examples).
LONG_RUN = os.environ.get("LEDGER_FUZZ_EXAMPLES")


@pytest.mark.fuzz
def test_the_books_agree_with_an_independent_model(redis_url: str, tmp_path: Path) -> None:
    run_state_machine_as_test(
        lambda: Books(redis_url, tmp_path),
        settings=settings(
            max_examples=int(LONG_RUN) if LONG_RUN else 40,
            stateful_step_count=30,
            phases=tuple(Phase) if LONG_RUN else (Phase.explicit, Phase.reuse, Phase.generate),
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        ),
    )
