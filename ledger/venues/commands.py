"""The commands a venue's report becomes: one definition for the live venue role
(``consumers.venue``) and reconciliation (``ledger.client.reconcile``).

Every command id is deterministic, so the two (or one of them twice) publishing the same fact
publish the same command, and the handler's deduplication (CONTRACT §3) records it once:
``venue:<order_id>:accept`` / ``:reject`` / ``:cancel`` / ``:expire`` (``ledger.domain.command_ids``),
``venue:<order hex>:fill:<16 hex of SHA-1 of the venue's trade id>``, and for an order the ledger
never placed ``venue:<exchange>:adopt:<16 hex of SHA-1 of the venue's order id>``.
"""

from __future__ import annotations

import hashlib
from decimal import Decimal
from typing import Any

import msgspec

from ledger.domain import wire
from ledger.domain.command_ids import CommandIds
from ledger.domain.enums import Exchange, OrderSide, OrderType
from ledger.domain.values import RULES, ZERO, format_decimal
from ledger.errors import InvalidInput
from ledger.venues.live import CANCELED, EXPIRED, FINAL_STATUSES, REJECTED, VenueFill, VenueOrder

IDS = CommandIds("venue")


def _digest(venue_id: str) -> str:
    return hashlib.sha1(venue_id.encode(), usedforsecurity=False).hexdigest()[:16]


def fill_command_id(order_id: str, fill_id: str) -> str:
    return f"venue:{order_id.replace('-', '')}:fill:{_digest(fill_id)}"


def adopt_id(exchange: Exchange, exchange_order_id: str) -> str:
    return f"venue:{exchange}:adopt:{_digest(exchange_order_id)}"


def accepted(order_id: str, user_id: str, exchange_order_id: str) -> wire.OrderAcceptedCommand:
    return wire.OrderAcceptedCommand(
        command_id=IDS.accept(order_id), user_id=user_id, order_id=order_id, exchange_order_id=exchange_order_id
    )


def cancelled(order_id: str, user_id: str) -> wire.OrderCancelledCommand:
    return wire.OrderCancelledCommand(command_id=IDS.cancel(order_id), user_id=user_id, order_id=order_id)


def rejected(order_id: str, user_id: str, reason: str) -> wire.OrderRejectedCommand:
    return wire.OrderRejectedCommand(command_id=IDS.reject(order_id), user_id=user_id, order_id=order_id, reason=reason)


def fill(order_id: str, user_id: str, trade: VenueFill) -> wire.RecordFill:
    """A trade of the venue as the ledger's fill (the venue's trade id is the ``fill_id``)."""
    return wire.RecordFill(
        command_id=fill_command_id(order_id, trade.fill_id),
        user_id=user_id,
        order_id=order_id,
        fill_id=trade.fill_id,
        quantity=format_decimal(trade.quantity),
        price=format_decimal(trade.price),
        fee=None if trade.fee is None else format_decimal(trade.fee),
        fee_currency=trade.fee_currency,
        ts=trade.ts,
        fee_source=trade.fee_source or msgspec.UNSET,
    )


def final(
    order_id: str, user_id: str, exchange: Exchange, quantity: Decimal, report: VenueOrder
) -> tuple[bool, wire.Command | None]:
    """Whether the venue says the order is final and lists trades for all it filled, and the
    command that ends it in the ledger (None when its fills did): ``canceled`` ->
    ``order_cancelled``, ``rejected`` -> ``order_rejected``, ``expired``, or ``closed`` with less
    traded than the ledger's ``quantity`` (an Upbit market buy) -> ``order_expired``."""
    if report.status not in FINAL_STATUSES or report.traded < report.filled:
        return False, None
    if report.status == CANCELED:
        return True, cancelled(order_id, user_id)
    if report.status == REJECTED:
        return True, rejected(order_id, user_id, f"{exchange} rejected the order after accepting it")
    if report.status == EXPIRED or quantity - report.traded > ZERO:
        return True, wire.OrderExpiredCommand(command_id=IDS.expire(order_id), user_id=user_id, order_id=order_id)
    return True, None


def adopted(user_id: str, exchange: Exchange, symbol: str, report: VenueOrder) -> wire.AdoptOrder:
    """The ``adopt_order`` of a venue order the ledger never placed, from the venue's report
    (``symbol`` as the ledger spells the market). ``InvalidInput`` saying why when the report
    cannot be one: a side or an order type the ledger does not know, no amount, or a value the
    wire rules refuse. The venue's client id is kept when it fits the ledger's client id rule."""
    sides, types = {str(s) for s in OrderSide}, {str(t) for t in OrderType}
    if report.side not in sides or report.order_type not in types:
        raise InvalidInput(
            f"{exchange} reports a {report.order_type} {report.side} order: the ledger adopts "
            f"{', '.join(sorted(types))} orders that buy or sell"
        )
    quantity = report.quantity or (report.filled if report.filled > ZERO else None)
    if quantity is None:
        raise InvalidInput(f"{exchange} reports neither an amount nor a filled quantity for the order")
    command = wire.AdoptOrder(
        command_id=adopt_id(exchange, report.exchange_order_id),
        user_id=user_id,
        exchange=exchange,
        symbol=symbol,
        side=OrderSide(report.side),
        order_type=OrderType(report.order_type),
        quantity=format_decimal(quantity),
        exchange_order_id=report.exchange_order_id,
        price=_positive(report.price),
        trigger_price=_positive(report.trigger_price),
        reduce_only=report.reduce_only,
        venue_client_order_id=report.client_id if RULES["client_order_id"].matches(report.client_id) else None,
    )
    wire.encode_command(command)  # checked against the wire rules: WireError (InvalidInput) names the rule
    return command


def _positive(value: Decimal | None) -> str | None:
    """A venue's price as the ledger keeps it: none for an order without one (Binance writes 0)."""
    return None if value is None or value <= ZERO else format_decimal(value)


def drift_command_id(exchange: Exchange, market: str, kind: str, figures: str) -> str:
    """The id of reconciliation's ``record_drift``: from the market, the kind and the figures
    that differ (``figures``: the venue's and the ledger's, each ledger position with its
    version), so two reconciliations that see the same difference record one drift."""
    digest = hashlib.sha1(f"{exchange}|{market}|{kind}|{figures}".encode(), usedforsecurity=False).hexdigest()
    return f"reconcile:drift:{digest[:32]}"


def record_drift(
    user_id: str, exchange: Exchange, market: str, kind: wire.DriftKind, evidence: dict[str, Any], figures: str
) -> wire.RecordDrift:
    return wire.RecordDrift(
        command_id=drift_command_id(exchange, market, kind, figures),
        user_id=user_id,
        exchange=exchange,
        symbol=market,
        kind=kind,
        evidence=evidence,
    )


def drift_agreed(
    user_id: str, exchange: Exchange, market: str, kind: wire.DriftKind, drift_id: str
) -> wire.ResolveDrift:
    """Reconciliation's ``resolve_drift`` of an open drift once venue and ledger agree again
    (one per drift: a drift is resolved once)."""
    return wire.ResolveDrift(
        command_id=f"reconcile:agreed:{drift_id}",
        user_id=user_id,
        exchange=exchange,
        symbol=market,
        kind=kind,
        reason="reconciliation: the venue and the ledger agree again",
        resolution="agreed",
    )
