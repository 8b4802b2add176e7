"""The compact snapshots compaction wrote before final orders and closed positions left Redis
for PostgreSQL (the archived aggregates' index): a ledger upgraded from then may still hold some
until its next retention pass moves them, so the decider must decide against them exactly as
against the full state. Tests build them here; the ledger no longer writes them."""

from __future__ import annotations

from ledger.domain.state import OrderState, PositionState
from ledger.store.eventstore import ORDER_SNAPSHOT, POSITION_SNAPSHOT
from projections.compact import COMPACTED

# What the decider (ledger/decider.py) reads of a final order: its owner and market
# (``requirements``, ``_owned_order``), the status and venue id every transition tests
# (``_transition``, ``_decide_accepted``), the fill ids a duplicate fill is refused by, and all a
# late fill is computed from (``_decide_fill``, ``_Fill``: side, quantity, what is filled, how
# the fill is routed to positions and what a position it opens takes from the order). The order
# type is not read but the state requires it. ``metadata`` is read only for an ``open`` intent.
ORDER_KEPT = (
    "id",
    "user_id",
    "exchange",
    "symbol",
    "side",
    "order_type",
    "quantity",
    "position_side",
    "reduce_only",
    "leverage",
    "position_id",
    "intent",
    "stop_loss",
    "take_profit",
    "close_reason",
    "metadata",
    "status",
    "exchange_order_id",
    "filled_qty",
    "fill_basis",
    "fill_ids",
    "version",
)
# What it reads of a position that is no longer open: that it exists (a reserved position id is
# reused only when it has no state), whose it is and its status (``_owned_position`` rejects
# every command with it); the market and side are required by the state; the version says which
# event it is the state after.
POSITION_KEPT = ("id", "user_id", "exchange", "symbol", "side", "status", "version")


def compact_order(order: OrderState, now: int) -> bytes:
    """The compact snapshot of a final order (``metadata`` only for an ``open`` intent)."""
    kept = ORDER_KEPT if order.intent == "open" else [n for n in ORDER_KEPT if n != "metadata"]
    return ORDER_SNAPSHOT.encode(order, kept, **{COMPACTED: now})


def compact_position(position: PositionState, now: int) -> bytes:
    """The compact snapshot of a closed or liquidated position."""
    return POSITION_SNAPSHOT.encode(position, POSITION_KEPT, **{COMPACTED: now})
