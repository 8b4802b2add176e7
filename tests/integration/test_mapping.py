"""One mapping per aggregate (issue 8, item 2): ``ledger.domain.mapping`` between state, live hash,
history row and model.

Round trips (hypothesis): state -> live hash -> model and state -> history row -> model give
the model built from the state, field by field (a field a representation does not carry reads
back as the state's default); the history row goes through a real PostgreSQL, written by the
projector's upsert and read by the history query. Coverage: every column of ``schema.sql``'s
``positions`` and ``orders`` (as PostgreSQL reports them) and every live field of CONTRACT §6
(and the pinned extras) is produced by the mapping; the live projection's incremental order
updates agree with the state the events fold into.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from decimal import Decimal
from typing import Any

import msgspec
import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg.rows import dict_row

from ledger.app.console import ORDER_COLUMNS, POSITION_COLUMNS
from ledger.client.models import Order, Position
from ledger.domain import wire
from ledger.domain.enums import (
    FINAL_ORDER_STATUSES,
    Exchange,
    OrderSide,
    OrderStatus,
    OrderType,
    PositionSide,
    PositionStatus,
)
from ledger.domain.evolution import apply
from ledger.domain.mapping import BOOL, DECIMAL, ORDER, POSITION, AggregateMapping, In, order_changes
from ledger.domain.state import OrderState, PositionState
from ledger.domain.values import ms_to_datetime
from ledger.sqlfiles import load_queries
from projections.projector import batch_rows
from tests.domain_helpers import Driver
from tests.live_helpers import ORDER_EXTRA, ORDER_FIELDS, POSITION_EXTRA, POSITION_FIELDS

PLAIN_DECIMAL = re.compile(r"-?[0-9]+(\.[0-9]+)?")
ROUND_TRIP = settings(max_examples=100, deadline=None)
THROUGH_POSTGRES = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

# CONTRACT §6, in its order (the CLI's --json columns follow it).
SIX_POSITION = (
    "id", "user_id", "exchange", "symbol", "side", "size", "entry_price", "leverage", "realized_pnl", "fees",
    "status", "stop_loss", "take_profit", "created_at", "updated_at", "version",
)  # fmt: skip
SIX_ORDER = (
    "id", "user_id", "exchange", "symbol", "side", "order_type", "quantity", "price", "filled_qty",
    "avg_fill_price", "status", "exchange_order_id", "client_order_id", "position_side", "reduce_only",
    "grid_level", "created_at", "updated_at", "version",
)  # fmt: skip


# --------------------------------------------------------------------------- strategies

ids = st.uuids().map(str)
users = st.from_regex(r"\A[A-Za-z0-9_.@-]{1,64}\Z")
symbols = st.sampled_from(["BTC-USDT-SWAP", "BTC/USDT:USDT", "BTC-USD-SWAP", "BTC/USD:BTC", "KRW-BTC", "ETH/USDT"])
millis = st.integers(min_value=0, max_value=253402300799999)


def amounts(*, positive: bool = False, signed: bool = False) -> st.SearchStrategy[Decimal]:
    """Decimals as the ledger holds them: up to 20 integer and 28 significant digits, any
    exponent (``1E+2`` must still be written ``100``)."""
    low = Decimal("-1e20") + 1 if signed else Decimal("1e-18") if positive else Decimal(0)
    plain = st.decimals(min_value=low, max_value=Decimal("1e20") - 1, allow_nan=False, allow_infinity=False)
    return st.one_of(plain, plain.map(Decimal.normalize))


reasons = st.from_regex(r"\A[ -~]{1,64}\Z")
json_values = st.one_of(st.none(), st.booleans(), st.integers(-(10**9), 10**9), st.text("abcxyz €", max_size=8))


def metadata(reserved: AggregateMapping) -> st.SearchStrategy[dict[str, Any]]:
    """A metadata object whose keys are none of the names the history row nests into it."""
    nested = {f.name for f in reserved.fields if f.has(In.META)}
    keys = st.text("abcdefghijk_", min_size=1, max_size=10).filter(lambda k: k not in nested)
    return st.dictionaries(keys, json_values, max_size=4)


@st.composite
def positions(draw: st.DrawFn, *, closed: bool) -> PositionState:
    """A position as the decider leaves it: open (its live hash) or closed (its history row)."""
    created = draw(millis)
    entry_qty = draw(amounts(positive=True))
    status = (
        draw(st.sampled_from([PositionStatus.CLOSED, PositionStatus.LIQUIDATED])) if closed else PositionStatus.OPEN
    )
    return PositionState(
        id=draw(ids),
        user_id=draw(users),
        exchange=draw(st.sampled_from(list(Exchange))),
        symbol=draw(symbols),
        side=draw(st.sampled_from(list(PositionSide))),
        status=status,
        size=Decimal(0) if closed else draw(amounts()),
        entry_price=draw(amounts(positive=True)),
        exit_price=draw(st.none() | amounts(positive=True)),
        leverage=draw(st.integers(1, 1000)),
        entry_qty=entry_qty,
        entry_basis=draw(amounts()),
        exit_qty=draw(amounts()),
        exit_basis=draw(amounts()),
        gross_pnl=draw(amounts(signed=True)),
        fees=draw(amounts(signed=True)),
        other_fees=draw(st.dictionaries(st.sampled_from(["BNB", "OKB", "USDC"]), amounts(signed=True), max_size=2)),
        realized_pnl=draw(amounts(signed=True)),
        excess_qty=draw(amounts()),
        stop_loss=draw(st.none() | amounts(positive=True)),
        take_profit=draw(st.none() | amounts(positive=True)),
        close_reason=draw(reasons) if closed else None,
        metadata=draw(metadata(POSITION)),
        created_at=created,
        updated_at=draw(st.integers(created, 253402300799999)),
        closed_at=draw(st.integers(created, 253402300799999)) if closed else None,
        version=draw(st.integers(1, 10**6)),
    )


@st.composite
def orders(draw: st.DrawFn, *, final: bool = False) -> OrderState:
    statuses = sorted(FINAL_ORDER_STATUSES) if final else list(OrderStatus)
    filled = draw(st.just(Decimal(0)) | amounts(positive=True))
    created = draw(millis)
    return OrderState(
        id=draw(ids),
        user_id=draw(users),
        exchange=draw(st.sampled_from(list(Exchange))),
        symbol=draw(symbols),
        side=draw(st.sampled_from(list(OrderSide))),
        order_type=draw(st.sampled_from(list(OrderType))),
        quantity=draw(amounts(positive=True)),
        price=draw(st.none() | amounts(positive=True)),
        trigger_price=draw(st.none() | amounts(positive=True)),
        client_order_id=draw(st.none() | st.from_regex(r"\A[A-Za-z0-9_.:-]{1,64}\Z")),
        position_side=draw(st.none() | st.sampled_from(list(PositionSide))),
        reduce_only=draw(st.booleans()),
        leverage=draw(st.none() | st.integers(1, 1000)),
        grid_level=draw(st.none() | st.integers(0, 100_000)),
        position_id=draw(st.none() | ids),
        intent=draw(st.sampled_from([None, "open", "close"])),
        stop_loss=draw(st.none() | amounts(positive=True)),
        take_profit=draw(st.none() | amounts(positive=True)),
        close_reason=draw(st.none() | reasons),
        metadata=draw(metadata(ORDER)),
        status=draw(st.sampled_from(statuses)),
        exchange_order_id=draw(st.none() | st.from_regex(r"\A[A-Za-z0-9_.:/@-]{1,128}\Z")),
        filled_qty=filled,
        # What avg_fill_price averages over: nothing before a fill.
        fill_basis=Decimal(0) if filled == 0 else draw(amounts(positive=True)),
        avg_fill_price=None if filled == 0 else draw(amounts(positive=True)),
        fill_ids=draw(st.lists(st.text("abc123", min_size=1), max_size=3)),
        reject_reason=draw(st.none() | st.from_regex(r"\A[ -~]{1,256}\Z")),
        created_at=created,
        updated_at=draw(st.integers(created, 253402300799999)),
        version=draw(st.integers(1, 10**6)),
    )


# --------------------------------------------------------------------------- checks


def carried(mapping: AggregateMapping, where: In) -> set[str]:
    return {f.name for f in mapping.fields if f.where & where}


def state_value(value: Any, name: str) -> Any:
    """A state value as the model holds it (timestamps as datetimes)."""
    if name.endswith("_at") and value is not None:
        return ms_to_datetime(value)
    return value


def assert_model_mirrors(model: Position | Order, mapping: AggregateMapping, state: msgspec.Struct) -> None:
    """The model built from the state holds every model field of the state, as it is."""
    for name in mapping.model_fields:
        assert getattr(model, name) == state_value(getattr(state, name), name), name


def assert_read_back(
    via: Position | Order, direct: Position | Order, mapping: AggregateMapping, fields: set[str]
) -> None:
    """Field by field: what the representation carries equals the model of the state; what it
    does not carry is the state's default."""
    for name in mapping.model_fields:
        expected = getattr(direct, name) if name in fields else state_value(mapping.default(name), name)
        assert getattr(via, name) == expected, name


