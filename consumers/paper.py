"""The paper venue: a simulated exchange for the exchanges configured ``paper`` (CONTRACT §8).

It behaves like an external venue. One consumer group, ``ledger-paper``, reads each shard's
event log (exclusive per shard through the lease ``ledger:{s}:lease:ledger-paper``, so events
are handled in log order) and the venue answers by PUBLISHING COMMANDS to the same shard's
``ledger:{s}:commands``, exactly as a strategy reporting an external execution would:

* ``OrderPlaced`` of a ``market`` order: ``order_accepted`` then ``record_fill`` of the whole
  quantity at the order's ``price`` if given, else at the mark (``HGET marks:{exchange} symbol``);
  ``order_rejected`` ("no price and no mark for <symbol>") when there is neither. Reduce-only
  closes (``close_position``) and entries (``open_position``) are market orders like any other.
* ``OrderAdopted`` (``adopt_order``: an order at a real venue already) is never simulated: the
  venue reads events by type name, and rebuilding the resting set skips it.
* ``OrderPlaced`` of a ``limit``, ``stop_market``, ``stop_limit`` or ``take_profit_market``
  order: ``order_accepted``, and the order RESTS in ``ledger:{s}:paper:resting``. A watcher
  polls the marks of the symbols with resting orders (every ``poll_interval_s``, 100 ms by
  default) and fills crossing orders whole:

  - ``limit``: buy when mark <= price, sell when mark >= price, at the limit price;
  - ``stop_market``: triggers when buy mark >= trigger / sell mark <= trigger, fills at the mark;
  - ``take_profit_market``: triggers when buy mark <= trigger / sell mark >= trigger, fills at
    the mark;
  - ``stop_limit``: triggers like a stop, then behaves as a ``limit`` at its price.

  An order that crosses already when it is placed fills at once (at its limit price, or at the
  mark for the market-like triggers).
* ``OrderCancelRequested`` of a resting order: ``order_cancelled``. An order that is no longer
  resting (a market order, which fills at once, or one already filled) is left alone: the
  request loses the race, as on a real venue.
* Events that make an order final (``OrderFilled`` with status ``filled``, ``OrderCancelled``,
  ``OrderRejected``, ``OrderExpired``) remove it from the resting set, whoever caused them.

Fees (``ledger.domain.arithmetic.fill_fee``, shared with the live venue): ``quantity * price *
fee_rate`` in the quote (settlement) currency for spot and linear contracts; for inverse contracts
(quantity in contracts) ``quantity * contract_value / price * fee_rate`` in the base coin
(``ledger.domain.instruments``). Decimals are exact and written as strings; a fee with more than
18 fraction digits is rounded half-even to 18 (what the ledger can store).

Orders of exchanges configured ``external`` or ``live`` are ignored when they are placed, and so
are those of an exchange whose mode recorded in ``ledger:meta`` is no longer ``paper`` (``ledger
execution set``): the recorded modes are read with each batch holding an order to execute, in the
pipeline that reads the marks, and the venue steps aside for such an exchange with one
error line every 10 s (``consumers.guard``). An order the venue accepted (resting) stays its own
until it is final, whatever the configuration or the record says later: it was never sent to a
real venue, so it fills, is cancelled or expires on paper.

Exactly once, on top of at-least-once delivery:

* Command ids are deterministic: ``paper:<order_id>:accept`` / ``:fill`` / ``:reject`` /
  ``:cancel`` / ``:expire`` (``ledger.domain.command_ids``), ``fill_id`` is
  ``paper-fill-<order_id>`` and ``exchange_order_id`` is
  ``paper-<first 16 hex digits of the order id>``. A redelivered event publishes the same
  commands again, and the command handler's deduplication answers them with the first outcome:
  nothing happens twice.
* A resting order leaves the resting set and its terminal command (fill or cancel) is published
  in ONE atomic script, so a fill and a cancel can never both be published for it.
* Every write (resting, taking, publishing) is a script that first checks that the venue's lease
  still names this venue: a venue whose batch or tick outlived its lease (a pause, a slow
  server) writes nothing after the new holder took over (``LeaseLost`` for a batch), so it never
  re-rests an order the new holder already took off the book.
* Before it fills, the watcher reads the order's snapshot (``ledger:{s}:orders``): it fills only
  orders that are ``pending``, ``open`` or ``partially_filled`` (the remaining quantity), skips
  ``pending_cancel`` ones (their cancel is on its way) and drops final ones. An ``OrderPlaced``
  whose order is already final is ignored. So a cancelled order never fills afterwards, even
  when its events are delivered again.

Redis keys (hash-tagged with the shard, so they live on the shard's cluster slot):

* ``ledger:{s}:paper:resting``: hash order_id -> JSON of a ``RestingOrder`` (user_id, exchange,
  symbol, side, order_type, quantity, price, trigger_price, triggered, placed_event_id),
  written when the order is accepted, removed when it fills or is cancelled or becomes final.
* ``ledger:{s}:paper:version``: a counter bumped at every change of the resting set; the watcher
  reloads the set only when it moved.

The resting set is derived state: it is exactly the orders of ``paper`` exchanges whose
``OrderPlaced`` is not ``market`` and that are not final in the log and have no
``OrderCancelRequested`` (whose ``order_cancelled`` the venue publishes). ``PaperVenue.rebuild``
recomputes it by that rule from the log, read over both tiers (``ledger.store.log.read_log``: the
PostgreSQL archive for what a trim removed from Redis, given a connection; without one, a trimmed
log fails with ``LogError`` rather than leave orders out), up to the group's last-delivered
entry (what comes after is delivered as usual). It holds the venue's lease meanwhile, so the
running venue stands by, and replaces the set in one step. A ``stop_limit`` that had triggered
but not filled loses its trigger on a rebuild and waits for the next cross.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Iterable, Mapping
from decimal import Decimal
from typing import Any, cast

import msgspec
import psycopg
import structlog

from consumers.backoff import poll
from consumers.deadletter import decode_events
from consumers.entries import Entry
from consumers.guard import ExecutionGuard
from consumers.pause import paused
from consumers.runner import RETRYABLE, ConsumerSettings, LeaseLost, StreamConsumer
from consumers.together import run_all
from ledger import defaults
from ledger.client.models import read_mark
from ledger.config import DEFAULT_EXECUTION, Settings, parse_execution
from ledger.domain import wire
from ledger.domain.arithmetic import amount_fits, fill_fee
from ledger.domain.command_ids import CommandIds
from ledger.domain.enums import FINAL_ORDER_STATUSES, Exchange, OrderSide, OrderType
from ledger.domain.instruments import Instrument, instrument_for
from ledger.domain.state import OrderState
from ledger.domain.transitions import FILLABLE_ORDER_STATUSES, FINAL_EVENT_TYPES
from ledger.domain.values import (
    MAX_AMOUNT,
    RULES,
    format_decimal,
    now_ms,
)
from ledger.store.eventstore import ORDER_SNAPSHOT, StoredEvent
from ledger.store.keys import ShardKeys, marks, shard_key
from ledger.store.log import read_log
from ledger.store.redis_conn import entry_order, text
from ledger.venues.markets import instrument_table

GROUP = "ledger-paper"
DEFAULT_POLL_INTERVAL_S = defaults.PAPER_POLL_MS / 1000

# The orders the venue may still fill are FILLABLE_ORDER_STATUSES (ledger.domain.transitions): a
# pending_cancel order waits for its cancel instead.
_RELEVANT_EVENTS = {"OrderPlaced", "OrderCancelRequested", *FINAL_EVENT_TYPES}

log = structlog.get_logger("ledger.paper")

# Every write of the venue is one of these scripts, fenced: KEYS[1] is the venue's lease and
# ARGV[1] this venue's consumer name; when the lease names another consumer (or none) the script
# writes nothing and returns -1 (``LOST``), so a venue whose batch or tick outlived its lease
# never rests, takes or publishes after the new holder did.
LOST = -1
_FENCE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return -1
end
"""

