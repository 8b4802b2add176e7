"""The seed's Python API: ``PositionManager`` and ``OrderManager`` (CONTRACT §10).

Both work through the command stream and the live projection, like any strategy in any
language: a method that changes state publishes a command, waits for its reply, then waits until
the live projection has applied the resulting events, so the caller reads its own writes. While
the projection is caught up that is one round trip (``LedgerClient._submit``); else the wait
blocks on the shard's progress stream, which the projection's step that moves the checkpoint
writes to. ``open_position`` and ``close_position`` also wait for the order
to be filled by whoever executes it (the paper venue, a live venue, or the strategy reporting
fills in ``external`` mode).

Commands are built as the typed wire structs (``ledger.domain.wire``) and published with
``wire.command_fields``. Every method that changes state takes an optional ``command_id`` (by
default a fresh one per call): the ledger executes a ``command_id`` once per user, so after a
``LedgerTimeout`` calling the same method again with the same ``command_id`` and arguments
returns the first call's order or position and appends nothing twice.

The client may be plain or cluster, with or without ``decode_responses``. Blocking reads never
block longer than one second at a time, below redis-py's default 5 s socket timeout.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import psycopg
from redis.exceptions import NoScriptError

from ledger.client import queries
from ledger.client.models import Order, PnLInfo, Position
from ledger.client.reconcile import Reconciler, Reconciliation
from ledger.config import Settings
from ledger.defaults import API_TIMEOUT_S, BLOCK_MS
from ledger.domain import wire
from ledger.domain.enums import (
    Exchange,
    OrderSide,
    OrderStatus,
    OrderType,
    PositionSide,
)
from ledger.domain.ids import new_command_id
from ledger.domain.mapping import ORDER
from ledger.domain.values import check_identifier, format_decimal, parse_decimal
from ledger.errors import LedgerError, OperationFailed
from ledger.store import keys
from ledger.store.eventstore import ORDER_SNAPSHOT, EventStore, StoredEvent
from ledger.store.log import read_log
from ledger.store.redis_conn import entry_order, recorded_shards, text
from ledger.venues.accounts import VenueConfig, live_configs
from ledger.venues.live import VenueClients

# The largest sequence number of a stream entry id (an unsigned 64-bit integer).
_LAST_SEQ = 2**64 - 1

__all__ = ["CommandRejected", "LedgerClient", "LedgerError", "LedgerTimeout", "OrderManager", "PositionManager"]


# The end of a command's round trip, once the wait for its reply (a BLMOVE of the reply list onto
# itself) returned: take the reply, and say how far the live projection is. KEYS: 1 the reply
# list, 2 the projection's checkpoint, 3 the chain head (``ledger.store.chain``), 4 the order
# snapshots. ARGV[1]: the reply's field naming an order ('' for none). Returns false (no reply
# yet) or {reply, checkpoint or false, snapshot or false}: the order's snapshot only when the
# checkpoint is the chain head, the projection having applied every event there is, so that the
# order's live hash is what the snapshot maps to (``ledger.domain.mapping.ORDER``).
SETTLE = """
local reply = redis.call('LINDEX', KEYS[1], 0)
if not reply then
  return false
end
redis.call('DEL', KEYS[1])
local checkpoint = redis.call('GET', KEYS[2])
local snapshot = false
if ARGV[1] ~= '' and checkpoint and checkpoint == redis.call('HGET', KEYS[3], 'id') then
  local id = cjson.decode(reply)[ARGV[1]]
  if type(id) == 'string' then
    snapshot = redis.call('HGET', KEYS[4], id)
  end
end
return {reply, checkpoint, snapshot}
"""


class CommandRejected(OperationFailed):
    def __init__(self, reply: dict[str, Any]) -> None:
        error = reply.get("error") or {}
        super().__init__(f"{reply.get('command_id')} rejected: {error.get('code')}: {error.get('message')}")
        self.code = error.get("code")
        self.reply = reply


class LedgerTimeout(OperationFailed):
    """No outcome within the timeout. Call the method again with the same ``command_id``: the
    ledger executes a command once, so the retry returns the first call's outcome."""