def assert_live_text(mapping: AggregateMapping, fields: dict[str, str]) -> None:
    """CONTRACT §1 and §6: strings; decimals without exponent; booleans as words."""
    assert all(isinstance(value, str) for value in fields.values())
    for f in mapping.fields:
        for name in f.live:
            if f.codec is DECIMAL:
                assert fields[name] == "" or PLAIN_DECIMAL.fullmatch(fields[name]), (name, fields[name])
            elif f.codec is BOOL:
                assert fields[name] in ("true", "false"), name


# --------------------------------------------------------------------------- round trips (no server)


@ROUND_TRIP
@given(positions(closed=False))
def test_a_position_reads_back_from_its_live_hash_as_the_model_of_its_state(state: PositionState) -> None:
    fields = POSITION.to_live(POSITION.values(state))
    assert set(fields) == set(POSITION.live_fields)
    assert_live_text(POSITION, fields)
    assert fields["pnl"] == fields["realized_pnl"]
    direct = Position.from_state(state)
    assert_model_mirrors(direct, POSITION, state)
    via = Position.from_live(fields)
    assert_read_back(via, direct, POSITION, carried(POSITION, In.LIVE))
    assert via == direct  # an open position has no close reason nor closed_at: nothing is lost


@ROUND_TRIP
@given(positions(closed=True))
def test_a_closed_position_reads_back_from_its_history_row_as_the_model_of_its_state(state: PositionState) -> None:
    row = POSITION.to_row(POSITION.values(state))
    assert set(row) == set(POSITION.columns)
    assert row["size"] == state.entry_qty and row["unrealized_pnl"] == 0
    direct = Position.from_state(state)
    via = Position.from_row(row)
    assert_read_back(via, direct, POSITION, carried(POSITION, In.ROW | In.META))
    assert via == direct  # a closed position's open size is 0: nothing is lost


