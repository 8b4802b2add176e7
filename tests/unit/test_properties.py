"""Properties of the domain over random sessions (hypothesis).

* Replay: the log, written as JSON and read back, rebuilds exactly the states the handler held.
* Invariants: sizes never go negative, versions are gapless, fills are conserved, final orders
  stay final, spot never holds a short.
* PnL does not depend on how a position is closed (CONTRACT §7).
* A flip's fee split sums to the fill's fee exactly.
* The decoders raise ``WireError`` and nothing else on junk.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from decimal import ROUND_HALF_EVEN, Context, Decimal
from fractions import Fraction
from typing import Any

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from ledger.domain import wire
from ledger.domain.decider import Decision
from ledger.domain.enums import FINAL_ORDER_STATUSES, PositionStatus
from ledger.domain.evolution import Latest, evolve
from ledger.domain.instruments import instrument_for
from ledger.domain.state import Book, OrderState
from ledger.venues.markets import instrument_table
from tests.domain_helpers import INVERSE, LINEAR, SPOT, Driver, event_fields, fraction, of_type, replay

PROPERTY = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
CV = Fraction(100)  # contract_value of BTC-USD-SWAP (OKX): 100 USD
TWENTY_EIGHT = Context(prec=28, rounding=ROUND_HALF_EVEN)


def round28(value: Fraction) -> Fraction:
    """``value`` rounded once to 28 significant digits, half-even (CONTRACT §7 divisions)."""
    return Fraction(TWENTY_EIGHT.divide(Decimal(value.numerator), Decimal(value.denominator)))


def decimals(low: str, high: str, places: int = 8) -> st.SearchStrategy[Decimal]:
    """Decimals in [low, high] with at most ``places`` fraction digits, trailing zeros random."""
    scale = 10**places

    def build(units: int, strip: bool) -> Decimal:
        value = Decimal(units).scaleb(-places)  # e.g. "12.50000000"
        return value.normalize() if strip else value  # e.g. "12.5", or "1E+1" for ten

    return st.builds(build, st.integers(int(Decimal(low) * scale), int(Decimal(high) * scale)), st.booleans())


QUANTITY = decimals("0.00000001", "20")
PRICE = decimals("0.5", "150000")
FEE = st.one_of(st.none(), decimals("-0.5", "25"))  # a negative fee is a rebate


# --------------------------------------------------------------------------- random sessions

# Round sizes make fills meet orders and positions often (closes, flips, exact fills); random
# ones cover the rest. A fill quantity of None fills what the order asked for.
ROUND = [Decimal(text) for text in ("0.1", "0.2", "0.3", "0.5", "1")]
SIZE = st.one_of(st.sampled_from(ROUND), st.sampled_from(ROUND), QUANTITY)
FILL = st.tuples(st.one_of(st.none(), SIZE), PRICE, FEE, st.sampled_from([None, None, "USDT", "BTC", "BNB"]))
FILLS = st.lists(FILL, max_size=3)
# Mostly one market per session (drawn once per example), so that orders meet each other.
MARKETS = [LINEAR, INVERSE, SPOT]
SYMBOL = st.one_of(st.shared(st.sampled_from(MARKETS), key="session market"), st.sampled_from(MARKETS))
PLACE = st.tuples(
    st.just("order"),
    SYMBOL,
    st.sampled_from(["buy", "sell"]),
    SIZE,
    st.sampled_from([None, None, None, "long", "short"]),  # mostly one-way: flips happen
    st.sampled_from([False, False, False, True]),  # reduce_only
    FILLS,
)
OPEN = st.tuples(st.just("open"), SYMBOL, st.sampled_from(["long", "short"]), SIZE, FILLS)
CLOSE = st.tuples(st.just("close"), st.integers(0, 7), st.one_of(st.none(), SIZE), FILLS)
OPERATION = st.one_of(
    PLACE,
    PLACE,
    PLACE,
    OPEN,
    CLOSE,
    st.tuples(st.just("liquidate"), st.integers(0, 7), PRICE),
    st.tuples(st.just("cancel"), st.integers(0, 15), st.booleans()),
    st.tuples(st.just("late_fill"), st.integers(0, 15), FILL),
)
SESSION = st.lists(OPERATION, min_size=2, max_size=20)


def run_session(operations: list[tuple[Any, ...]]) -> Driver:
    """Play a random session; commands the ledger refuses are simply refused."""
    driver = Driver()
    orders: list[str] = []

    def fills(order_id: str | None, items: list[tuple[Any, ...]]) -> None:
        for quantity, price, fee, currency in items:
            if order_id is not None:
                quantity = quantity or driver.order(order_id).quantity
                if _coin_moved(driver.order(order_id), quantity, fee, currency) <= 0:
                    continue  # a spot fee in the coin that leaves nothing to move: refused (test_fees)
                driver.fill(order_id, quantity, price, fee=fee, fee_currency=currency)

    def placed(decision: object) -> str | None:
        if isinstance(decision, Decision) and decision.order_id is not None:
            orders.append(decision.order_id)
            return decision.order_id
        return None

    for operation in operations:
        kind = operation[0]
        if kind == "order":
            _, symbol, side, quantity, position_side, reduce_only, items = operation
            decision = driver.send(
                "place_order",
                exchange="okx",
                symbol=symbol,
                side=side,
                order_type="market",
                quantity=quantity,
                position_side=position_side,
                reduce_only=reduce_only,
            )
            fills(placed(decision), items)
        elif kind == "open":
            _, symbol, side, size, items = operation
            decision = driver.send("open_position", exchange="okx", symbol=symbol, side=side, size=size, leverage=3)
            fills(placed(decision), items)
        elif kind in ("close", "liquidate"):
            open_ids = sorted(p.id for p in driver.store.positions.values() if p and p.is_open)
            if not open_ids:
                continue
            position_id = open_ids[operation[1] % len(open_ids)]
            if kind == "close":
                decision = driver.send("close_position", position_id=position_id, size=operation[2])
                fills(placed(decision), operation[3])
            else:
                driver.send("liquidate_position", position_id=position_id, price=operation[2])
        elif orders and kind == "cancel":
            order_id = orders[operation[1] % len(orders)]
            driver.send("cancel_order", order_id=order_id)
            if operation[2]:
                driver.send("order_cancelled", order_id=order_id)
        elif orders and kind == "late_fill":
            fills(orders[operation[1] % len(orders)], [operation[2]])
    return driver


def _coin_moved(order: OrderState, quantity: Decimal, fee: Decimal | None, currency: str | None) -> Decimal:
    """What a fill moves in or out of positions: its quantity, except on spot with a fee in the
    coin (CONTRACT §7 refined for spot, README): a buy moves quantity - fee, a sell quantity + fee."""
    instrument = instrument_for(order.exchange, order.symbol, instrument_table())
    if not instrument.pays_in_base(currency):
        return quantity
    return quantity - (fee or 0) if order.side == "buy" else quantity + (fee or 0)


Snapshot = tuple[dict[str, Any], dict[str, Any], dict[str, Any]]


def _snapshot(book: Book) -> Snapshot:
    # Aggregates are replaced, never mutated, by evolve: shallow copies are true snapshots.
    return dict(book.orders), dict(book.positions), dict(book.slots)


def _replay_from_json(driver: Driver) -> list[Snapshot]:
    """Rebuild from the log as written (JSON), batch by batch; snapshot after each batch."""
    book = Book()
    snapshots: list[Snapshot] = []
    for batch in driver.batches:
        read = [wire.decode_event(**_stream_entry(event)) for event in batch]
        evolve(book, read)
        snapshots.append(_snapshot(book))
    return snapshots


def _stream_entry(event: wire.Event) -> dict[str, Any]:
    fields = event_fields(event)
    return {"type_name": fields["type"], "raw": fields["data"]}


@PROPERTY
@given(SESSION)
def test_replaying_the_log_rebuilds_exactly_the_states_the_handler_held(
    operations: list[tuple[Any, ...]],
) -> None:
    live = Driver()
    snapshots = []
    # Re-run the session step by step to snapshot the handler's store after every batch.
    driver = run_session(operations)
    for batch in driver.batches:
        evolve(live.store, batch)
        snapshots.append(_snapshot(live.store))

    first = _replay_from_json(driver)
    second = _replay_from_json(driver)

    assert first == snapshots
    assert second == first
    assert _snapshot(replay(driver.log)) == _snapshot(driver.store)


@PROPERTY
@given(SESSION, st.integers(0, 80), st.integers(1, 9))
def test_replay_fold_gives_the_states_evolve_gives_at_every_prefix(
    operations: list[tuple[Any, ...]], cut: int, page: int
) -> None:
    """``ledger replay``'s fold (``Latest``: orders applied, each position's last event made a
    state at the end) over the log read back from JSON, in pages, equals ``evolve``'s book less
    its placeholders, for any prefix of a varied log."""
    log = [wire.decode_event(**_stream_entry(event)) for event in run_session(operations).log][:cut]
    book = Book()
    evolve(book, log)
    latest = Latest()
    for start in range(0, len(log), page):
        latest.fold(log[start : start + page])

    assert latest.orders == {k: v for k, v in book.orders.items() if v is not None}
    positions = latest.positions()
    assert {p.id: p for p in positions} == {k: v for k, v in book.positions.items() if v is not None}
    assert len(positions) == len({p.id for p in positions})


@PROPERTY
@given(SESSION)
def test_the_same_commands_decide_the_same_log(operations: list[tuple[Any, ...]]) -> None:
    first, second = run_session(operations), run_session(operations)

    assert [wire.encode(e) for e in first.log] == [wire.encode(e) for e in second.log]


@PROPERTY
@given(SESSION)
@example(  # spot: hold 1 BTC, a sell of 1 overfilled to 1.5 must not open a 0.5 short
    [
        ("order", SPOT, "buy", Decimal("1"), None, False, [(None, Decimal("50000"), None, None)]),
        ("order", SPOT, "sell", Decimal("1"), None, False, [(Decimal("1.5"), Decimal("1"), None, None)]),
    ]
)
def test_sizes_never_go_negative(operations: list[tuple[Any, ...]]) -> None:
    driver = run_session(operations)

    for event in driver.log:
        if isinstance(event, wire.PositionEvent):
            assert Decimal(event.size) >= 0, event
            assert Decimal(event.excess_qty) >= 0, event
    for position_id, position in driver.store.positions.items():
        if position is None:  # an id an unfilled entry order reserved: it has no state yet
            assert position_id in driver.store.slots.values()
            continue
        assert position.size >= 0
        assert fraction(position.size) == fraction(position.entry_qty) - fraction(position.exit_qty)
        assert (position.size > 0) == (position.status is PositionStatus.OPEN)
        assert fraction(position.realized_pnl) == (fraction(position.gross_pnl) - fraction(position.fees))
        if instrument_for(position.exchange, position.symbol, instrument_table()).kind == "spot":
            assert position.side == "long", "spot has no short side"
    for order in driver.store.orders.values():
        assert order is not None and order.filled_qty >= 0 and order.remaining_qty >= 0


@PROPERTY
@given(SESSION)
def test_versions_are_gapless_per_aggregate(operations: list[tuple[Any, ...]]) -> None:
    driver = run_session(operations)
    versions: dict[str, list[int]] = {}
    for event in driver.log:
        versions.setdefault(event.stream, []).append(event.version)

    for stream, seen in versions.items():
        assert seen == list(range(1, len(seen) + 1)), stream


@PROPERTY
@given(SESSION)
def test_every_filled_quantity_lands_somewhere(operations: list[tuple[Any, ...]]) -> None:
    """A fill's quantity = what moved positions + what no position took + recorded excess
    (on spot with a fee in the coin, the quantity less a buy's fee or plus a sell's)."""
    driver = run_session(operations)
    latest: dict[str, wire.PositionEvent] = {}
    for batch in driver.batches:
        filled = of_type(batch, wire.OrderFilled)
        moved = Fraction(0)  # exact sums (the default decimal context rounds to 28 digits)
        for event in batch:
            if isinstance(event, wire.PositionEvent):
                before = latest.get(event.stream)
                excess_before = fraction(before.excess_qty) if before else Fraction(0)
                moved += fraction(event.change_qty) + fraction(event.excess_qty) - excess_before
                latest[event.stream] = event
        if filled:
            [fill] = filled
            fee, currency = Decimal(fill.fee), fill.fee_currency
            expected = _coin_moved(driver.order(fill.stream), Decimal(fill.quantity), fee, currency)
            assert moved + fraction(fill.unapplied_qty) == fraction(expected)
            assert fill.position_ids == [e.stream for e in batch if isinstance(e, wire.PositionEvent)]


@PROPERTY
@given(SESSION)
def test_a_final_order_status_never_changes(operations: list[tuple[Any, ...]]) -> None:
    driver = run_session(operations)
    final: dict[str, str] = {}
    for event in driver.log:
        status = getattr(event, "status", None)
        if isinstance(event, wire.PositionEvent) or status is None:
            continue
        if event.stream in final:
            assert status == final[event.stream], event
        elif status in FINAL_ORDER_STATUSES:
            final[event.stream] = status


# --------------------------------------------------------------------------- path independence


@dataclass
class RoundTrip:
    side: str
    entries: list[tuple[Decimal, Decimal]]  # (quantity, price) of the opening fills
    exits: list[tuple[Decimal, Decimal]]  # (quantity, price) of the reducing fills
    one_order: bool  # every exit a fill of one close order, or one close order each


@st.composite
def round_trips(draw: st.DrawFn) -> RoundTrip:
    unit = Decimal("0.00000001")
    entry_units = draw(st.lists(st.integers(1, 2 * 10**9), min_size=1, max_size=4))
    total = sum(entry_units)
    cuts = draw(
        st.lists(st.integers(1, total - 1), unique=True, max_size=min(4, total - 1)) if total > 1 else st.just([])
    )
    bounds = [0, *sorted(cuts), total]
    exit_units = [b - a for a, b in zip(bounds, bounds[1:], strict=False)]
    return RoundTrip(
        side=draw(st.sampled_from(["long", "short"])),
        entries=[(u * unit, draw(PRICE)) for u in entry_units],
        exits=[(u * unit, draw(PRICE)) for u in exit_units],
        one_order=draw(st.booleans()),
    )


def _close_round_trip(trip: RoundTrip, symbol: str) -> tuple[Driver, str]:
    driver = Driver()
    size = sum((q for q, _ in trip.entries), Decimal(0))
    order_id, position_id = driver.open_position(trip.side, size, symbol=symbol)
    for quantity, price in trip.entries:
        driver.fill(order_id, quantity, price)
    close_order = driver.close(position_id) if trip.one_order else None
    for quantity, price in trip.exits:
        driver.fill(close_order or driver.close(position_id, quantity), quantity, price)
    position = driver.position(position_id)
    assert position.status is PositionStatus.CLOSED and position.size == 0
    return driver, position_id


# Tolerance. Sums and products are exact, but each average (entry, exit) and each inverse PnL
# leg is one division rounded to 28 significant digits: off by at most half a unit in the 28th
# digit, a relative 5e-28. Such an error reaches the PnL multiplied by the position's notional,
# so the paths may differ by ~1e-27 of the notional value. 1e-20 of the notional leaves a wide
# margin and still catches any real mistake (a lost fill or a wrong weight moves the result by
# at least 1e-8 of the notional, the inputs having 8 fraction digits).
RELATIVE = Fraction(1, 10**20)


@PROPERTY
@given(round_trips())
@example(  # entry (0.1*45000 + 0.1*46000)/0.2 = 45500; exit (0.05*47000 + 0.15*44000)/0.2 = 44750
    RoundTrip(
        "long",
        [(Decimal("0.1"), Decimal("45000")), (Decimal("0.1"), Decimal("46000"))],
        [(Decimal("0.05"), Decimal("47000")), (Decimal("0.15"), Decimal("44000"))],
        one_order=False,
    )
)
def test_linear_pnl_does_not_depend_on_how_the_position_is_closed(trip: RoundTrip) -> None:
    driver, position_id = _close_round_trip(trip, LINEAR)
    position = driver.position(position_id)
    sign = 1 if trip.side == "long" else -1
    quantity = sum((fraction(q) for q, _ in trip.entries), Fraction(0))
    exit_avg = sum(fraction(q) * fraction(p) for q, p in trip.exits) / quantity  # exact

    entry = fraction(position.entry_price)
    assert entry == round28(sum(fraction(q) * fraction(p) for q, p in trip.entries) / quantity)
    gross = fraction(position.gross_pnl)
    # Exact: each leg is (p - entry) * q with exact products and sums ...
    assert gross == sign * sum((fraction(p) - entry) * fraction(q) for q, p in trip.exits)
    # ... so it equals one close of everything at the exact quantity-weighted exit price.
    assert gross == sign * (exit_avg - entry) * quantity
    # The reported exit price is that average rounded to 28 digits; closing everything at it
    # gives the same PnL within the rounding of that one division, exactly when it divides.
    exit_price = fraction(position.exit_price)  # type: ignore[arg-type]
    assert exit_price == round28(exit_avg)
    at_reported_exit = sign * (exit_price - entry) * quantity
    if exit_price == exit_avg:
        assert gross == at_reported_exit
    else:
        assert abs(gross - at_reported_exit) <= RELATIVE * quantity * exit_avg
    assert position.realized_pnl == position.gross_pnl  # no fees in this property


@PROPERTY
@given(round_trips())
@example(  # entry 10 / (4/40000 + 6/60000) = 50000; legs 10*100*(1/50000 - 1/62500) = 0.004
    RoundTrip(
        "long",
        [(Decimal("4"), Decimal("40000")), (Decimal("6"), Decimal("60000"))],
        [(Decimal("5"), Decimal("62500")), (Decimal("5"), Decimal("62500"))],
        one_order=True,
    )
)
def test_inverse_pnl_does_not_depend_on_how_the_position_is_closed(trip: RoundTrip) -> None:
    driver, position_id = _close_round_trip(trip, INVERSE)
    position = driver.position(position_id)
    sign = 1 if trip.side == "long" else -1
    quantity = sum((fraction(q) for q, _ in trip.entries), Fraction(0))

    # entry: sum(q) / sum(q / p), each q / p and the quotient rounded to 28 digits
    entry_basis = sum(round28(fraction(q) / fraction(p)) for q, p in trip.entries)
    entry = fraction(position.entry_price)
    assert entry == round28(quantity / entry_basis)
    # each leg: q * 100 * (1/entry - 1/p) = q * 100 * (p - entry) / (entry * p), one rounding
    legs = [
        fraction(event.change_pnl)
        for event in driver.log
        if isinstance(event, wire.PositionReduced | wire.PositionClosed)
    ]
    exact_legs = [sign * fraction(q) * CV * (fraction(p) - entry) / (entry * fraction(p)) for q, p in trip.exits]
    assert legs == [round28(leg) for leg in exact_legs]
    gross = fraction(position.gross_pnl)
    assert gross == sum(legs)  # the sum itself is exact
    # One close of everything at the exact harmonic exit price gives the exact sum of the legs;
    # the ledger's legs are each off by one rounding at most.
    harmonic_exit = quantity / sum(fraction(q) / fraction(p) for q, p in trip.exits)
    at_exact_exit = sign * quantity * CV * (1 / entry - 1 / harmonic_exit)
    assert at_exact_exit == sum(exact_legs)
    notional = quantity * CV / min(entry, harmonic_exit)  # in BTC
    if legs == exact_legs:
        assert gross == at_exact_exit
    else:
        assert abs(gross - at_exact_exit) <= RELATIVE * notional
    # The reported exit price is the harmonic mean, computed like the entry.
    exit_price = fraction(position.exit_price)  # type: ignore[arg-type]
    exit_basis = sum(round28(fraction(q) / fraction(p)) for q, p in trip.exits)
    assert exit_price == round28(quantity / exit_basis)
    assert abs(exit_price - harmonic_exit) <= RELATIVE * harmonic_exit
    at_reported_exit = sign * quantity * CV * (1 / entry - 1 / exit_price)
    assert abs(gross - at_reported_exit) <= RELATIVE * notional


# --------------------------------------------------------------------------- flip fee split

# Fees with up to 18 fraction digits (the most NUMERIC(38, 18) holds) and up to 20 integer ones.
BIG_FEE = st.builds(
    lambda units, places: Decimal(units).scaleb(-places),
    st.integers(0, 10**24),
    st.integers(0, 18),
).filter(lambda fee: fee < Decimal(10) ** 20)


@PROPERTY
@given(
    symbol=st.sampled_from([LINEAR, INVERSE]),
    held=QUANTITY,
    rest=QUANTITY,
    entry=PRICE,
    price=PRICE,
    fee=BIG_FEE,
)
@example(  # 0.6 * 0.1 / 0.3 = 0.2 closes the long; 0.6 - 0.2 = 0.4 opens the short
    symbol=LINEAR,
    held=Decimal("0.1"),
    rest=Decimal("0.2"),
    entry=Decimal("50000"),
    price=Decimal("51000"),
    fee=Decimal("0.6"),
)
@example(  # a tiny closing share: 1 * 0.00000001 / 3 = 3.333...E-9 (28 digits), rest 0.99999...
    symbol=LINEAR,
    held=Decimal("0.00000001"),
    rest=Decimal("2.99999999"),
    entry=Decimal("1"),
    price=Decimal("1"),
    fee=Decimal("1"),
)
def test_a_flip_splits_its_fee_exactly(
    symbol: str, held: Decimal, rest: Decimal, entry: Decimal, price: Decimal, fee: Decimal
) -> None:
    driver = Driver()
    driver.fill(driver.place("buy", held, symbol=symbol), held, entry)
    whole = held + rest
    decision = driver.fill(driver.place("sell", whole, symbol=symbol), whole, price, fee=fee)

    [closed] = of_type(decision.events, wire.PositionClosed)
    [opened] = of_type(decision.events, wire.PositionOpened)
    closing_fee, opening_fee = fraction(closed.change_fee), fraction(opened.change_fee)
    assert closing_fee + opening_fee == fraction(fee)  # exact rational sum
    assert closing_fee == round28(fraction(fee) * fraction(held) / fraction(whole))
    assert (Decimal(closed.change_qty), Decimal(opened.change_qty)) == (held, rest)
    assert fraction(opened.fees) == opening_fee and fraction(closed.fees) == closing_fee
    assert opened.side == "short" and opened.stream != closed.stream


# --------------------------------------------------------------------------- decoder fuzzing

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner),
    max_leaves=12,
)
FIELD_NAMES = st.sampled_from(
    ["command_id", "user_id", "order_id", "position_id", "exchange", "symbol", "side",
     "order_type", "quantity", "price", "size", "fill_id", "reason", "schema", "metadata"]
)  # fmt: skip
COMMAND_DATA = st.dictionaries(FIELD_NAMES, JSON | st.sampled_from(["okx", "buy", "0.1", "u1"]))
RAW = st.text(max_size=40) | st.binary(max_size=40) | JSON.map(json.dumps) | COMMAND_DATA.map(json.dumps)


@PROPERTY
@given(type_name=st.sampled_from([*wire.COMMAND_TYPES, "nope", ""]) | st.text(max_size=9), raw=RAW)
def test_decode_command_raises_only_wire_errors(type_name: str, raw: str | bytes) -> None:
    try:
        command = wire.decode_command({"type": type_name, "data": raw})
    except wire.WireError as error:
        assert error.code in {"INVALID_JSON", "UNKNOWN_TYPE", "MISSING_FIELD", "INVALID_FIELD"}
    else:
        assert isinstance(command, wire.Command)


@PROPERTY
@given(type_name=st.sampled_from([*wire.EVENT_TYPES, "Nope"]), raw=RAW)
def test_decode_event_raises_only_wire_errors(type_name: str, raw: str | bytes) -> None:
    try:
        event = wire.decode_event(type_name, raw)
    except wire.WireError as error:
        assert error.code in {"INVALID_JSON", "UNKNOWN_TYPE", "MISSING_FIELD", "INVALID_FIELD"}
    else:
        assert isinstance(event, wire.Event)