# KEYS: 2 commands stream. ARGV: 2.. command type and data pairs. Publishes the commands.
_PUBLISH = (
    _FENCE
    + """
for i = 2, #ARGV, 2 do
  redis.call('XADD', KEYS[2], '*', 'type', ARGV[i], 'data', ARGV[i + 1])
end
return 1
"""
)

# KEYS: 2 resting hash, 3 version counter, 4 commands stream.
# ARGV: 2 order id, 3 resting JSON, 4 command type, 5 command data.
# Rests the order (unless it rests already: a redelivery keeps the newer entry) and publishes.
_REST = (
    _FENCE
    + """
if redis.call('HSETNX', KEYS[2], ARGV[2], ARGV[3]) == 1 then
  redis.call('INCR', KEYS[3])
end
redis.call('XADD', KEYS[4], '*', 'type', ARGV[4], 'data', ARGV[5])
return 1
"""
)

# KEYS: 2 resting hash, 3 version counter, 4 commands stream.
# ARGV: 2 order id, 3 command type, 4 command data.
# Takes the order out of the resting set and, only if it was there, publishes its terminal command.
_TAKE = (
    _FENCE
    + """
if redis.call('HDEL', KEYS[2], ARGV[2]) == 0 then
  return 0
end
redis.call('INCR', KEYS[3])
redis.call('XADD', KEYS[4], '*', 'type', ARGV[3], 'data', ARGV[4])
return 1
"""
)