@ROUND_TRIP
@given(orders())
def test_an_order_reads_back_from_its_live_hash_as_the_model_of_its_state(state: OrderState) -> None:
    fields = ORDER.to_live(ORDER.values(state))
    assert set(fields) == set(ORDER.live_fields)
    assert_live_text(ORDER, fields)
    direct = Order.from_state(state)
    assert_model_mirrors(direct, ORDER, state)
    via = Order.from_live(fields)
    assert_read_back(via, direct, ORDER, carried(ORDER, In.LIVE))
    assert via == direct


@ROUND_TRIP
@given(orders(final=True))
def test_an_order_reads_back_from_its_history_row_as_the_model_of_its_state(state: OrderState) -> None:
    row = ORDER.to_row(ORDER.values(state))
    assert set(row) == set(ORDER.columns)
    direct = Order.from_state(state)
    via = Order.from_row(row)
    # The row holds the average, not the running sum it averages over.
    assert_read_back(via, direct, ORDER, carried(ORDER, In.ROW | In.META))
    assert via.avg_fill_price == state.avg_fill_price
    values = ORDER.from_row(row)
    for name in ("intent", "close_reason", "stop_loss", "take_profit", "leverage"):
        assert values[name] == getattr(state, name), name  # nested in metadata, read back


def test_a_state_field_nobody_declared_is_refused() -> None:
    fields = tuple(f for f in POSITION.fields if f.name != "excess_qty")
    with pytest.raises(TypeError, match="state fields not declared {'excess_qty'}"):
        AggregateMapping("position", PositionState, fields)