def _decimal(value: Decimal | str | int, field: str) -> str:
    """A caller's amount as a wire decimal string (the wire's decimal rule; never a float)."""
    if isinstance(value, float | bool):
        raise TypeError(f"{field}: decimals must be Decimal or str, never float")
    return format_decimal(parse_decimal(Decimal(value) if isinstance(value, int) else value, field))


def _optional_decimal(value: Decimal | str | int | None, field: str) -> str | None:
    return None if value is None else _decimal(value, field)


def _preceding(entry_id: str) -> str:
    """The stream id just before ``entry_id`` (an XREAD after it returns ``entry_id`` and later)."""
    ms, seq = entry_order(entry_id)
    return f"{ms}-{seq - 1}" if seq else f"{ms - 1}-{_LAST_SEQ}" if ms else "0-0"


def _command_id(command_id: str | None) -> str:
    return command_id if command_id is not None else new_command_id("api")


@dataclass(frozen=True, slots=True)
class Settled:
    """How an order ended: its final event and the position events of its fills."""

    final: wire.OrderChange
    positions: list[wire.PositionEvent]

    def position_id(self, side: PositionSide) -> str | None:
        """The position of ``side`` that the order's fills changed last."""
        return next((e.stream for e in reversed(self.positions) if e.side is side), None)

    @property
    def complete(self) -> bool:
        """The final event is in, and so is every position event of a final fill."""
        if not isinstance(self.final, wire.OrderFilled):
            return True
        seen = {e.stream for e in self.positions if e.fill_id == self.final.fill_id}
        return seen >= set(self.final.position_ids)