# KEYS: 2 resting hash, 3 version counter. ARGV: 2.. ids of orders that became final.
# Takes them out of the resting set (most never rested: one call per run of final orders in a
# batch, not one per order). Returns how many rested.
_FORGET = (
    _FENCE
    + """
local removed = 0
for i = 2, #ARGV, 1000 do  -- unpack stops at about 8,000 values
  removed = removed + redis.call('HDEL', KEYS[2], unpack(ARGV, i, math.min(i + 999, #ARGV)))
end
if removed > 0 then
  redis.call('INCR', KEYS[3])
end
return removed
"""
)

# KEYS: 1 resting hash, 2 version counter. ARGV: order id / resting JSON pairs.
# Replaces the whole resting set (a rebuild, under the venue's lease held by the rebuild).
_REPLACE = """
redis.call('DEL', KEYS[1])
for i = 1, #ARGV, 2 do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
end
return redis.call('INCR', KEYS[2])
"""

# KEYS: 2 resting hash, 3 version counter. ARGV: 2 order id, 3 resting JSON.
# Rewrites a resting order (a stop_limit that triggered) only while it still rests.
_UPDATE = (
    _FENCE
    + """
if redis.call('HEXISTS', KEYS[2], ARGV[2]) == 0 then
  return 0
end
redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
redis.call('INCR', KEYS[3])
return 1
"""
)


class PaperKeys:
    """The keys of the paper venue on one shard."""

    __slots__ = ("shard", "resting", "version", "lease")

    def __init__(self, shard: int) -> None:
        self.shard = shard
        self.resting = shard_key(shard, "paper:resting")
        self.version = shard_key(shard, "paper:version")
        self.lease = ShardKeys(shard).lease(GROUP)


class RestingOrder(msgspec.Struct, kw_only=True, frozen=True):
    """An order resting on the paper venue (the JSON value of ``ledger:{s}:paper:resting``)."""

    user_id: str
    exchange: Exchange
    symbol: str
    side: OrderSide
    order_type: OrderType
    quantity: str
    price: str | None = None
    trigger_price: str | None = None
    triggered: bool = False
    placed_event_id: str | None = None

    @classmethod
    def from_event(cls, event: wire.OrderPlaced) -> RestingOrder:
        return cls(
            user_id=event.user_id,
            exchange=event.exchange,
            symbol=event.symbol,
            side=event.side,
            order_type=event.order_type,
            quantity=event.quantity,
            price=event.price,
            trigger_price=event.trigger_price,
            placed_event_id=event.event_id,
        )


_resting_decoder = msgspec.json.Decoder(RestingOrder)


# --------------------------------------------------------------------------- pure rules


def _reached(side: OrderSide, mark: Decimal, level: Decimal, *, buy_below: bool) -> bool:
    """Whether ``mark`` reached ``level``: for a buy at or below it when ``buy_below``, else at
    or above it (and the reverse for a sell)."""
    below = mark <= level
    above = mark >= level
    if side is OrderSide.BUY:
        return below if buy_below else above
    return above if buy_below else below


def _instrument(exchange: Exchange, symbol: str) -> Instrument:
    """What a symbol trades, from the bundled market data (the paper venue has no other)."""
    return instrument_for(exchange, symbol, instrument_table())


