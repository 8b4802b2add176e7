"""Fees and contract values on every market (issue 11, item 1), checked against figures by hand.

* Spot fees paid in the bought coin (CONTRACT §7 refined for spot, README): the position holds
  what was received, the order keeps the venue's quantity, the fee counts in ``fees`` at the
  fill's own price, the spot-short check uses the size held.
* Contract values recorded in the events: a position keeps the value it opened at after the
  market data changed; replay agrees.
* Fees a venue omits, computed once (``arithmetic.fill_fee``) for the paper venue and the live
  venue's fills, with the contract size.

Every expected value is exact (``Decimal`` equality); the arithmetic is in the comments.
"""

from __future__ import annotations

import dataclasses
import json
from decimal import Decimal as D
from typing import Any

import msgspec
import pytest

from consumers.paper import paper_fee
from ledger.client.models import Position
from ledger.domain import arithmetic, wire
from ledger.domain.decider import RejectCode
from ledger.domain.enums import Exchange, OrderStatus, PositionSide, PositionStatus
from ledger.domain.evolution import evolve
from ledger.domain.instruments import InstrumentTable
from ledger.domain.state import Book
from ledger.venues import commands
from ledger.venues.live import _fill
from ledger.venues.markets import bundled, instrument_table
from tests.domain_helpers import INVERSE, LINEAR, SPOT, Driver, event_fields, of_type, replay

# --------------------------------------------------------------------------- spot: fee in the bought coin


def _bought_with_coin_fee(driver: Driver) -> tuple[str, str]:
    """Buy 1 BTC at 50000 on OKX spot, the venue keeping 0.001 BTC as its fee."""
    order_id = driver.place("buy", "1", symbol=SPOT)
    decision = driver.fill(order_id, "1", "50000", fee="0.001", fee_currency="BTC")
    assert decision.position_id is not None
    return order_id, decision.position_id


def test_a_spot_buy_holds_the_coin_received_and_values_the_coin_fee_at_the_fill_price() -> None:
    driver = Driver()
    order_id, position_id = _bought_with_coin_fee(driver)

    position = driver.position(position_id)
    assert position.size == D("0.999")  # 1 - 0.001 received
    assert position.entry_qty == D("0.999")
    assert position.entry_price == D("50000")  # 0.999 * 50000 / 0.999
    assert position.fees == D("50")  # 0.001 BTC * 50000 USDT, in the settlement currency
    assert position.other_fees == {}  # never the base coin on spot
    assert position.realized_pnl == D("-50")  # gross 0 - fees 50
    order = driver.order(order_id)
    assert order.filled_qty == D("1")  # the venue's quantity: the order is about what was traded
    assert order.status is OrderStatus.FILLED


def test_the_fill_event_keeps_the_venues_fee_and_the_position_event_the_valued_one() -> None:
    driver = Driver()
    order_id = driver.place("buy", "1", symbol=SPOT)
    decision = driver.fill(order_id, "1", "50000", fee="0.001", fee_currency="BTC")

    [filled] = of_type(decision.events, wire.OrderFilled)
    assert (filled.quantity, filled.fee, filled.fee_currency) == ("1", "0.001", "BTC")
    assert (filled.filled_qty, filled.unapplied_qty) == ("1", "0")
    [opened] = of_type(decision.events, wire.PositionOpened)
    assert (opened.size, opened.change_qty, opened.change_fee_currency) == ("0.999", "0.999", "USDT")
    assert D(opened.change_fee) == D("50") and D(opened.fees) == D("50")  # 0.001 * 50000


def test_selling_what_was_received_at_the_same_price_loses_the_coin_fee_and_the_exit_fee() -> None:
    driver = Driver()
    _, position_id = _bought_with_coin_fee(driver)
    sell = driver.place("sell", "0.999", symbol=SPOT)
    driver.fill(sell, "0.999", "50000", fee="49.95", fee_currency="USDT")  # 0.999 * 50000 * 0.001

    position = driver.position(position_id)
    assert position.status is PositionStatus.CLOSED and position.size == 0
    assert position.gross_pnl == 0  # (50000 - 50000) * 0.999
    assert position.fees == D("99.95")  # 0.001 * 50000 + 49.95
    assert position.realized_pnl == D("-99.95")  # -(0.001 * 50000) - 49.95


