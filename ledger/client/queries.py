"""Read-only queries over the live keys of CONTRACT §6 (and the marks of §8).

Every function takes a ``redis.asyncio`` client, plain or cluster, with or without
``decode_responses``. Reads are pipelined by key; nothing here uses KEYS or SCAN. Reads never
write: an id whose order hash has expired is skipped (removing it from ``orders:user:…`` is the
live projection's job; on a cluster a reader cannot tell an expired hash from one not yet
written). Marks are read by ``ledger.client.models.read_mark``: an invalid one is ignored with a warning.
"""

from __future__ import annotations

from collections.abc import Callable
from decimal import Decimal
from typing import Any, TypeVar

import structlog

from ledger.client.models import Order, Position, read_mark
from ledger.domain.enums import OPEN_ORDER_STATUSES, Exchange, OrderStatus
from ledger.domain.values import EPOCH, RULES, check_identifier
from ledger.store import keys
from ledger.store.redis_conn import text

log = structlog.get_logger("ledger.queries")


def _decoded(raw: dict[Any, Any]) -> dict[str, str]:
    return {text(k): text(v) for k, v in raw.items()}


def position_from_hash(raw: dict[Any, Any], mark: Decimal | None = None) -> Position:
    """A position from its live hash (``ledger.domain.mapping.POSITION``), priced at ``mark``."""
    return Position.from_live(_decoded(raw), current_price=mark)


async def marks(redis: Any, exchange: Exchange | str, symbols: list[str]) -> dict[str, Decimal]:
    """The valid mark prices of ``symbols`` on an exchange (absent and invalid ones left out)."""
    if not symbols:
        return {}
    exchange = Exchange(exchange)
    values = await redis.hmget(keys.marks(exchange), symbols)
    found = {s: read_mark(v, exchange, s) for s, v in zip(symbols, values, strict=True)}
    return {s: mark for s, mark in found.items() if mark is not None}


_Model = TypeVar("_Model", Position, Order)


def _readable(
    key: str, fields: dict[str, str], build: Callable[[dict[str, str]], _Model], expected_id: str | None = None
) -> _Model | None:
    """``build(fields)`` for the hash at ``key``, or ``None`` when it is not the expected one.

    The live keys are shared with the legacy readers and writers: a hash another program wrote
    (or broke) is skipped with a warning naming the key, never an exception that hides every
    other position or order. A hash that now holds another aggregate than the id that led to
    it (the side's next position, on a cluster mid-batch) is skipped silently.
    """
    try:
        value = build(fields)
    except (KeyError, ValueError, TypeError) as exc:
        log.warning("live hash is not a ledger hash, skipped", key=key, error=f"{type(exc).__name__}: {exc}")
        return None
    if expected_id is not None and value.id != expected_id:
        return None
    return value


async def _hashes(redis: Any, hash_keys: list[str]) -> list[dict[str, str]]:
    """HGETALL of each key, in order (an absent key gives ``{}``)."""
    if not hash_keys:
        return []
    pipe = redis.pipeline(transaction=False)
    for key in hash_keys:
        pipe.hgetall(key)
    return [_decoded(h) for h in await pipe.execute()]


async def _positions_at(redis: Any, targets: list[tuple[str, str | None]]) -> list[tuple[dict[str, str], Position]]:
    """The readable positions at these keys, each with the id it must hold when known."""
    found = zip(targets, await _hashes(redis, [key for key, _ in targets]), strict=True)
    read = [
        (fields, _readable(key, fields, Position.from_live, expected)) for (key, expected), fields in found if fields
    ]
    return [(fields, position) for fields, position in read if position is not None]


async def _position_entries(
    redis: Any, user_id: str | None, exchange: Exchange | str | None, symbol: str | None
) -> list[tuple[dict[str, str], Position]]:
    exchanges = [Exchange(exchange)] if exchange is not None else list(Exchange)
    targets: list[tuple[str, str | None]]
    if user_id is not None and symbol is not None:
        targets = [
            (keys.position_key(user_id, ex, symbol, side), None) for ex in exchanges for side in ("long", "short")
        ]
    else:
        if user_id is not None:
            pipe = redis.pipeline(transaction=False)
            for ex in exchanges:
                pipe.smembers(keys.position_index(user_id, ex))
            ids = sorted({text(i) for members in await pipe.execute() for i in members})
        else:
            ids = sorted(text(i) for i in await redis.smembers(keys.ACTIVE_POSITIONS))
        found = await redis.hmget(keys.POSITION_KEYS, ids) if ids else []
        targets = [(text(key), position_id) for position_id, key in zip(ids, found, strict=True) if key]
    entries = [
        (fields, position)
        for fields, position in await _positions_at(redis, targets)
        if position.exchange in exchanges
        and (user_id is None or position.user_id == user_id)
        and (symbol is None or position.symbol == symbol)
    ]
    return sorted(entries, key=lambda e: (e[1].user_id, e[1].exchange, e[1].symbol, e[1].side))


async def position_hashes(
    redis: Any, user_id: str | None = None, exchange: Exchange | str | None = None, symbol: str | None = None
) -> list[dict[str, str]]:
    """The live hashes of open positions: of a user (on one exchange or all), or of everyone.

    Only hashes that read as ledger positions (see ``_readable``)."""
    return [fields for fields, _ in await _position_entries(redis, user_id, exchange, symbol)]


