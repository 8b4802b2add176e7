"""The handler's cheap per-command helpers keep their guarantees: exact decimal arithmetic holds
whether a caller set the context once for many calls or not
(``ledger.domain.values.exact_arithmetic``), and a snapshot leaves out exactly the fields whose
JSON is their default's (``ledger.store.eventstore.SnapshotCodec``)."""

from __future__ import annotations

import json
from decimal import Context, Decimal, getcontext, localcontext
from typing import Any

import msgspec
from hypothesis import given
from hypothesis import strategies as st

from ledger.domain.enums import Exchange, OrderSide, OrderStatus, OrderType, PositionSide
from ledger.domain.state import OrderState, PositionState
from ledger.domain.values import EXACT, exact, exact_arithmetic
from ledger.store.eventstore import ORDER_SNAPSHOT, POSITION_SNAPSHOT

# 28 digits (Python's default context) would round this sum to 1; the exact context keeps it.
TINY = Decimal("0.000000000000000000000000000001")
EXACT_SUM = Decimal("1.000000000000000000000000000001")


@exact
def _add(a: Decimal, b: Decimal) -> tuple[Decimal, Context]:
    return a + b, getcontext()


def test_an_exact_function_is_exact_alone_and_leaves_the_callers_context() -> None:
    before = getcontext()

    total, inside = _add(Decimal(1), TINY)

    assert total == EXACT_SUM
    assert inside is not before
    assert getcontext() is before
    assert Decimal(1) + TINY == Decimal(1)  # the caller's 28 digits are back


def test_a_block_sets_the_exact_context_once_for_every_exact_function_it_calls() -> None:
    before = getcontext()
    with exact_arithmetic():
        block = getcontext()
        assert (block.prec, block.rounding, block.traps) == (EXACT.prec, EXACT.rounding, EXACT.traps)
        first, inside_first = _add(Decimal(1), TINY)
        second, inside_second = _add(first, TINY)
        with exact_arithmetic():
            assert getcontext() is block
        assert Decimal(1) + TINY == EXACT_SUM  # plain arithmetic in the block is exact too

    assert (first, second) == (EXACT_SUM, Decimal("1.000000000000000000000000000002"))
    assert inside_first is block and inside_second is block
    assert getcontext() is before


def test_an_exact_function_inside_another_context_of_the_block_is_still_exact() -> None:
    with exact_arithmetic(), localcontext(prec=5):
        total, inside = _add(Decimal(1), TINY)
        assert getcontext().prec == 5

    assert total == EXACT_SUM
    assert inside.prec == EXACT.prec


# --------------------------------------------------------------------------- snapshots


def _by_definition(state: msgspec.Struct) -> dict[str, Any]:
    """A snapshot's fields by its definition: every field whose JSON differs from its default's."""
    kept = {}
    for info in msgspec.structs.fields(state):
        value = msgspec.json.encode(getattr(state, info.name))
        if info.default is not msgspec.NODEFAULT:
            default = msgspec.json.encode(info.default)
        elif info.default_factory is not msgspec.NODEFAULT:
            default = msgspec.json.encode(info.default_factory())
        else:
            default = None
        if value != default:
            kept[info.name] = json.loads(value)
    return kept


def test_an_order_snapshot_holds_exactly_the_fields_that_differ_from_their_defaults() -> None:
    order = OrderState(
        id="o-1",
        user_id="u",
        exchange=Exchange.OKX,
        symbol="BTC-USDT-SWAP",
        side=OrderSide.BUY,
        order_type=OrderType.LIMIT,
        quantity=Decimal("0.0010"),
        price=Decimal("100"),
        status=OrderStatus.PENDING,  # the default: left out
        filled_qty=Decimal("0.0"),  # equal to the default 0, but not its JSON: kept
        created_at=5,
        updated_at=5,
        version=1,
    )

    assert ORDER_SNAPSHOT.encode(order) == (
        b'{"id":"o-1","user_id":"u","exchange":"okx","symbol":"BTC-USDT-SWAP","side":"buy",'
        b'"order_type":"limit","quantity":"0.0010","price":"100","filled_qty":"0.0",'
        b'"created_at":5,"updated_at":5,"version":1}'
    )
    assert msgspec.json.decode(ORDER_SNAPSHOT.encode(order), type=OrderState) == order
    assert ORDER_SNAPSHOT.encode(order, ["id", "status", "price"], compacted=7) == (
        b'{"id":"o-1","price":"100","compacted":7}'
    )


_decimals = st.sampled_from(["0", "0.0", "-0", "1", "0.10", "12345.678", "1E+3"]).map(Decimal)


@given(
    size=_decimals,
    fees=_decimals,
    exit_price=st.none() | _decimals,
    leverage=st.integers(1, 3),
    other_fees=st.dictionaries(st.sampled_from(["BTC", "USDT"]), _decimals, max_size=2),
    metadata=st.dictionaries(st.sampled_from(["a", "b"]), st.integers(0, 1) | st.none(), max_size=2),
    closed_at=st.none() | st.integers(0, 2),
)
def test_a_position_snapshot_leaves_out_exactly_what_is_its_default(
    size: Decimal,
    fees: Decimal,
    exit_price: Decimal | None,
    leverage: int,
    other_fees: dict[str, Decimal],
    metadata: dict[str, Any],
    closed_at: int | None,
) -> None:
    position = PositionState(
        id="p-1",
        user_id="u",
        exchange=Exchange.BINANCE,
        symbol="BTC/USDT",
        side=PositionSide.LONG,
        size=size,
        fees=fees,
        exit_price=exit_price,
        leverage=leverage,
        other_fees=other_fees,
        metadata=metadata,
        closed_at=closed_at,
    )

    raw = POSITION_SNAPSHOT.encode(position)

    assert json.loads(raw) == _by_definition(position)
    assert msgspec.json.decode(raw, type=PositionState) == position