class LedgerClient:
    """Publishes commands and waits for their outcome and their projection."""

    def __init__(self, redis: Any, *, timeout: float = API_TIMEOUT_S) -> None:
        self.redis = redis
        self.timeout = timeout
        self._shards: int | None = None
        self._settle = redis.register_script(SETTLE)

    async def shards(self) -> int:
        if self._shards is None:
            recorded = await recorded_shards(self.redis)
            if recorded is None:
                raise OperationFailed("no ledger in this Redis (ledger:meta has no shards): start `ledger serve`")
            self._shards = recorded
        return self._shards

    async def shard_of(self, user_id: str) -> int:
        return keys.shard_of(user_id, await self.shards())

    async def submit(self, command: wire.Command) -> dict[str, Any]:
        """Publish a command and return its accepted reply, projected; raise if rejected.

        ``wire.command_fields`` checks the command by the handler's own wire rules (a broken
        one raises ``CommandRejected`` with the code the handler would give). Publishing the
        same ``command_id`` again returns the first outcome and changes nothing.
        """
        reply, _ = await self._submit(command, read_order=False)
        return reply

    async def submit_order(self, command: wire.Command) -> tuple[dict[str, Any], Order | None]:
        """``submit``, and the order the reply names as the live projection shows it once it
        applied the reply's events (None: its hash is gone, expired after it became final)."""
        return await self._submit(command, read_order=True)

    async def _submit(self, command: wire.Command, *, read_order: bool) -> tuple[dict[str, Any], Order | None]:
        try:
            fields = wire.command_fields(command)
        except wire.WireError as exc:
            raise CommandRejected(
                {
                    "command_id": command.command_id,
                    "status": "rejected",
                    "error": {"code": exc.code, "message": exc.message},
                    "order_id": None,
                    "position_id": None,
                    "events": [],
                }
            ) from None
        shard = await self.shard_of(command.user_id)
        shard_keys = keys.ShardKeys(shard)
        reply_key = shard_keys.reply(command.user_id, command.command_id)
        # A reply left by an earlier try (one that timed out) is not this publication's answer.
        # One round trip publishes, waits and settles: the keys are on the shard's slot, and a
        # pipeline keeps their order (the wait is blocked before the handler can answer, and
        # the script behind it runs once the wait returns). The wait is a BLMOVE of the reply
        # list onto itself: it leaves the reply for the script to take.
        deadline = time.monotonic() + self.timeout
        settle_keys = [reply_key, shard_keys.checkpoint, shard_keys.chain, shard_keys.orders]
        settle_args = ["order_id" if read_order else ""]
        pipe = self.redis.pipeline(transaction=False)
        pipe.delete(reply_key)
        pipe.xadd(shard_keys.commands, fields)
        pipe.blmove(reply_key, reply_key, BLOCK_MS / 1000, "LEFT", "RIGHT")
        # By SHA through ``execute_command``: redis-py's cluster pipeline refuses ``evalsha``.
        pipe.execute_command("EVALSHA", self._settle.sha, len(settle_keys), *settle_keys, *settle_args)
        *results, settled = await pipe.execute(raise_on_error=False)
        for result in results:
            if isinstance(result, Exception):
                raise result
        if isinstance(settled, NoScriptError):  # the server lost its script cache: the call loads it
            settled = await self._settle(settle_keys, settle_args)
        elif isinstance(settled, Exception):
            raise settled
        if settled:
            raw, checkpoint, snapshot = settled
            reply: dict[str, Any] = json.loads(text(raw))
        else:
            reply, checkpoint, snapshot = await self._reply(reply_key, deadline), None, None
        if reply["status"] != "accepted":
            raise CommandRejected(reply)
        reply["shard"] = shard
        order_id: str | None = reply["order_id"] if read_order else None
        if snapshot and order_id is not None:  # every event projected: the live hash is the snapshot's
            return reply, queries.order_of(order_id, ORDER.to_live(ORDER.values(ORDER_SNAPSHOT.decode(snapshot))))
        last = reply["events"][-1]["id"] if reply["events"] else None
        if last is not None and not (checkpoint and entry_order(text(checkpoint)) >= entry_order(last)):
            await self.wait_projected(shard, last)  # not projected yet
        return reply, await queries.get_order(self.redis, order_id) if order_id is not None else None

    async def _reply(self, reply_key: str, deadline: float) -> dict[str, Any]:
        """The reply the first wait did not see, waited for until ``deadline``."""
        found = None
        while found is None and time.monotonic() < deadline:
            found = await self.redis.blpop([reply_key], timeout=BLOCK_MS / 1000)
        if found is not None:
            return json.loads(text(found[1]))  # type: ignore[no-any-return]
        raise LedgerTimeout(
            f"no reply on {reply_key} within {self.timeout} s: is `ledger serve` running? "
            "retry with the same command_id"
        )

    async def wait_projected(self, shard: int, entry_id: str, deadline: float | None = None) -> None:
        """Wait until the live projection of ``shard`` has applied the event ``entry_id``, until
        ``deadline`` (``time.monotonic()``; default: the client's timeout from now).

        One blocking XREAD on the shard's progress stream after the id just before ``entry_id``:
        it answers at once when a step at or past ``entry_id`` is there already, else as soon as
        the projection's step that applies it adds its entry. Between blocks (at most
        ``BLOCK_MS`` each) the checkpoint itself is read: a projection of an earlier version moves
        it without telling."""
        target = entry_order(entry_id)
        shard_keys = keys.ShardKeys(shard)
        after = _preceding(entry_id)
        if deadline is None:
            deadline = time.monotonic() + self.timeout
        while True:
            block_ms = max(1, min(BLOCK_MS, int((deadline - time.monotonic()) * 1000)))
            told = await self.redis.xread({shard_keys.progress: after}, count=1, block=block_ms)
            applied = None if told else await queries.projected_up_to(self.redis, shard)
            if told or (applied is not None and entry_order(applied) >= target):
                return
            if time.monotonic() > deadline:
                raise LedgerTimeout(
                    f"the live projection of shard {shard} did not reach {entry_id} in {self.timeout} s: "
                    "is the projection role running?"
                )

    async def wait_order_final(self, shard: int, order_id: str, after: str) -> Settled:
        """Wait for the event that makes an order final (filled, cancelled, rejected, expired)
        and, for a fill, the position events it appended; return them once projected. The
        timeout is a deadline the reads block to, not a cancellation: redis-py can lose a
        cancellation that arrives with a blocking read's reply, and the wait would go on."""
        deadline = time.monotonic() + self.timeout
        final: wire.OrderChange | None = None
        positions: list[wire.PositionEvent] = []
        async for stored in EventStore(self.redis, shard).subscribe(after, block_ms=BLOCK_MS, until=deadline):
            event = stored.event
            if isinstance(event, wire.PositionEvent) and event.order_id == order_id:
                positions.append(event)
            elif isinstance(event, wire.OrderChange) and event.stream == order_id and event.status.is_final:
                final = event
            else:
                continue
            if final is not None and (settled := Settled(final, positions)).complete:
                await self.wait_projected(shard, stored.entry_id, deadline)
                return settled
        raise LedgerTimeout(
            f"order {order_id} was not filled within {self.timeout} s (with LEDGER_EXECUTION=external "
            "the strategy must report its fills): retry with the same command_id to keep waiting"
        )

    async def submit_on(
        self, kind: str, aggregate_id: str, command: Callable[[str, str], wire.Command]
    ) -> dict[str, Any] | None:
        """Submit ``command(user_id, aggregate_id)`` on an order or position (``kind``) the ledger
        knows; its accepted reply, or None when the ledger knows no such aggregate or refuses."""
        aggregate_id = check_identifier("id", aggregate_id, f"{kind}_id").lower()
        user_id = await self.owner(kind, aggregate_id)
        if user_id is None:
            return None
        try:
            return await self.submit(command(user_id, aggregate_id))
        except CommandRejected:
            return None

    async def owner(self, kind: str, aggregate_id: str) -> str | None:
        """The user of an order or position (``kind``) the ledger knows, open or not: the live
        keys hold open positions and recent orders, the shards' snapshots every one."""
        for shard in range(await self.shards()):
            store = EventStore(self.redis, shard)
            state = await (store.order(aggregate_id) if kind == "order" else store.position(aggregate_id))
            if state is not None:
                return state.user_id
        return None


