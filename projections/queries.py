"""Read-only queries over the live keys of CONTRACT §6 (and the marks of §8).

Every function takes a ``redis.asyncio`` client, plain or cluster, with or without
``decode_responses``. Reads are pipelined by key; nothing here uses KEYS or SCAN.
"""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

from ledger import keys
from ledger.enums import Exchange, OrderStatus
from ledger.models import Order, Position
from ledger.redis_conn import text
from ledger.values import check_identifier


def _decoded(raw: dict[Any, Any]) -> dict[str, str]:
    return {text(k): text(v) for k, v in raw.items()}


def _optional(fields: dict[str, str], name: str) -> str | None:
    value = fields.get(name, "")
    return value if value != "" else None


def _json(fields: dict[str, str], name: str) -> Any:
    value = _optional(fields, name)
    return json.loads(value) if value else {}


def position_from_hash(raw: dict[Any, Any], mark: Decimal | None = None) -> Position:
    fields = _decoded(raw)
    return Position(
        id=fields["id"],
        user_id=fields["user_id"],
        exchange=fields["exchange"],  # type: ignore[arg-type]
        symbol=fields["symbol"],
        side=fields["side"],  # type: ignore[arg-type]
        size=fields["size"],  # type: ignore[arg-type]
        entry_price=fields["entry_price"],  # type: ignore[arg-type]
        leverage=int(fields.get("leverage") or 1),
        status=fields["status"],  # type: ignore[arg-type]
        exit_price=_optional(fields, "exit_price"),  # type: ignore[arg-type]
        realized_pnl=fields.get("realized_pnl") or "0",  # type: ignore[arg-type]
        fees=fields.get("fees") or "0",  # type: ignore[arg-type]
        other_fees=_json(fields, "other_fees"),
        stop_loss=_optional(fields, "stop_loss"),  # type: ignore[arg-type]
        take_profit=_optional(fields, "take_profit"),  # type: ignore[arg-type]
        current_price=mark,
        metadata=_json(fields, "metadata"),
        created_at=int(fields["created_at"]),  # type: ignore[arg-type]
        updated_at=int(fields["updated_at"]),  # type: ignore[arg-type]
        version=int(fields["version"]),
    )


def order_from_hash(raw: dict[Any, Any]) -> Order:
    fields = _decoded(raw)
    grid_level = _optional(fields, "grid_level")
    leverage = _optional(fields, "leverage")
    return Order(
        id=fields["id"],
        user_id=fields["user_id"],
        exchange=fields["exchange"],  # type: ignore[arg-type]
        symbol=fields["symbol"],
        side=fields["side"],  # type: ignore[arg-type]
        order_type=fields["order_type"],  # type: ignore[arg-type]
        quantity=fields["quantity"],  # type: ignore[arg-type]
        price=_optional(fields, "price"),  # type: ignore[arg-type]
        trigger_price=_optional(fields, "trigger_price"),  # type: ignore[arg-type]
        status=fields["status"],  # type: ignore[arg-type]
        filled_qty=fields.get("filled_qty") or "0",  # type: ignore[arg-type]
        fill_basis=fields.get("fill_basis") or "0",  # type: ignore[arg-type]
        exchange_order_id=_optional(fields, "exchange_order_id"),
        client_order_id=_optional(fields, "client_order_id"),
        position_side=_optional(fields, "position_side"),  # type: ignore[arg-type]
        position_id=_optional(fields, "position_id"),
        reduce_only=fields.get("reduce_only") == "true",
        leverage=int(leverage) if leverage else None,
        grid_level=int(grid_level) if grid_level else None,
        metadata=_json(fields, "metadata"),
        created_at=int(fields["created_at"]),  # type: ignore[arg-type]
        updated_at=int(fields["updated_at"]),  # type: ignore[arg-type]
        version=int(fields["version"]),
    )


async def marks(redis: Any, exchange: Exchange | str, symbols: list[str]) -> dict[str, Decimal]:
    """The mark prices of ``symbols`` on an exchange (those that have one)."""
    if not symbols:
        return {}
    values = await redis.hmget(keys.marks(Exchange(exchange)), symbols)
    return {s: Decimal(text(v)) for s, v in zip(symbols, values, strict=True) if v}


async def _hashes(redis: Any, hash_keys: list[str]) -> list[dict[str, str]]:
    pipe = redis.pipeline(transaction=False)
    for key in hash_keys:
        pipe.hgetall(key)
    return [_decoded(h) for h in await pipe.execute() if h]