def test_the_spot_short_check_uses_the_size_held_net_of_the_coin_fee() -> None:
    driver = Driver()
    _bought_with_coin_fee(driver)

    rejection = driver.refused(
        "place_order", exchange="okx", symbol=SPOT, side="sell", order_type="market", quantity="1"
    )

    assert rejection.code is RejectCode.SPOT_SHORT
    assert rejection.message == (
        "selling 1 BTC/USDT spot would go short: 0.999 BTC held (fees paid in BTC are not held); sell at most 0.999"
    )
    driver.place("sell", "0.999", symbol=SPOT)  # the whole holding is accepted


def test_the_spot_entry_is_weighted_by_the_coin_received() -> None:
    driver = Driver()
    _, position_id = _bought_with_coin_fee(driver)  # 0.999 at 50000, fee 50
    order_id = driver.place("buy", "2", symbol=SPOT)
    driver.fill(order_id, "2", "53000", fee="0.002", fee_currency="BTC")  # 1.998 at 53000, fee 106

    position = driver.position(position_id)
    assert position.size == D("2.997")  # 0.999 + 1.998
    # (0.999 * 50000 + 1.998 * 53000) / 2.997 = (49950 + 105894) / 2.997 = 155844 / 2.997
    assert position.entry_price == D("52000")
    assert position.fees == D("156")  # 0.001 * 50000 + 0.002 * 53000 = 50 + 106


def test_a_spot_sell_paying_its_fee_in_the_coin_gives_up_the_quantity_and_the_fee() -> None:
    driver = Driver()
    _, position_id = _bought_with_coin_fee(driver)  # 0.999 at 50000, fee 50
    sell = driver.place("sell", "0.5", symbol=SPOT)
    decision = driver.fill(sell, "0.5", "60000", fee="0.0005", fee_currency="BTC")

    position = driver.position(position_id)
    assert position.size == D("0.4985")  # 0.999 - (0.5 + 0.0005)
    assert position.exit_qty == D("0.5005")
    # the coin leaving at 60000, fee included: (60000 - 50000) * 0.5005 = 5005
    assert position.gross_pnl == D("5005")
    assert position.fees == D("80")  # 50 + 0.0005 * 60000
    assert position.realized_pnl == D("4925")  # 5005 - 80
    # = 0.5 * 60000 received - 0.5005 * 50000 that the coin given up cost - the buy's fee 50
    assert position.realized_pnl == D("0.5") * 60000 - D("0.5005") * 50000 - 50
    assert driver.order(sell).filled_qty == D("0.5")
    [reduced] = of_type(decision.events, wire.PositionReduced)
    assert (reduced.change_qty, D(reduced.change_fee)) == ("0.5005", D("30"))


def test_a_coin_fee_that_leaves_nothing_to_move_is_refused() -> None:
    driver = Driver()
    order_id = driver.place("buy", "1", symbol=SPOT)

    rejection = driver.refused(
        "record_fill", order_id=order_id, fill_id="t1", quantity="0.001", price="50000", fee="0.001", fee_currency="BTC"
    )

    assert rejection.code is RejectCode.INVALID_COMMAND
    assert rejection.message == (
        "fee: 0.001 BTC leaves no BTC to move for a buy of 0.001: "
        "report the fee the venue charged (in USDT if it took that)"
    )


def test_spot_fees_in_the_quote_and_linear_fees_in_another_coin_are_unchanged() -> None:
    driver = Driver()
    spot = driver.place("buy", "1", symbol=SPOT)
    spot_position = driver.fill(spot, "1", "50000", fee="50", fee_currency="USDT").position_id
    linear = driver.place("buy", "1", symbol=LINEAR)
    linear_position = driver.fill(linear, "1", "50000", fee="0.001", fee_currency="BTC").position_id
    assert spot_position is not None and linear_position is not None

    assert (driver.position(spot_position).size, driver.position(spot_position).fees) == (D("1"), D("50"))
    held = driver.position(linear_position)
    assert (held.size, held.fees, held.other_fees) == (D("1"), D("0"), {"BTC": D("0.001")})