def evaluate(order: RestingOrder, mark: Decimal) -> tuple[RestingOrder, Decimal | None]:
    """What the mark does to a resting order: (the order, possibly triggered; the fill price or
    None when it does not fill). Pure."""
    if order.order_type.needs_trigger and not order.triggered:
        trigger = Decimal(order.trigger_price or "0")
        # A stop buys when the price rises to the trigger; a take-profit when it falls to it.
        take_profit = order.order_type is OrderType.TAKE_PROFIT_MARKET
        if not _reached(order.side, mark, trigger, buy_below=take_profit):
            return order, None
        if order.order_type is not OrderType.STOP_LIMIT:
            return order, mark
        order = msgspec.structs.replace(order, triggered=True)
    if order.price is None:  # a limit without price cannot be placed; never fill it blindly
        return order, None
    price = Decimal(order.price)
    if _reached(order.side, mark, price, buy_below=True):
        return order, price
    return order, None


def paper_fee(exchange: Exchange, symbol: str, quantity: Decimal, price: Decimal, rate: Decimal) -> Decimal:
    """The fee of a paper fill, in the settlement currency: ``ledger.domain.arithmetic.fill_fee``
    (the one computation, shared with the live venue's fills reported without a fee)."""
    return fill_fee(_instrument(exchange, symbol), quantity, price, rate)


def fee_currency(exchange: Exchange, symbol: str) -> str | None:
    """The settlement currency of a symbol when it is known and writable, else None (a fill
    without ``fee_currency`` pays in the settlement currency)."""
    settle = _instrument(exchange, symbol).settle
    return settle if RULES["fee_currency"].matches(settle) else None


IDS = CommandIds("paper")


def fill_command_id(order_id: str) -> str:
    return f"paper:{order_id}:fill"


def unfillable_reason(exchange: Exchange, symbol: str, quantity: Decimal, price: Decimal) -> str | None:
    """Why the venue cannot fill ``quantity`` at ``price``: its value is out of the range a fill
    can report (the ledger refuses orders that name such a price, but a market or stop order
    fills at the mark). None when it can."""
    if amount_fits(_instrument(exchange, symbol), quantity, price):
        return None
    return (
        f"{format_decimal(quantity)} {symbol} at {format_decimal(price)} is worth more than "
        f"{format_decimal(MAX_AMOUNT)}: the venue cannot fill it"
    )


def exchange_order_id(order_id: str) -> str:
    return f"paper-{order_id.replace('-', '')[:16]}"


def fill_id(order_id: str) -> str:
    return f"paper-fill-{order_id}"


# --------------------------------------------------------------------------- the venue