async def _priced(redis: Any, positions: list[Position]) -> list[Position]:
    by_exchange: dict[Exchange, set[str]] = {}
    for position in positions:
        by_exchange.setdefault(position.exchange, set()).add(position.symbol)
    prices = {ex: await marks(redis, ex, sorted(symbols)) for ex, symbols in by_exchange.items()}
    return [p.model_copy(update={"current_price": prices[p.exchange].get(p.symbol)}) for p in positions]


async def get_positions(
    redis: Any, user_id: str, exchange: Exchange | str, symbol: str | None = None
) -> list[Position]:
    """Open positions of a user on an exchange (one symbol, or all), priced at the valid marks."""
    return await _priced(redis, [p for _, p in await _position_entries(redis, user_id, exchange, symbol)])


async def get_position(redis: Any, position_id: str) -> Position | None:
    """One open position by id (closed ones live in PostgreSQL), priced at its valid mark."""
    position_id = check_identifier("id", position_id, "position_id").lower()
    key = await redis.hget(keys.POSITION_KEYS, position_id)
    if not key:
        return None
    found = await _positions_at(redis, [(text(key), position_id)])
    return (await _priced(redis, [found[0][1]]))[0] if found else None


async def get_order(redis: Any, order_id: str) -> Order | None:
    order_id = check_identifier("id", order_id, "order_id").lower()
    return order_of(order_id, await redis.hgetall(keys.order_key(order_id)))


def order_of(order_id: str, raw: dict[Any, Any]) -> Order | None:
    """The order its live hash ``orders:{order_id}`` shows, as read (HGETALL); None: no hash."""
    fields = _decoded(raw)
    return _readable(keys.order_key(order_id), fields, Order.from_live, order_id) if fields else None


def order_statuses(
    status: OrderStatus | str | None = None, exact_status: OrderStatus | str | None = None
) -> frozenset[OrderStatus] | None:
    """The statuses an order filter keeps (``None``: every order).

    ``status=OPEN`` means every order not yet final (``OPEN_ORDER_STATUSES``: pending, open,
    partially_filled, pending_cancel; CONTRACT §10), any other status means itself;
    ``exact_status`` keeps that one status only (``exact_status=OPEN``: acknowledged by the venue,
    nothing filled, no cancel requested). At most one of the two.
    """
    if status is not None and exact_status is not None:
        raise ValueError("give status or exact_status, not both")
    if exact_status is not None:
        return frozenset({OrderStatus(exact_status)})
    if status is None:
        return None
    status = OrderStatus(status)
    return OPEN_ORDER_STATUSES if status is OrderStatus.OPEN else frozenset({status})


async def _order_entries(
    redis: Any,
    user_id: str,
    exchange: Exchange | str | None,
    statuses: frozenset[OrderStatus] | None,
    symbol: str | None,
) -> list[tuple[dict[str, str], Order]]:
    exchanges = [Exchange(exchange)] if exchange is not None else list(Exchange)
    pipe = redis.pipeline(transaction=False)
    for ex in exchanges:
        pipe.smembers(keys.user_orders(user_id, ex))
    members = sorted({text(i) for found in await pipe.execute() for i in found})
    ids = [i for i in members if RULES["uuid"].matches(i)]
    if len(ids) < len(members):
        log.warning(
            "order ids that are not ledger ids, skipped", user_id=user_id, ids=sorted(set(members) - set(ids))[:10]
        )
    order_keys = [keys.order_key(i) for i in ids]
    found = zip(ids, order_keys, await _hashes(redis, order_keys), strict=True)
    read = [(fields, _readable(key, fields, Order.from_live, order_id)) for order_id, key, fields in found if fields]
    entries = [
        (fields, order)
        for fields, order in read
        if order is not None
        and order.user_id == user_id
        and order.exchange in exchanges
        and (statuses is None or order.status in statuses)
        and (symbol is None or order.symbol == symbol)
    ]
    return sorted(entries, key=lambda e: (e[1].created_at or EPOCH, str(e[1].id)), reverse=True)


async def order_hashes(
    redis: Any,
    user_id: str,
    exchange: Exchange | str | None = None,
    status: OrderStatus | str | None = None,
    symbol: str | None = None,
    *,
    exact_status: OrderStatus | str | None = None,
) -> list[dict[str, str]]:
    """The live hashes of a user's orders (one exchange or all), newest first, filtered as
    ``order_statuses`` says.

    Final orders stay readable for their TTL; an id whose hash has expired is skipped (the live
    projection removes it from the user's set).
    """
    statuses = order_statuses(status, exact_status)
    return [fields for fields, _ in await _order_entries(redis, user_id, exchange, statuses, symbol)]


async def get_orders(
    redis: Any,
    user_id: str,
    exchange: Exchange | str,
    status: OrderStatus | str | None = None,
    *,
    exact_status: OrderStatus | str | None = None,
) -> list[Order]:
    """Orders of a user on an exchange, newest first; ``status=OPEN`` means not yet final and
    ``exact_status`` keeps one status only (see ``order_statuses``)."""
    statuses = order_statuses(status, exact_status)
    return [order for _, order in await _order_entries(redis, user_id, exchange, statuses, None)]


async def open_order_ids(redis: Any, exchange: Exchange | str, symbol: str) -> set[str]:
    return {text(i) for i in await redis.smembers(keys.open_orders(Exchange(exchange), symbol))}


async def projected_up_to(redis: Any, shard: int) -> str | None:
    """The id of the last event the live projection applied on a shard."""
    value = await redis.get(keys.ShardKeys(shard).checkpoint)
    return text(value) if value else None