def test_a_hash_of_another_program_is_no_ledger_hash() -> None:
    with pytest.raises(KeyError, match="'id'"):
        POSITION.from_live({"size": "1", "side": "short", "status": "open"})
    order = ORDER.to_live(ORDER.values(ORDER_EXAMPLE))
    for name, junk in (("version", "x"), ("quantity", "abc"), ("status", "done"), ("metadata", "[1]")):
        with pytest.raises(ValueError):
            ORDER.from_live({**order, name: junk})
    # Optional fields left empty read as the state's defaults.
    values = ORDER.from_live({**order, "leverage": "", "filled_qty": "", "metadata": ""})
    assert (values["leverage"], values["filled_qty"], values["metadata"]) == (None, 0, {})


ORDER_EXAMPLE = OrderState(
    id="0b9e2f4c-6a53-4a0c-9d55-2f3f4e5a6b7c",
    user_id="u1",
    exchange=Exchange.OKX,
    symbol="BTC-USDT-SWAP",
    side=OrderSide.BUY,
    order_type=OrderType.LIMIT,
    quantity=Decimal("0.10"),
    price=Decimal("1E+5"),
    stop_loss=Decimal("0.0000001"),
    leverage=5,
    intent="open",
    created_at=1,
    updated_at=2,
    version=3,
)


def test_values_are_written_exactly_in_every_representation() -> None:
    live = ORDER.to_live(ORDER.values(ORDER_EXAMPLE))
    assert {name: live[name] for name in ("quantity", "price", "filled_qty", "avg_fill_price", "reduce_only")} == {
        "quantity": "0.10",
        "price": "100000",
        "filled_qty": "0",
        "avg_fill_price": "",
        "reduce_only": "false",
    }
    row = ORDER.to_row(ORDER.values(ORDER_EXAMPLE))
    assert row["metadata"] == {"leverage": 5, "intent": "open", "stop_loss": "0.0000001"}  # None left out
    assert (row["created_at"], row["exchange"], row["position_side"]) == (ms_to_datetime(1), "okx", None)
    bare = PositionState(id="p", user_id="u", exchange=Exchange.OKX, symbol="S", side=PositionSide.LONG)
    position = POSITION.to_row(POSITION.values(bare))
    assert {k: position["metadata"][k] for k in ("stop_loss", "take_profit", "excess_qty", "other_fees")} == {
        "stop_loss": None,  # positions keep the key
        "take_profit": None,
        "excess_qty": "0",
        "other_fees": {},
    }


# --------------------------------------------------------------------------- the contract's names


def test_the_mapping_produces_every_live_field_of_contract_section_6() -> None:
    assert POSITION.contract_fields == SIX_POSITION == POSITION_COLUMNS
    assert ORDER.contract_fields == SIX_ORDER == ORDER_COLUMNS
    assert set(POSITION.live_fields) == POSITION_FIELDS | POSITION_EXTRA
    assert set(ORDER.live_fields) == ORDER_FIELDS | ORDER_EXTRA


def test_the_models_show_what_the_state_holds_and_the_contract_exposes() -> None:
    """Every field of the live hash or the history row that is a state value is a model field
    (``avg_fill_price`` included), except the ones the mapping says are not."""
    for mapping, model in ((POSITION, Position), (ORDER, Order)):
        exposed = carried(mapping, In.LIVE | In.ROW)
        assert exposed <= set(model.model_fields) | {"entry_qty"}, mapping.name
        assert set(mapping.model_fields) <= set(model.model_fields)
    assert {"reject_reason", "avg_fill_price"} <= set(Order.model_fields)
    assert {"gross_pnl", "excess_qty", "close_reason"} <= set(Position.model_fields)