# --------------------------------------------------------------------------- contract values recorded


def _with_face_value(table: InstrumentTable, exchange: Exchange, market: str, value: D) -> dict[Any, Any]:
    """The market data after a ``markets sync`` that changed one inverse market's face value."""
    changed = dict(table)
    for key, instrument in table.items():
        if key[0] is exchange and instrument.market == market:
            changed[key] = dataclasses.replace(instrument, contract_value=value, contract_size=value)
    return changed


def test_orders_and_positions_record_the_inverse_contract_value_and_no_other() -> None:
    driver = Driver()
    inverse_order, inverse_position = driver.open_position("long", "10", symbol=INVERSE)
    inverse = driver.fill(inverse_order, "10", "40000")
    linear = driver.place("buy", "1", symbol=LINEAR)
    linear_fill = driver.fill(linear, "1", "40000")

    placed = of_type(driver.log, wire.OrderPlaced)
    assert [p.contract_value for p in placed] == ["100", msgspec.UNSET]  # OKX BTC-USD-SWAP: 100 USD
    assert of_type(inverse.events, wire.PositionOpened)[0].contract_value == "100"
    assert driver.position(inverse_position).contract_value == D("100")
    [linear_opened] = of_type(linear_fill.events, wire.PositionOpened)
    assert linear_opened.contract_value is msgspec.UNSET
    assert b"contract_value" not in wire.encode(linear_opened)  # the event keeps its shape


def test_a_position_keeps_its_contract_value_after_the_market_data_changes() -> None:
    driver = Driver()
    order_id, position_id = driver.open_position("long", "10", symbol=INVERSE)
    driver.fill(order_id, "5", "40000")
    # A markets sync makes BTC-USD-SWAP's face value 200 between two fills.
    driver.instruments = _with_face_value(instrument_table(), Exchange.OKX, "BTC/USD:BTC", D(200))
    driver.fill(order_id, "5", "40000")  # the entry order was placed at 100
    more = driver.place("buy", "10", symbol=INVERSE)  # placed after the sync: at 200
    driver.fill(more, "10", "40000")
    reduce = driver.place("sell", "5", symbol=INVERSE, reduce_only=True)  # reduces the position: at 100
    driver.fill(reduce, "5", "50000")
    close = driver.close(position_id)
    driver.fill(close, "15", "50000")

    assert [p.contract_value for p in of_type(driver.log, wire.OrderPlaced)] == ["100", "200", "100", "100"]
    position = driver.position(position_id)
    assert position.contract_value == D("100")
    # (5 + 15) * 100 * (1/40000 - 1/50000) = 2000 * 0.000005 = 0.01 BTC (at 200 it would be 0.02)
    assert position.gross_pnl == D("0.01")
    events = [e for e in driver.log if isinstance(e, wire.PositionEvent)]
    assert {e.contract_value for e in events} == {"100"}
    assert replay(driver.log).positions == driver.store.positions


def test_replay_from_the_log_as_written_agrees_after_the_market_data_changed() -> None:
    driver = Driver()
    order_id, _ = driver.open_position("short", "10", symbol=INVERSE)
    driver.fill(order_id, "10", "40000")
    driver.instruments = _with_face_value(instrument_table(), Exchange.OKX, "BTC/USD:BTC", D(50))
    position_id = driver.order(order_id).position_id
    assert position_id is not None
    driver.fill(driver.close(position_id), "10", "50000")

    book = Book()
    evolve(book, [wire.decode_event(**_entry(event)) for event in driver.log])
    assert book.positions == driver.store.positions
    # short: -(10 * 100 * (1/40000 - 1/50000)) = -0.005 BTC
    assert driver.position(position_id).gross_pnl == D("-0.005")


def _entry(event: wire.Event, drop: str | None = None) -> dict[str, Any]:
    fields = event_fields(event)
    raw = fields["data"]
    if drop is not None:
        data = json.loads(raw)
        data.pop(drop, None)
        raw = json.dumps(data)
    return {"type_name": fields["type"], "raw": raw}


