"""The seed's Python API: ``PositionManager`` and ``OrderManager`` (CONTRACT §10).

Both work through the command stream and the live projection, like any strategy in any
language: a method that changes state publishes a command, waits for its reply (BLPOP), then
waits until the live projection has applied the resulting events (the shard's checkpoint), so
the caller reads its own writes. ``open_position`` and ``close_position`` also wait for the order
to be filled by whoever executes it (the paper venue, a live venue, or the strategy reporting
fills in ``external`` mode).

The client may be plain or cluster, with or without ``decode_responses``. Blocking reads never
block longer than one second at a time, below redis-py's default 5 s socket timeout.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

from ledger import keys, wire
from ledger.enums import (
    Exchange,
    OrderSide,
    OrderStatus,
    OrderType,
    PositionSide,
)
from ledger.eventstore import EventStore
from ledger.models import Order, PnLInfo, Position
from ledger.redis_conn import entry_order, text
from ledger.values import format_decimal
from projections import queries

BLOCK_MS = 1000


class LedgerError(RuntimeError):
    """The ledger could not do what was asked; the message says why."""


class CommandRejected(LedgerError):
    def __init__(self, reply: dict[str, Any]) -> None:
        error = reply.get("error") or {}
        super().__init__(f"{reply.get('command_id')} rejected: {error.get('code')}: {error.get('message')}")
        self.code = error.get("code")
        self.reply = reply


class LedgerTimeout(LedgerError):
    pass


def _wire_decimal(value: Decimal | str | int | None) -> str | None:
    if value is None:
        return None
    if isinstance(value, float):
        raise TypeError("decimals must be Decimal or str, never float")
    return format_decimal(Decimal(value))


class LedgerClient:
    """Publishes commands and waits for their outcome and their projection."""

    def __init__(self, redis: Any, *, timeout: float = 30.0) -> None:
        self.redis = redis
        self.timeout = timeout
        self._shards: int | None = None

    async def shard_of(self, user_id: str) -> int:
        if self._shards is None:
            recorded = await self.redis.hget(keys.META, "shards")
            if recorded is None:
                raise LedgerError("no ledger in this Redis (ledger:meta has no shards): start `ledger serve`")
            self._shards = int(recorded)
        return keys.shard_of(user_id, self._shards)

    async def submit(self, command_type: str, data: dict[str, Any]) -> dict[str, Any]:
        """Publish a command and return its accepted reply, projected; raise if rejected."""
        data = {k: v for k, v in data.items() if v is not None}
        data.setdefault("command_id", f"api-{secrets.token_hex(10)}")
        shard = await self.shard_of(data["user_id"])
        shard_keys = keys.ShardKeys(shard)
        reply_key = shard_keys.reply(data["user_id"], data["command_id"])
        await self.redis.xadd(shard_keys.commands, {"type": command_type, "data": json.dumps(data)})
        reply = await self._reply(reply_key)
        if reply["status"] != "accepted":
            raise CommandRejected(reply)
        if reply["events"]:
            await self.wait_projected(shard, reply["events"][-1]["id"])
        reply["shard"] = shard
        return reply

    async def _reply(self, reply_key: str) -> dict[str, Any]:
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            found = await self.redis.blpop([reply_key], timeout=1)
            if found is not None:
                return json.loads(text(found[1]))  # type: ignore[no-any-return]
        raise LedgerTimeout(f"no reply on {reply_key} within {self.timeout} s: is `ledger serve` running?")

    async def wait_projected(self, shard: int, entry_id: str) -> None:
        """Wait until the live projection of ``shard`` has applied the event ``entry_id``."""
        target = entry_order(entry_id)
        deadline = time.monotonic() + self.timeout
        pause = 0.001
        while True:
            applied = await queries.projected_up_to(self.redis, shard)
            if applied is not None and entry_order(applied) >= target:
                return
            if time.monotonic() > deadline:
                raise LedgerTimeout(
                    f"the live projection of shard {shard} did not reach {entry_id} in {self.timeout} s"
                )
            await asyncio.sleep(pause)
            pause = min(pause * 2, 0.05)

    async def wait_order_final(self, shard: int, order_id: str, after: str) -> wire.OrderChange:
        """Wait for the event that makes an order final (filled, cancelled, rejected, expired)."""

        async def watch() -> wire.OrderChange:
            async for stored in EventStore(self.redis, shard).subscribe(after, block_ms=BLOCK_MS):
                event = stored.event
                if isinstance(event, wire.OrderChange) and event.stream == order_id and event.status.is_final:
                    await self.wait_projected(shard, stored.entry_id)
                    return event
            raise AssertionError("unreachable")  # pragma: no cover

        try:
            return await asyncio.wait_for(watch(), self.timeout)
        except TimeoutError:
            raise LedgerTimeout(
                f"order {order_id} was not filled within {self.timeout} s: "
                "with LEDGER_EXECUTION=external the strategy must report its fills"
            ) from None


class PositionManager:
    def __init__(self, redis: Any, *, timeout: float = 30.0) -> None:
        self.redis = redis
        self.client = LedgerClient(redis, timeout=timeout)

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
    ) -> Position:
        """Open (or increase) a position and return it once its entry order is filled."""
        reply = await self.client.submit(
            "open_position",
            {
                "user_id": user_id,
                "exchange": Exchange(exchange).value,
                "symbol": symbol,
                "side": PositionSide(side).value,
                "size": _wire_decimal(size),
                "leverage": leverage,
                "price": _wire_decimal(price),
                "stop_loss": _wire_decimal(stop_loss),
                "take_profit": _wire_decimal(take_profit),
                "metadata": metadata,
            },
        )
        final = await self.client.wait_order_final(reply["shard"], reply["order_id"], reply["events"][-1]["id"])
        if final.status is not OrderStatus.FILLED:
            raise LedgerError(f"the entry order {reply['order_id']} ended {final.status}")
        position = await queries.get_position(self.redis, reply["position_id"])
        if position is None:
            raise LedgerError(f"position {reply['position_id']} is not open after its entry fill")
        return position

    async def close_position(
        self,
        position_id: str,
        size: Decimal | str | None = None,
        reason: str = "manual",
        *,
        price: Decimal | str | None = None,
    ) -> bool:
        """Close all (or ``size`` of) an open position; True once the closing order is filled."""
        position = await queries.get_position(self.redis, position_id)
        if position is None:
            return False
        try:
            reply = await self.client.submit(
                "close_position",
                {
                    "user_id": position.user_id,
                    "position_id": position_id,
                    "size": _wire_decimal(size),
                    "reason": reason,
                    "price": _wire_decimal(price),
                },
            )
        except CommandRejected:
            return False
        final = await self.client.wait_order_final(reply["shard"], reply["order_id"], reply["events"][-1]["id"])
        return final.status is OrderStatus.FILLED

    async def calculate_pnl(self, position: Position, current_price: Decimal | str) -> PnLInfo:
        return position.pnl(Decimal(current_price))

    async def sync_positions_from_exchange(self, user_id: str, exchange: Exchange | str) -> list[Position]:
        raise NotImplementedError("reconciliation with live venues arrives with the ccxt venue layer")


class OrderManager:
    def __init__(self, redis: Any, *, timeout: float = 30.0) -> None:
        self.redis = redis
        self.client = LedgerClient(redis, timeout=timeout)

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
    ) -> Order:
        """Place an order; return it as the live projection shows it (status pending or later)."""
        reply = await self.client.submit(
            "place_order",
            {
                "user_id": user_id,
                "exchange": Exchange(exchange).value,
                "symbol": symbol,
                "side": OrderSide(side).value,
                "order_type": OrderType(order_type).value,
                "quantity": _wire_decimal(quantity),
                "price": _wire_decimal(price),
                "trigger_price": _wire_decimal(trigger_price),
                "client_order_id": client_order_id,
                "position_side": PositionSide(position_side).value if position_side else None,
                "reduce_only": reduce_only or None,
                "leverage": leverage,
                "grid_level": grid_level,
                "metadata": metadata,
            },
        )
        order = await queries.get_order(self.redis, reply["order_id"])
        assert order is not None, "the projection applied the placement"
        return order

    async def get_order(self, order_id: str) -> Order | None:
        return await queries.get_order(self.redis, order_id)

    async def cancel_order(self, order_id: str) -> bool:
        """Request the cancel of an order not yet final; True when the ledger accepted it."""
        order = await queries.get_order(self.redis, order_id)
        if order is None:
            return False
        try:
            await self.client.submit("cancel_order", {"user_id": order.user_id, "order_id": order_id})
        except CommandRejected:
            return False
        return True

    async def get_orders(
        self, user_id: str, exchange: Exchange | str, status: OrderStatus | str | None = None
    ) -> list[Order]:
        return await queries.get_orders(self.redis, user_id, exchange, status)

    async def monitor_order_fills(
        self, user_id: str, exchange: Exchange | str, *, after: str = "$"
    ) -> AsyncIterator[Order]:
        """Yield the updated order after each fill of the user on the exchange, live.

        It follows the shard's event log from ``after`` (default: now) and never skips an entry,
        so no fill between two reads is missed.
        """
        exchange = Exchange(exchange)
        shard = await self.client.shard_of(user_id)
        async for stored in EventStore(self.redis, shard).subscribe(after, block_ms=BLOCK_MS):
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