def test_order_events_set_in_the_live_hash_what_they_set_in_the_state() -> None:
    """The live projection writes an order's hash once and then only the fields each event
    changes (``order_changes``): the result is the hash of the state the events fold into."""
    driver = Driver()
    filled = driver.place("buy", "0.3", order_type="limit", price="50000")
    driver.ok("order_accepted", order_id=filled, exchange_order_id="v-1")
    driver.fill(filled, "0.1", "49990", fee="0.1")
    driver.fill(filled, "0.2", "49995")
    rejected = driver.place("sell", "1", order_type="limit", price="60000")
    driver.ok("order_rejected", order_id=rejected, reason="insufficient margin")
    cancelled = driver.place("buy", "1", order_type="limit", price="40000", grid_level=2)
    driver.ok("cancel_order", order_id=cancelled)
    driver.ok("order_cancelled", order_id=cancelled)
    expired = driver.place("buy", "1", order_type="limit", price="41000")
    driver.ok("order_expired", order_id=expired)
    hashes: dict[str, dict[str, str]] = {}
    states: dict[str, Any] = {}
    for event in driver.log:
        if isinstance(event, wire.PositionEvent):
            continue
        states[event.stream] = state = apply(states.get(event.stream), event)
        if isinstance(event, wire.OrderPlaced):
            hashes[event.stream] = ORDER.to_live(ORDER.values(state))
        else:
            assert isinstance(event, wire.OrderChange)
            hashes[event.stream].update(ORDER.to_live(order_changes(event)))
        assert hashes[event.stream] == ORDER.to_live(ORDER.values(state)), event.type
    assert [states[i].status for i in (filled, rejected, cancelled, expired)] == [
        OrderStatus.FILLED,
        OrderStatus.REJECTED,
        OrderStatus.CANCELLED,
        OrderStatus.EXPIRED,
    ]
    assert hashes[rejected]["reject_reason"] == "insufficient margin"
    assert Order.from_live(hashes[rejected]).reject_reason == "insufficient margin"


# --------------------------------------------------------------------------- PostgreSQL


def test_the_mapping_produces_every_column_of_the_positions_and_orders_tables(database_url: str) -> None:
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            "SELECT table_name, column_name FROM information_schema.columns"
            " WHERE table_schema = 'public' AND table_name IN ('positions', 'orders')"
        ).fetchall()
    schema = {table: {column for t, column in rows if t == table} for table in ("positions", "orders")}
    assert schema["positions"] == set(POSITION.columns)
    assert schema["orders"] == set(ORDER.columns)
    assert len(POSITION.columns) == len(set(POSITION.columns)) and len(ORDER.columns) == len(set(ORDER.columns))


@pytest.fixture
def history_db(database_url: str) -> Iterator[psycopg.Connection[dict[str, Any]]]:
    with psycopg.connect(database_url, row_factory=dict_row) as conn:
        yield conn


def _through_postgres(
    conn: psycopg.Connection[dict[str, Any]],
    mapping: AggregateMapping,
    state: Any,
    upsert: str,
    read: str,
    params: Callable[[Any], dict[str, Any]],
) -> dict[str, Any]:
    """Write the state's row with the projector's upsert, read it with the history query."""
    projector, history = load_queries("projections", "projector.sql"), load_queries("ledger.client", "history.sql")
    row = mapping.to_row(mapping.values(state))
    with conn.transaction(force_rollback=True):
        conn.execute(mapping.sql(projector[upsert]), batch_rows([row]))
        (found,) = conn.execute(mapping.sql(history[read]), params(state)).fetchall()
    assert set(found) == set(mapping.columns)
    return found


@THROUGH_POSTGRES
@given(state=positions(closed=True))
def test_a_closed_position_comes_back_from_postgresql_as_the_model_of_its_state(
    history_db: psycopg.Connection[dict[str, Any]], state: PositionState
) -> None:
    def params(s: PositionState) -> dict[str, Any]:
        return {"user_id": s.user_id, "exchange": None, "symbol": None, "limit": 10}

    found = _through_postgres(history_db, POSITION, state, "upsert_positions", "closed_positions", params)
    assert Position.from_row(found) == Position.from_state(state)


@THROUGH_POSTGRES
@given(state=orders(final=True))
def test_a_final_order_comes_back_from_postgresql_as_its_state(
    history_db: psycopg.Connection[dict[str, Any]], state: OrderState
) -> None:
    def params(s: OrderState) -> dict[str, Any]:
        return {"user_id": s.user_id, "exchange": None, "status": None, "limit": 10}

    found = _through_postgres(history_db, ORDER, state, "upsert_orders", "final_orders", params)
    via = Order.from_row(found)
    assert_read_back(via, Order.from_state(state), ORDER, carried(ORDER, In.ROW | In.META))
    values = ORDER.from_row(found)
    assert {name: values[name] for name in ("intent", "close_reason", "stop_loss", "take_profit")} == {
        name: getattr(state, name) for name in ("intent", "close_reason", "stop_loss", "take_profit")
    }