async def position_hashes(
    redis: Any, user_id: str | None = None, exchange: Exchange | str | None = None, symbol: str | None = None
) -> list[dict[str, str]]:
    """The live hashes of open positions: of a user (on one exchange or all), or of everyone."""
    exchanges = [Exchange(exchange)] if exchange is not None else list(Exchange)
    if user_id is not None and symbol is not None:
        position_keys = [keys.position_key(user_id, ex, symbol, side) for ex in exchanges for side in ("long", "short")]
    else:
        if user_id is not None:
            pipe = redis.pipeline(transaction=False)
            for ex in exchanges:
                pipe.smembers(keys.position_index(user_id, ex))
            ids = sorted({text(i) for members in await pipe.execute() for i in members})
        else:
            ids = sorted(text(i) for i in await redis.smembers(keys.ACTIVE_POSITIONS))
        found = await redis.hmget(keys.POSITION_KEYS, ids) if ids else []
        position_keys = [text(k) for k in found if k]
    hashes = await _hashes(redis, position_keys)
    wanted = {str(e) for e in exchanges}
    hashes = [h for h in hashes if h["exchange"] in wanted and (symbol is None or h["symbol"] == symbol)]
    return sorted(hashes, key=lambda h: (h["user_id"], h["exchange"], h["symbol"], h["side"]))


async def _priced(redis: Any, hashes: list[dict[str, str]]) -> list[Position]:
    by_exchange: dict[str, set[str]] = {}
    for fields in hashes:
        by_exchange.setdefault(fields["exchange"], set()).add(fields["symbol"])
    prices = {ex: await marks(redis, ex, sorted(symbols)) for ex, symbols in by_exchange.items()}
    return [position_from_hash(f, prices[f["exchange"]].get(f["symbol"])) for f in hashes]


async def get_positions(
    redis: Any, user_id: str, exchange: Exchange | str, symbol: str | None = None
) -> list[Position]:
    """Open positions of a user on an exchange (one symbol, or all), priced at the marks."""
    return await _priced(redis, await position_hashes(redis, user_id, exchange, symbol))


async def get_position(redis: Any, position_id: str) -> Position | None:
    """One open position by id (closed ones live in PostgreSQL)."""
    check_identifier("uuid", position_id, "position_id")
    key = await redis.hget(keys.POSITION_KEYS, position_id)
    if not key:
        return None
    found = await _priced(redis, await _hashes(redis, [text(key)]))
    return found[0] if found else None


async def get_order(redis: Any, order_id: str) -> Order | None:
    raw = await redis.hgetall(keys.order_key(order_id))
    return order_from_hash(raw) if raw else None


async def order_hashes(
    redis: Any,
    user_id: str,
    exchange: Exchange | str | None = None,
    status: OrderStatus | str | None = None,
    symbol: str | None = None,
) -> list[dict[str, str]]:
    """The live hashes of a user's orders (one exchange or all), newest first.

    Final orders stay readable for their TTL; ids whose hash expired are dropped from the
    user's set on the way.
    """
    wanted = OrderStatus(status).value if status is not None else None
    exchanges = [Exchange(exchange)] if exchange is not None else list(Exchange)
    found: list[dict[str, str]] = []
    for ex in exchanges:
        index = keys.user_orders(user_id, ex)
        ids = sorted(text(i) for i in await redis.smembers(index))
        if not ids:
            continue
        pipe = redis.pipeline(transaction=False)
        for order_id in ids:
            pipe.hgetall(keys.order_key(order_id))
        hashes = await pipe.execute()
        expired = [order_id for order_id, raw in zip(ids, hashes, strict=True) if not raw]
        if expired:
            await redis.srem(index, *expired)
        found += [_decoded(raw) for raw in hashes if raw]
    found = [
        h for h in found if (wanted is None or h["status"] == wanted) and (symbol is None or h["symbol"] == symbol)
    ]
    return sorted(found, key=lambda h: (int(h["created_at"]), h["id"]), reverse=True)


async def get_orders(
    redis: Any, user_id: str, exchange: Exchange | str, status: OrderStatus | str | None = None
) -> list[Order]:
    """Orders of a user on an exchange, newest first."""
    return [order_from_hash(h) for h in await order_hashes(redis, user_id, exchange, status)]


async def open_order_ids(redis: Any, exchange: Exchange | str, symbol: str) -> set[str]:
    return {text(i) for i in await redis.smembers(keys.open_orders(Exchange(exchange), symbol))}


async def projected_up_to(redis: Any, shard: int) -> str | None:
    """The id of the last event the live projection applied on a shard."""
    value = await redis.get(keys.ShardKeys(shard).checkpoint)
    return text(value) if value else None