class PaperVenue:
    """The paper venue of one shard: an event consumer plus a mark watcher.

    ``run(stop)`` runs both until ``stop`` is set. For tests and tools: ``burst()`` handles every
    event available now, ``tick()`` is one pass of the watcher (``run`` ticks only while it holds
    the consumer's lease; a tick writes nothing without it).
    """

    def __init__(
        self,
        redis: Any,
        shard: int,
        *,
        execution: Mapping[Exchange, str] | None = None,
        fee_rate: Decimal = Decimal("0.0005"),
        poll_interval_s: float = DEFAULT_POLL_INTERVAL_S,
        consumer_settings: ConsumerSettings | None = None,
        name: str | None = None,
        guard: ExecutionGuard | None = None,
    ) -> None:
        self.redis = redis
        self.shard = shard
        self.keys = ShardKeys(shard)
        self.paper_keys = PaperKeys(shard)
        modes = execution if execution is not None else parse_execution(DEFAULT_EXECUTION)
        self.guard = guard or ExecutionGuard("paper", modes, log)
        self.fee_rate = fee_rate
        self.poll_interval_s = poll_interval_s
        self.consumer = StreamConsumer(
            redis,
            stream=self.keys.events,
            group=GROUP,
            handler=self.handle,
            dead_stream=self.keys.dead,
            name=name,
            settings=consumer_settings,
            lease_key=self.paper_keys.lease,
            reads=bool(self.guard.exchanges),
        )
        self.log = log.bind(shard=shard)
        self._cache_version: str | None = None
        self._invalid_marks: dict[tuple[str, str], str] = {}
        self._cache: dict[str, RestingOrder] = {}

    def executes(self, exchange: Exchange | str) -> bool:
        """Whether this venue executes new orders of ``exchange`` (it is configured ``paper``; the
        record in ``ledger:meta`` is read with each batch, ``consumers.guard``)."""
        return exchange in self.guard.exchanges

    # ----------------------------------------------------------------- running

    async def run(self, stop: asyncio.Event) -> None:
        await run_all([self.consumer.run, self._watch], stop)

    async def burst(self) -> int:
        """Handle every event available now; return how many entries were read."""
        return await self.consumer.burst()

    async def _watch(self, stop: asyncio.Event) -> None:
        every = self.poll_interval_s
        await poll(stop, self._watch_once, retry_on=(Exception,), on_retry=self._watch_failed, idle_s=every)
        self.log.info("watcher stopped")

    async def _watch_once(self) -> bool:
        if await self._holds_lease():
            await self.tick()
        return False

    async def _watch_failed(self, exc: BaseException, retry_in_s: float) -> None:
        """The watcher outlives a server outage and a bad tick alike, backing off."""
        if isinstance(exc, RETRYABLE):
            self.log.warning("watcher: a server is unavailable, retrying", error=str(exc), retry_in_s=retry_in_s)
        else:
            self.log.error("watcher tick failed", error=repr(exc), retry_in_s=retry_in_s)

    async def _holds_lease(self) -> bool:
        return text(await self.redis.get(self.paper_keys.lease)) == self.consumer.name

    # ----------------------------------------------------------------- events

    async def handle(self, entries: list[Entry]) -> None:
        """React to a batch of events in log order (idempotent: delivery is at least once)."""
        decoded = await decode_events(
            self.redis,
            entries,
            stream=self.keys.events,
            dead_stream=self.keys.dead,
            group=GROUP,
            log=self.log,
            types=_RELEVANT_EVENTS,
        )
        events = [event for _entry_id, event in decoded]
        if not events:
            return
        placed = [e for e in events if isinstance(e, wire.OrderPlaced) and self.executes(e.exchange)]
        states = await self._states(e.stream for e in placed)
        prices, acting = await self._marks_and_modes(placed)
        pipe = self.redis.pipeline(transaction=False)
        cancels: list[tuple[int, wire.Event]] = []
        # Final orders are taken off the resting set a run at a time (``_FORGET``), the run sent
        # before any other write of the batch, so the effects keep the log's order.
        final: list[str] = []
        for event in events:
            if isinstance(event, wire.OrderPlaced):
                if event.exchange in acting:
                    self._forget(pipe, final)
                    mark = prices.get((event.exchange, event.symbol))
                    self._placed(pipe, event, states.get(event.stream), mark)
            elif isinstance(event, wire.OrderCancelRequested):
                self._forget(pipe, final)
                cancel = wire.OrderCancelledCommand(
                    command_id=IDS.cancel(event.stream), user_id=event.user_id, order_id=event.stream
                )
                cancels.append((len(pipe), event))
                self._take(pipe, event.stream, cancel)
            elif event.status in FINAL_ORDER_STATUSES:  # type: ignore[attr-defined]
                final.append(event.stream)
        self._forget(pipe, final)
        if not len(pipe):
            return
        results = await pipe.execute()
        if LOST in results:
            raise LeaseLost(f"{self.paper_keys.lease} no longer names {self.consumer.name!r}: batch not applied")
        for index, event in cancels:
            fields = {"order_id": event.stream, "event_id": event.event_id, "command_id": IDS.cancel(event.stream)}
            if results[index]:
                self.log.info("resting order cancelled", **fields)
            else:
                self.log.info("cancel request for an order that is not resting: nothing to cancel", **fields)

    def _placed(self, pipe: Any, event: wire.OrderPlaced, state: OrderState | None, mark: Decimal | None) -> None:
        order_id = event.stream
        fields = {"order_id": order_id, "event_id": event.event_id, "user_id": event.user_id}
        if state is not None and state.status in FINAL_ORDER_STATUSES:
            self.log.debug("order already final, nothing to do", status=str(state.status), **fields)
            return
        accept = wire.OrderAcceptedCommand(
            command_id=IDS.accept(order_id),
            user_id=event.user_id,
            order_id=order_id,
            exchange_order_id=exchange_order_id(order_id),
        )
        if event.order_type is OrderType.MARKET:
            price = Decimal(event.price) if event.price is not None else mark
            if price is None:
                self._reject(pipe, event, f"no price and no mark for {event.symbol}")
                return
            reason = unfillable_reason(event.exchange, event.symbol, _remaining(event, state), price)
            if reason is not None:
                self._reject(pipe, event, reason)
                return
            fill = self._fill(order_id, event.user_id, event.exchange, event.symbol, _remaining(event, state), price)
            self._publish(pipe, accept, fill)
            self._log_fill("market order: fill published", fill, fields)
            return
        resting = RestingOrder.from_event(event)
        fill_price = None
        if mark is not None and (state is None or state.status in FILLABLE_ORDER_STATUSES):
            resting, fill_price = evaluate(resting, mark)
        keys = self.paper_keys
        pipe.eval(
            _REST,
            4,
            keys.lease,
            keys.resting,
            keys.version,
            self.keys.commands,
            self.consumer.name,
            order_id,
            msgspec.json.encode(resting),
            "order_accepted",
            wire.encode_command(accept),
        )
        self.log.info("order resting", order_type=str(event.order_type), command_id=accept.command_id, **fields)
        if fill_price is not None:
            quantity = _remaining(event, state)
            self._take_resting(pipe, order_id, event.user_id, event.exchange, event.symbol, quantity, fill_price)

    def _reject(self, pipe: Any, event: wire.OrderPlaced, reason: str) -> None:
        order_id = event.stream
        reject = wire.OrderRejectedCommand(
            command_id=IDS.reject(order_id), user_id=event.user_id, order_id=order_id, reason=reason
        )
        self._publish(pipe, reject)
        self.log.info(
            "market order rejected",
            reason=reason,
            command_id=reject.command_id,
            order_id=order_id,
            event_id=event.event_id,
            user_id=event.user_id,
        )

    def _take_resting(
        self,
        pipe: Any,
        order_id: str,
        user_id: str,
        exchange: Exchange,
        symbol: str,
        quantity: Decimal,
        price: Decimal,
    ) -> None:
        """Take a resting order the mark reached off the book: fill its remaining quantity, or
        expire it when that fill could not be reported (an accepted order cannot be rejected)."""
        fields = {"order_id": order_id, "user_id": user_id}
        reason = unfillable_reason(exchange, symbol, quantity, price)
        if reason is not None:
            expire = wire.OrderExpiredCommand(command_id=IDS.expire(order_id), user_id=user_id, order_id=order_id)
            self._take(pipe, order_id, expire)
            self.log.warning("resting order expired", reason=reason, command_id=expire.command_id, **fields)
            return
        fill = self._fill(order_id, user_id, exchange, symbol, quantity, price)
        self._take(pipe, order_id, fill)
        self._log_fill("resting order: fill published", fill, fields)

    def _log_fill(self, message: str, fill: wire.RecordFill, fields: dict[str, Any]) -> None:
        self.log.info(
            message,
            price=fill.price,
            quantity=fill.quantity,
            fee=fill.fee,
            fee_currency=fill.fee_currency,
            command_id=fill.command_id,
            **fields,
        )

    def _take(self, pipe: Any, order_id: str, command: wire.Command) -> None:
        keys = self.paper_keys
        type_name = command.__struct_config__.tag
        data = wire.encode_command(command)
        pipe.eval(
            _TAKE,
            4,
            keys.lease,
            keys.resting,
            keys.version,
            self.keys.commands,
            self.consumer.name,
            order_id,
            type_name,
            data,
        )

    def _forget(self, pipe: Any, final: list[str]) -> None:
        """Take the orders of ``final`` off the resting set in one call, and empty it."""
        if final:
            keys = self.paper_keys
            pipe.eval(_FORGET, 3, keys.lease, keys.resting, keys.version, self.consumer.name, *final)
            final.clear()

    def _publish(self, pipe: Any, *commands: wire.Command) -> None:
        args = [item for command in commands for item in wire.command_fields(command).values()]
        pipe.eval(_PUBLISH, 2, self.paper_keys.lease, self.keys.commands, self.consumer.name, *args)

    def _fill(
        self, order_id: str, user_id: str, exchange: Exchange, symbol: str, quantity: Decimal, price: Decimal
    ) -> wire.RecordFill:
        return wire.RecordFill(
            command_id=fill_command_id(order_id),
            user_id=user_id,
            order_id=order_id,
            fill_id=fill_id(order_id),
            quantity=format_decimal(quantity),
            price=format_decimal(price),
            fee=format_decimal(paper_fee(exchange, symbol, quantity, price, self.fee_rate)),
            fee_currency=fee_currency(exchange, symbol),
            ts=now_ms(),
        )

    # ----------------------------------------------------------------- the watcher

    async def tick(self) -> int:
        """One pass of the watcher: fill or trigger the resting orders their marks reach.

        Returns how many changes it made (commands published, entries updated or dropped).
        """
        resting = await self.resting()
        if not resting:
            return 0
        _, prices = await self._marks((o.exchange, o.symbol) for o in resting.values())
        moves: dict[str, tuple[RestingOrder, RestingOrder, Decimal | None]] = {}
        for order_id, order in resting.items():
            mark = prices.get((order.exchange, order.symbol))
            if mark is None:
                continue
            changed, fill_price = evaluate(order, mark)
            if fill_price is not None or changed != order:
                moves[order_id] = (order, changed, fill_price)
        if not moves:
            return 0
        states = await self._states(moves)
        keys = self.paper_keys
        pipe = self.redis.pipeline(transaction=False)
        done = 0
        for order_id, (_before, after, fill_price) in moves.items():
            state = states.get(order_id)
            fields = {"order_id": order_id, "user_id": after.user_id, "event_id": after.placed_event_id}
            if state is None or state.status in FINAL_ORDER_STATUSES:
                self._forget(pipe, [order_id])
                self.log.info(
                    "dropped a resting order that is final or unknown",
                    status=str(state.status) if state else None,
                    **fields,
                )
                done += 1
                continue
            if state.status not in FILLABLE_ORDER_STATUSES:  # pending_cancel: its cancel is on the way
                continue
            if fill_price is not None:
                self._take_resting(
                    pipe, order_id, after.user_id, after.exchange, after.symbol, state.remaining_qty, fill_price
                )
            else:
                pipe.eval(
                    _UPDATE,
                    3,
                    keys.lease,
                    keys.resting,
                    keys.version,
                    self.consumer.name,
                    order_id,
                    msgspec.json.encode(after),
                )
                self.log.info("stop_limit triggered, now resting as a limit", price=after.price, **fields)
            done += 1
        if done and LOST in await pipe.execute():
            self.log.warning("watcher: lease lost mid-tick, its changes left to the new holder")
            return 0
        return done

    async def resting(self) -> dict[str, RestingOrder]:
        """The resting orders of this shard (cached; reloaded when the set's version moved)."""
        keys = self.paper_keys
        version = text(await self.redis.get(keys.version))
        if version != self._cache_version or version is None:
            raw = await self.redis.hgetall(keys.resting)
            cache: dict[str, RestingOrder] = {}
            for order_id, value in raw.items():
                try:
                    cache[text(order_id)] = _resting_decoder.decode(value)
                except msgspec.DecodeError as exc:
                    self.log.error("unreadable resting order ignored", order_id=text(order_id), error=str(exc))
            self._cache, self._cache_version = cache, version
        return dict(self._cache)

    async def rebuild(
        self, conn: psycopg.AsyncConnection[Any] | None = None, *, no_archive: str = "no database URL given"
    ) -> int:
        """Recompute the resting set from the log (module doc); return how many orders rest.

        ``conn`` (autocommit) reads the archive for what Redis no longer holds; without it a
        trimmed log raises ``LogError`` (``no_archive`` says why there is none).
        """
        keys = self.paper_keys
        await self.consumer.ensure_group()
        async with paused(self.redis, [keys.lease], "ledger-paper-rebuild"):
            groups = await self.redis.xinfo_groups(self.keys.events)
            upto = entry_order(next(text(g["last-delivered-id"]) for g in groups if text(g["name"]) == GROUP))
            resting: dict[str, RestingOrder] = {}
            log = cast(
                "AsyncGenerator[StoredEvent, None]",
                read_log(self.redis, self.shard, conn=conn, no_archive=no_archive),
            )
            async with contextlib.aclosing(log) as events:
                async for stored in events:
                    if entry_order(stored.entry_id) > upto:
                        break
                    event = stored.event
                    if isinstance(event, wire.OrderPlaced):
                        adopted = isinstance(event, wire.OrderAdopted)  # at a venue already: never simulated
                        if self.executes(event.exchange) and event.order_type is not OrderType.MARKET and not adopted:
                            resting[event.stream] = RestingOrder.from_event(event)
                    elif isinstance(event, wire.OrderCancelRequested) or (
                        isinstance(event, wire.OrderChange) and event.status in FINAL_ORDER_STATUSES
                    ):
                        resting.pop(event.stream, None)
            pairs = [item for order_id, order in resting.items() for item in (order_id, msgspec.json.encode(order))]
            await self.redis.eval(_REPLACE, 2, keys.resting, keys.version, *pairs)
        self.log.info("resting set rebuilt from the log", resting=len(resting), up_to=f"{upto[0]}-{upto[1]}")
        return len(resting)

    # ----------------------------------------------------------------- reads

    async def _states(self, order_ids: Iterable[str]) -> dict[str, OrderState]:
        ids = sorted(set(order_ids))
        if not ids:
            return {}
        values = await self.redis.hmget(self.keys.orders, ids)
        return {oid: ORDER_SNAPSHOT.decode(raw) for oid, raw in zip(ids, values, strict=True) if raw}

    async def _marks_and_modes(
        self, placed: list[wire.OrderPlaced]
    ) -> tuple[dict[tuple[Exchange, str], Decimal], frozenset[Exchange]]:
        """The marks of the placed orders' markets and the exchanges the venue acts on now (their
        recorded mode still ``paper``: ``consumers.guard``), in one pipeline."""
        if not placed:
            return {}, frozenset()
        pipe = self.redis.pipeline(transaction=False)
        self.guard.read(pipe)
        modes, prices = await self._marks(((e.exchange, e.symbol) for e in placed), pipe)
        return prices, self.guard.acting(modes[0])

    async def _marks(
        self, markets: Iterable[tuple[Exchange, str]], pipe: Any = None
    ) -> tuple[list[Any], dict[tuple[Exchange, str], Decimal]]:
        """The valid marks of ``markets``, read in one pipeline: ``pipe`` when given, after the reads
        queued on it already (their answers come first)."""
        by_exchange: dict[Exchange, set[str]] = {}
        for exchange, symbol in markets:
            by_exchange.setdefault(exchange, set()).add(symbol)
        requests = [(exchange, sorted(symbols)) for exchange, symbols in by_exchange.items()]
        pipe = pipe if pipe is not None else self.redis.pipeline(transaction=False)
        before = len(pipe)
        for exchange, symbols in requests:
            pipe.hmget(marks(exchange), symbols)
        if not len(pipe):
            return [], {}
        answers = await pipe.execute()
        found: dict[tuple[Exchange, str], Decimal] = {}
        for (exchange, symbols), values in zip(requests, answers[before:], strict=True):
            for symbol, raw in zip(symbols, values, strict=True):
                mark = read_mark(raw, exchange, symbol, self._invalid_marks)
                if mark is not None:
                    found[(exchange, symbol)] = mark
        return answers[:before], found


def _remaining(event: wire.OrderPlaced, state: OrderState | None) -> Decimal:
    if state is not None and state.remaining_qty > 0:
        return state.remaining_qty
    return Decimal(event.quantity)


# --------------------------------------------------------------------------- the role


async def paper_role(redis: Any, settings: Settings) -> list[Any]:
    """``ledger serve`` role ``paper``: one venue (event consumer + mark watcher) per shard.

    It runs even when no exchange is configured ``paper``: it then only keeps its place in the
    log without reading it (``consumers.runner``, ``reads``), so switching an exchange to
    ``paper`` later never executes orders placed before.
    """
    consumer_settings = ConsumerSettings.from_settings(settings)
    poll = settings.paper_poll_ms / 1000
    guard = ExecutionGuard("paper", settings.execution, log)
    return [
        PaperVenue(
            redis,
            shard,
            execution=settings.execution,
            fee_rate=settings.paper_fee_rate,
            poll_interval_s=poll,
            consumer_settings=consumer_settings,
            guard=guard,
        )
        for shard in range(settings.shards)
    ]


__all__ = [
    "GROUP",
    "PaperKeys",
    "PaperVenue",
    "RestingOrder",
    "evaluate",
    "fee_currency",
    "paper_fee",
    "paper_role",
]