def test_events_written_before_values_were_recorded_read_as_todays_lookup_then_keep_it() -> None:
    driver = Driver()
    order_id, position_id = driver.open_position("long", "10", symbol=INVERSE)
    driver.fill(order_id, "10", "40000")
    # The log as an older ledger wrote it: no contract_value anywhere.
    old = [wire.decode_event(**_entry(event, drop="contract_value")) for event in driver.log]
    later = Driver()
    later.store = replay(old)
    later.now, later._ids = driver.now, driver._ids
    assert later.position(position_id).contract_value is None
    assert later.order(order_id).contract_value is None

    later.instruments = _with_face_value(instrument_table(), Exchange.OKX, "BTC/USD:BTC", D(200))
    decision = later.fill(later.close(position_id, "5"), "5", "50000")

    # Today's lookup (200): 5 * 200 * (1/40000 - 1/50000) = 0.005 BTC, and it is recorded from now on.
    [reduced] = of_type(decision.events, wire.PositionReduced)
    assert (D(reduced.change_pnl), reduced.contract_value) == (D("0.005"), "200")
    later.instruments = instrument_table()  # a sync back to 100 changes nothing any more
    later.fill(later.close(position_id), "5", "50000")
    assert later.position(position_id).gross_pnl == D("0.01")  # 0.005 + 0.005


def test_the_position_model_values_a_mark_with_the_recorded_contract_value() -> None:
    common: dict[str, Any] = {
        "user_id": "alice",
        "exchange": Exchange.OKX,
        "symbol": INVERSE,
        "side": PositionSide.LONG,
        "size": D(10),
        "entry_price": D(40000),
    }
    recorded = Position(**common, contract_value=D(50), current_price=D(50000))
    today = Position(**common, current_price=D(50000))

    assert recorded.unrealized_pnl == D("0.0025")  # 10 * 50 * (1/40000 - 1/50000)
    assert today.unrealized_pnl == D("0.005")  # 10 * 100 * ...: the bundled market data
    assert recorded.notional_value == D("0.01")  # 10 * 50 / 50000


# --------------------------------------------------------------------------- fees computed


@pytest.mark.parametrize(
    ("exchange", "symbol", "quantity", "price", "rate", "fee"),
    [
        # OKX linear BTC-USDT-SWAP: 3 contracts of 0.01 BTC = quantity 0.03; 0.03 * 50000 * 0.0005
        (Exchange.OKX, "BTC-USDT-SWAP", "0.03", "50000", "0.0005", "0.75"),
        # OKX inverse BTC-USD-SWAP (100 USD): 3 * 100 / 50000 * 0.0005 = 0.000003 BTC
        (Exchange.OKX, "BTC-USD-SWAP", "3", "50000", "0.0005", "0.000003"),
        # Binance COIN-M BTCUSD_PERP (100 USD): 7 * 100 / 40000 * 0.0005 = 0.00000875 BTC
        (Exchange.BINANCE, "BTCUSD_PERP", "7", "40000", "0.0005", "0.00000875"),
        # Binance COIN-M ETHUSD_PERP (10 USD): 4 * 10 / 2000 * 0.0001 = 0.000002 ETH
        (Exchange.BINANCE, "ETHUSD_PERP", "4", "2000", "0.0001", "0.000002"),
        # spot BTC/USDT: 0.5 * 50000 * 0.001 = 25 USDT
        (Exchange.BINANCE, "BTC/USDT", "0.5", "50000", "0.001", "25"),
        # inverse, rounded once to 28 digits then to 18 fraction digits: 1 * 100 / 30000 * 0.0005
        (Exchange.OKX, "BTC-USD-SWAP", "1", "30000", "0.0005", "0.000001666666666667"),
    ],
)
def test_fill_fee_by_hand(exchange: Exchange, symbol: str, quantity: str, price: str, rate: str, fee: str) -> None:
    instrument = bundled(exchange).resolve(symbol).instrument
    assert arithmetic.fill_fee(instrument, D(quantity), D(price), D(rate)) == D(fee)
    # the paper venue charges the same, through the same function
    assert paper_fee(exchange, symbol, D(quantity), D(price), D(rate)) == D(fee)