class _Manager:
    """What both managers hold: the Redis client (reads) and a ``LedgerClient`` (commands).
    Methods that change state take an optional ``command_id``: after a ``LedgerTimeout``, call
    again with the same one (see the README)."""

    def __init__(self, redis: Any, *, timeout: float = API_TIMEOUT_S) -> None:
        self.redis = redis
        self.client = LedgerClient(redis, timeout=timeout)


class PositionManager(_Manager):
    """Positions of the seed's API (CONTRACT §10)."""

    async def get_positions(self, user_id: str, exchange: Exchange | str, symbol: str | None = None) -> list[Position]:
        return await queries.get_positions(self.redis, user_id, exchange, symbol)

    async def get_position(self, position_id: str) -> Position | None:
        return await queries.get_position(self.redis, position_id)

    async def open_position(
        self,
        user_id: str,
        exchange: Exchange | str,
        symbol: str,
        side: PositionSide | str,
        size: Decimal | str,
        leverage: int = 1,
        stop_loss: Decimal | str | None = None,
        take_profit: Decimal | str | None = None,
        *,
        price: Decimal | str | None = None,
        metadata: dict[str, Any] | None = None,
        command_id: str | None = None,
    ) -> Position:
        """Open (or increase) a position; return it once its entry order is filled.

        The position returned is the one the entry order's fills changed (their position
        events). Called again with the same ``command_id`` it places nothing new and returns
        that position as it is then.
        """
        side = PositionSide(side)
        reply = await self.client.submit(
            wire.OpenPosition(
                command_id=_command_id(command_id),
                user_id=user_id,
                exchange=Exchange(exchange),
                symbol=symbol,
                side=side,
                size=_decimal(size, "size"),
                leverage=leverage,
                price=_optional_decimal(price, "price"),
                stop_loss=_optional_decimal(stop_loss, "stop_loss"),
                take_profit=_optional_decimal(take_profit, "take_profit"),
                metadata=metadata,
            )
        )
        order_id = reply["order_id"]
        settled = await self.client.wait_order_final(reply["shard"], order_id, reply["events"][-1]["id"])
        if settled.final.status is not OrderStatus.FILLED:
            raise OperationFailed(f"the entry order {order_id} ended {settled.final.status}")
        position_id = settled.position_id(side)
        position = await queries.get_position(self.redis, position_id) if position_id else None
        if position is None:
            raise OperationFailed(
                f"the entry order {order_id} filled but no {side} position it changed is open "
                f"(position {position_id}): see `ledger history {order_id}`"
            )
        return position

    async def close_position(
        self,
        position_id: str,
        size: Decimal | str | None = None,
        reason: str = "manual",
        *,
        price: Decimal | str | None = None,
        command_id: str | None = None,
    ) -> bool:
        """Close all (or ``size`` of) an open position; True once the closing order is filled,
        False when the ledger refuses (unknown or closed position, size too large).

        Called again with the same ``command_id`` (even once the position is closed) it closes
        nothing more and answers as the first call would have.
        """
        reply = await self.client.submit_on(
            "position",
            position_id,
            lambda user_id, position_id: wire.ClosePosition(
                command_id=_command_id(command_id),
                user_id=user_id,
                position_id=position_id,
                size=_optional_decimal(size, "size"),
                reason=reason,
                price=_optional_decimal(price, "price"),
            ),
        )
        if reply is None:
            return False
        settled = await self.client.wait_order_final(reply["shard"], reply["order_id"], reply["events"][-1]["id"])
        return settled.final.status is OrderStatus.FILLED

    async def calculate_pnl(self, position: Position, current_price: Decimal | str) -> PnLInfo:
        """PnL at ``current_price``, a mark under the mark rule (``ledger.client.models.parse_mark``)."""
        return position.pnl(current_price)

    async def sync_positions_from_exchange(
        self,
        user_id: str,
        exchange: Exchange | str,
        *,
        venue: VenueConfig | None = None,
        symbols: Sequence[str] = (),
        settings: Settings | None = None,
    ) -> Reconciliation:
        """Reconcile the user's orders, fills and positions on a live venue with the ledger
        (``ledger.client.reconcile``): what the venue knows and the ledger lacks is recorded as
        commands (read your own writes), every other difference is a finding in the result and
        in ``ledger:ops``. ``venue``: the exchange's accounts and options (default: the file
        ``settings.credentials`` names); ``symbols``: markets to look at beyond the user's own;
        ``settings`` (default: from the environment): where the PostgreSQL archive is, for the
        fees of fills the Redis log no longer holds."""
        exchange = Exchange(exchange)
        settings = Settings.from_env() if settings is None else settings
        if venue is None:
            venue = live_configs({exchange: "live"}, settings.credentials)[exchange]
        clients = VenueClients({exchange: venue.options})
        try:
            return await Reconciler(self.redis, self.client, venue, clients, settings).run(user_id, symbols)
        finally:
            await clients.close()