def _trade(amount: float, price: float, **extra: Any) -> dict[str, Any]:
    """A trade as ccxt parses it (floats), without a fee unless given."""
    return {"id": "t-1", "order": "o-1", "amount": amount, "price": price, "timestamp": 1_700_000_000_000, **extra}


@pytest.mark.parametrize(
    ("exchange", "symbol", "trade", "quantity", "fee", "currency"),
    [
        # OKX linear: 3 contracts of 0.01 BTC at 50000, taker 0.0005: 0.03 * 50000 * 0.0005 USDT
        # (ccxt's calculate_fee would say 3 * 50000 * 0.0005 = 75)
        (Exchange.OKX, "BTC-USDT-SWAP", _trade(3.0, 50000.0, takerOrMaker="taker"), "0.03", "0.75", "USDT"),
        # OKX linear, maker 0.0002: 0.03 * 50000 * 0.0002 = 0.3 USDT
        (Exchange.OKX, "BTC-USDT-SWAP", _trade(3.0, 50000.0, takerOrMaker="maker"), "0.03", "0.3", "USDT"),
        # OKX inverse (face 100 USD), taker when unknown: 3 * 100 / 50000 * 0.0005 BTC
        (Exchange.OKX, "BTC-USD-SWAP", _trade(3.0, 50000.0), "3", "0.000003", "BTC"),
        # Binance COIN-M BTCUSD_PERP (face 100), maker 0.0001: 8 * 100 / 40000 * 0.0001 BTC
        (Exchange.BINANCE, "BTCUSD_PERP", _trade(8.0, 40000.0, takerOrMaker="maker"), "8", "0.000002", "BTC"),
        # Binance COIN-M ETHUSD_PERP (face 10), taker 0.0005: 4 * 10 / 2000 * 0.0005 ETH
        (Exchange.BINANCE, "ETHUSD_PERP", _trade(4.0, 2000.0, fee=None), "4", "0.00001", "ETH"),
        # spot OKX BTC-USDT, taker 0.0015: 0.2 * 50000 * 0.0015 = 15 USDT
        (Exchange.OKX, "BTC-USDT", _trade(0.2, 50000.0, fee={"cost": None, "currency": None}), "0.2", "15", "USDT"),
    ],
)
def test_a_live_fill_without_a_fee_gets_the_markets_rate_with_the_contract_size(
    exchange: Exchange, symbol: str, trade: dict[str, Any], quantity: str, fee: str, currency: str
) -> None:
    fill = _fill(bundled(exchange).resolve(symbol), trade)

    assert (fill.quantity, fill.fee, fill.fee_currency, fill.fee_source) == (D(quantity), D(fee), currency, "computed")
    command = commands.fill("00000000-0000-0000-0000-000000000001", "alice", fill)
    assert command.fee_source == "computed"
    assert D(json.loads(wire.encode_command(command))["fee"]) == D(fee)  # a string on the wire


def test_a_fee_the_venue_reports_is_a_fact_and_is_not_marked() -> None:
    reported = _trade(3.0, 50000.0, fee={"cost": 0.7, "currency": "USDT"})
    fill = _fill(bundled(Exchange.OKX).resolve("BTC-USDT-SWAP"), reported)

    assert (fill.fee, fill.fee_currency, fill.fee_source) == (D("0.7"), "USDT", None)
    data = json.loads(wire.encode_command(commands.fill("00000000-0000-0000-0000-000000000001", "alice", fill)))
    assert "fee_source" not in data  # the command keeps its shape


def test_the_fill_event_says_the_fee_was_computed() -> None:
    driver = Driver()
    order_id = driver.place("buy", "0.03", symbol=LINEAR)
    computed = driver.fill(order_id, "0.01", "50000", fee="0.25", fee_currency="USDT", fee_source="computed")
    reported = driver.fill(order_id, "0.02", "50000", fee="0.5", fee_currency="USDT")

    [first] = of_type(computed.events, wire.OrderFilled)
    [second] = of_type(reported.events, wire.OrderFilled)
    assert first.fee_source == "computed"
    assert second.fee_source is msgspec.UNSET
    assert json.loads(wire.encode(first))["fee_source"] == "computed"
    assert "fee_source" not in json.loads(wire.encode(second))
    assert replay(driver.log).orders == driver.store.orders