class OrderManager(_Manager):
    """Orders of the seed's API (CONTRACT §10)."""

    async def create_order(
        self,
        user_id: str,
        exchange: Exchange | str,
        symbol: str,
        side: OrderSide | str,
        order_type: OrderType | str,
        quantity: Decimal | str,
        price: Decimal | str | None = None,
        *,
        trigger_price: Decimal | str | None = None,
        client_order_id: str | None = None,
        position_side: PositionSide | str | None = None,
        reduce_only: bool = False,
        leverage: int | None = None,
        grid_level: int | None = None,
        metadata: dict[str, Any] | None = None,
        command_id: str | None = None,
    ) -> Order:
        """Place an order; return it as the live projection shows it (status pending or later).

        Called again with the same ``command_id`` it places nothing and returns that order.
        """
        reply, order = await self.client.submit_order(
            wire.PlaceOrder(
                command_id=_command_id(command_id),
                user_id=user_id,
                exchange=Exchange(exchange),
                symbol=symbol,
                side=OrderSide(side),
                order_type=OrderType(order_type),
                quantity=_decimal(quantity, "quantity"),
                price=_optional_decimal(price, "price"),
                trigger_price=_optional_decimal(trigger_price, "trigger_price"),
                client_order_id=client_order_id,
                position_side=PositionSide(position_side) if position_side is not None else None,
                reduce_only=reduce_only,
                leverage=leverage,
                grid_level=grid_level,
                metadata=metadata,
            ),
        )
        if order is None:
            raise OperationFailed(f"order {reply['order_id']} is no longer in the live keys: see `ledger history`")
        return order

    async def get_order(self, order_id: str) -> Order | None:
        return await queries.get_order(self.redis, order_id)

    async def cancel_order(self, order_id: str, *, command_id: str | None = None) -> bool:
        """Request the cancel of an order not yet final; True when the ledger accepted it,
        False when it refused (unknown or final order).

        Called again with the same ``command_id`` it requests nothing more and answers as the
        first call would have.
        """
        reply = await self.client.submit_on(
            "order",
            order_id,
            lambda user_id, order_id: wire.CancelOrder(
                command_id=_command_id(command_id), user_id=user_id, order_id=order_id
            ),
        )
        return reply is not None

    async def get_orders(
        self,
        user_id: str,
        exchange: Exchange | str,
        status: OrderStatus | str | None = None,
        *,
        exact_status: OrderStatus | str | None = None,
    ) -> list[Order]:
        """A user's orders on an exchange, newest first. ``status=OrderStatus.OPEN`` returns
        every order not yet final (pending, open, partially_filled, pending_cancel; CONTRACT
        §10), any other ``status`` that status; ``exact_status`` returns one status only
        (``exact_status="open"``: acknowledged, nothing filled, no cancel requested)."""
        return await queries.get_orders(self.redis, user_id, exchange, status, exact_status=exact_status)

    async def _events_from(
        self, shard: int, after: str, archive: psycopg.AsyncConnection[Any] | None
    ) -> AsyncIterator[StoredEvent]:
        """The shard's events after ``after``: the past through the reader over both tiers, then
        live from the last entry it read."""
        if after != "$":
            start = None if after in ("0", "0-0") else after
            async for stored in read_log(
                self.redis, shard, conn=archive, after=start, no_archive="no archive connection given"
            ):
                yield stored
                after = stored.entry_id
        async for stored in EventStore(self.redis, shard).subscribe(after, block_ms=BLOCK_MS):
            yield stored

    async def monitor_order_fills(
        self,
        user_id: str,
        exchange: Exchange | str,
        *,
        after: str = "$",
        archive: psycopg.AsyncConnection[Any] | None = None,
    ) -> AsyncIterator[Order]:
        """Yield the updated order after each fill of the user on the exchange, live.

        It follows the shard's event log from ``after`` (an entry id; default: now) and never
        skips an entry, so no fill between two reads is missed. From an ``after`` older than what
        Redis still holds (a trimmed log), it reads the PostgreSQL archive through ``archive``
        (an autocommit connection), or raises ``ledger.store.log.LogError`` without one: it never
        skips silently.
        """
        exchange = Exchange(exchange)
        shard = await self.client.shard_of(user_id)
        async for stored in self._events_from(shard, after, archive):
            event = stored.event
            if isinstance(event, wire.OrderFilled) and event.user_id == user_id and event.exchange is exchange:
                await self.client.wait_projected(shard, stored.entry_id)
                order = await queries.get_order(self.redis, event.stream)
                if order is not None:
                    yield order.model_copy(
                        update={
                            "filled_qty": Decimal(event.filled_qty),
                            "fill_basis": Decimal(event.fill_basis),
                            "status": event.status,
                            "version": event.version,
                        }
                    )
