"""Position arithmetic of CONTRACT §7, checked against figures computed by hand.

Every expected value is written out with its arithmetic in a comment and compared with exact
``Decimal`` equality. A division that does not terminate is rounded to 28 significant digits,
half-even (CONTRACT §7); the comment shows the digits that were dropped.
"""

from __future__ import annotations

from decimal import Decimal as D

from ledger.client.models import Fill, Order, PnLInfo, Position
from ledger.domain import wire
from ledger.domain.enums import OrderStatus, PositionSide, PositionStatus
from tests.domain_helpers import INVERSE, LINEAR, USER, Driver, of_type

# --------------------------------------------------------------------------- linear long


def _long_built_from_two_fills(driver: Driver) -> str:
    """A 10x long of 0.2 BTC on BTC-USDT-SWAP: 0.1 @ 45000 (fee 0.45), 0.1 @ 46000 (fee 0.46)."""
    order_id, position_id = driver.open_position("long", "0.2", leverage=10)
    driver.fill(order_id, "0.1", "45000", fee="0.45")
    driver.fill(order_id, "0.1", "46000", fee="0.46")
    return position_id


def test_linear_entry_is_the_quantity_weighted_average_of_the_fills() -> None:
    driver = Driver()
    position_id = _long_built_from_two_fills(driver)

    position = driver.position(position_id)
    assert position.status is PositionStatus.OPEN
    assert position.side is PositionSide.LONG
    assert position.size == D("0.2")  # 0.1 + 0.1
    assert position.entry_price == D("45500")  # (0.1*45000 + 0.1*46000) / 0.2 = 9100 / 0.2
    assert position.fees == D("0.91")  # 0.45 + 0.46
    assert position.gross_pnl == D("0")
    assert position.realized_pnl == D("-0.91")  # 0 - 0.91: realized is net of entry fees
    assert position.leverage == 10
    assert driver.open_slot("long") == position


def test_first_fill_of_open_position_opens_then_second_increases() -> None:
    driver = Driver()
    order_id, position_id = driver.open_position("long", "0.2")

    first = driver.fill(order_id, "0.1", "45000", fee="0.45")
    second = driver.fill(order_id, "0.1", "46000", fee="0.46")

    [opened] = of_type(first.events, wire.PositionOpened)
    [increased] = of_type(second.events, wire.PositionIncreased)
    assert opened.stream == increased.stream == position_id  # the id open_position reserved
    assert (opened.version, increased.version) == (1, 2)
    assert (opened.size, opened.entry_price) == ("0.1", "45000")
    assert D(increased.size) == D("0.2")
    assert D(increased.entry_price) == D("45500")


def test_partial_close_realizes_its_gross_minus_all_fees_so_far() -> None:
    driver = Driver()
    position_id = _long_built_from_two_fills(driver)

    close_order = driver.close(position_id, "0.05")
    decision = driver.fill(close_order, "0.05", "47000", fee="0.2")

    [reduced] = of_type(decision.events, wire.PositionReduced)
    assert D(reduced.change_pnl) == D("75")  # (47000 - 45500) * 0.05
    position = driver.position(position_id)
    assert position.status is PositionStatus.OPEN
    assert position.size == D("0.15")  # 0.2 - 0.05
    assert position.entry_price == D("45500")  # a reducing fill leaves the entry unchanged
    assert position.exit_price == D("47000")
    assert position.gross_pnl == D("75")
    assert position.fees == D("1.11")  # 0.45 + 0.46 + 0.2
    assert position.realized_pnl == D("73.89")  # 75 - 1.11


def test_long_closed_in_two_steps_realizes_gross_minus_every_fee() -> None:
    driver = Driver()
    position_id = _long_built_from_two_fills(driver)
    driver.fill(driver.close(position_id, "0.05"), "0.05", "47000", fee="0.2")

    decision = driver.fill(driver.close(position_id), "0.15", "44000", fee="0.3")

    [closed] = of_type(decision.events, wire.PositionClosed)
    assert D(closed.change_pnl) == D("-225")  # (44000 - 45500) * 0.15
    position = driver.position(position_id)
    assert position.status is PositionStatus.CLOSED
    assert position.size == D("0")
    assert position.entry_price == D("45500")
    # exit: (0.05*47000 + 0.15*44000) / 0.2 = (2350 + 6600) / 0.2 = 8950 / 0.2
    assert position.exit_price == D("44750")
    assert position.gross_pnl == D("-150")  # 75 - 225
    assert position.fees == D("1.41")  # 0.45 + 0.46 + 0.2 + 0.3
    assert position.realized_pnl == D("-151.41")  # -150 - 1.41
    assert position.close_reason == "manual"
    assert position.closed_at == driver.now  # the clock of the closing fill
    assert driver.open_slot("long") is None


def test_gross_pnl_of_a_reducing_fill_is_the_exact_product() -> None:
    """Sums and products are exact (CONTRACT §7), even with a 28-digit average entry."""
    driver = Driver()
    order_id, position_id = driver.open_position("long", "0.3")
    driver.fill(order_id, "0.1", "45000")
    driver.fill(order_id, "0.2", "45001")
    # entry = (0.1*45000 + 0.2*45001) / 0.3 = 13500.2 / 0.3 = 45000.666...
    #       -> 28 significant digits, half-even: 45000.66666666666666666666667
    assert driver.position(position_id).entry_price == D("45000.66666666666666666666667")

    driver.fill(driver.close(position_id, "0.123"), "0.123", "46000")

    # (46000 - 45000.66666666666666666666667) * 0.123
    #   = 999.33333333333333333333333 * 0.123 = 122.91799999999999999999999959  (29 digits)
    position = driver.position(position_id)
    assert position.gross_pnl == D("122.91799999999999999999999959")
    assert position.realized_pnl == D("122.91799999999999999999999959")


def test_position_size_is_an_exact_sum_of_38_digit_quantities() -> None:
    driver = Driver()
    order_id, position_id = driver.open_position("long", "12345678901234567890.000000000000000001")
    driver.fill(order_id, "12345678901234567890", "1")
    driver.fill(order_id, "0.000000000000000001", "1")

    position = driver.position(position_id)
    # 12345678901234567890 + 0.000000000000000001: 38 significant digits, none dropped
    assert position.size == D("12345678901234567890.000000000000000001")
    assert position.entry_price == D("1")
    assert driver.order(order_id).status is OrderStatus.FILLED


# --------------------------------------------------------------------------- short


def test_short_closed_below_its_entry_makes_a_profit() -> None:
    driver = Driver()
    order_id, position_id = driver.open_position("short", "1", symbol="ETH-USDT-SWAP", leverage=3)
    driver.fill(order_id, "1", "3000", fee="1.5")
    close_order = driver.close(position_id, reason="take_profit")
    assert driver.order(close_order).side == "buy"  # a short is closed by buying

    driver.fill(close_order, "1", "2800", fee="1.4")

    position = driver.position(position_id)
    assert position.side is PositionSide.SHORT
    assert position.status is PositionStatus.CLOSED
    assert position.entry_price == D("3000")
    assert position.exit_price == D("2800")
    assert position.gross_pnl == D("200")  # (3000 - 2800) * 1
    assert position.fees == D("2.9")  # 1.5 + 1.4
    assert position.realized_pnl == D("197.1")  # 200 - 2.9
    assert position.close_reason == "take_profit"


# --------------------------------------------------------------------------- one-way flip


def _flip(driver: Driver) -> tuple[str, wire.OrderFilled, list[wire.PositionEvent]]:
    """Long 0.1 @ 50000 (fee 0.5), then a one-way sell of 0.3 filled @ 51000 with fee 0.6."""
    buy = driver.place("buy", "0.1")
    long_id = driver.fill(buy, "0.1", "50000", fee="0.5").position_id
    assert long_id is not None
    sell = driver.place("sell", "0.3")
    decision = driver.fill(sell, "0.3", "51000", fee="0.6")
    [filled] = of_type(decision.events, wire.OrderFilled)
    positions = [e for e in decision.events if isinstance(e, wire.PositionEvent)]
    return long_id, filled, positions


def test_flip_closes_the_long_with_its_share_of_the_fee() -> None:
    driver = Driver()
    long_id, _, events = _flip(driver)

    closed = events[0]
    assert isinstance(closed, wire.PositionClosed)
    assert closed.stream == long_id
    assert D(closed.change_qty) == D("0.1")  # min(0.3, open size 0.1)
    assert D(closed.change_fee) == D("0.2")  # 0.6 * 0.1 / 0.3
    position = driver.position(long_id)
    assert position.status is PositionStatus.CLOSED
    assert position.gross_pnl == D("100")  # (51000 - 50000) * 0.1
    assert position.fees == D("0.7")  # 0.5 + 0.2
    assert position.realized_pnl == D("99.3")  # 100 - 0.7
    assert position.exit_price == D("51000")
    assert position.close_reason == "flip"


def test_flip_opens_a_new_short_with_the_rest_and_the_rest_of_the_fee() -> None:
    driver = Driver()
    long_id, filled, events = _flip(driver)

    opened = events[1]
    assert isinstance(opened, wire.PositionOpened)
    assert opened.stream != long_id  # a new position, with a new id
    assert opened.version == 1
    short = driver.position(opened.stream)
    assert short.side is PositionSide.SHORT
    assert short.size == D("0.2")  # 0.3 - 0.1
    assert short.entry_price == D("51000")
    assert short.fees == D("0.4")  # 0.6 - 0.2
    assert short.realized_pnl == D("-0.4")
    assert D(events[0].change_fee) + D(opened.change_fee) == D("0.6")
    assert filled.position_ids == [long_id, opened.stream]
    assert filled.overfill is False and D(filled.unapplied_qty) == 0
    assert driver.open_slot("long") is None
    assert driver.open_slot("short") == short


# --------------------------------------------------------------------------- inverse


def _inverse_long(driver: Driver) -> str:
    """A 5x long of 10 contracts of BTC-USD-SWAP (100 USD each): 4 @ 40000 and 6 @ 60000.

    The first fill pays 0.0001 BTC (the settlement coin); the second 0.5 USDT (another
    currency: kept apart, never subtracted).
    """
    order_id, position_id = driver.open_position("long", "10", symbol=INVERSE, leverage=5)
    driver.fill(order_id, "4", "40000", fee="0.0001", fee_currency="BTC")
    driver.fill(order_id, "6", "60000", fee="0.5", fee_currency="USDT")
    return position_id


def test_inverse_entry_is_the_contract_weighted_harmonic_mean() -> None:
    driver = Driver()
    position = driver.position(_inverse_long(driver))

    assert position.size == D("10")  # contracts
    # 10 / (4/40000 + 6/60000) = 10 / (0.0001 + 0.0001) = 10 / 0.0002
    assert position.entry_price == D("50000")
    assert position.fees == D("0.0001")  # BTC
    assert position.other_fees == {"USDT": D("0.5")}
    assert position.realized_pnl == D("-0.0001")  # the USDT fee is not subtracted


def test_inverse_close_realizes_pnl_in_the_base_coin() -> None:
    driver = Driver()
    position_id = _inverse_long(driver)

    driver.fill(driver.close(position_id), "10", "62500", fee="0.00005")  # no currency: BTC

    position = driver.position(position_id)
    assert position.status is PositionStatus.CLOSED
    assert position.exit_price == D("62500")
    # 10 * 100 * (1/50000 - 1/62500) = 1000 * (0.00002 - 0.000016) = 0.004 BTC
    assert position.gross_pnl == D("0.004")
    assert position.fees == D("0.00015")  # 0.0001 + 0.00005
    assert position.other_fees == {"USDT": D("0.5")}
    assert position.realized_pnl == D("0.00385")  # 0.004 - 0.00015; USDT apart


def test_inverse_exit_price_is_the_harmonic_mean_of_the_reducing_fills() -> None:
    driver = Driver()
    position_id = _inverse_long(driver)

    first = driver.fill(driver.close(position_id, "4"), "4", "40000")
    driver.fill(driver.close(position_id), "6", "62500")

    [reduced] = of_type(first.events, wire.PositionReduced)
    assert D(reduced.change_pnl) == D("-0.002")  # 4*100*(1/50000 - 1/40000) = 400 * -0.000005
    position = driver.position(position_id)
    # 4*100*(1/50000 - 1/40000) + 6*100*(1/50000 - 1/62500) = -0.002 + 600 * 0.000004 = 0.0004
    assert position.gross_pnl == D("0.0004")
    # 10 / (4/40000 + 6/62500) = 10 / 0.000196 = 51020.408163265306122448979591836...
    #   -> 28 significant digits (next digit 1, rounded down)
    assert position.exit_price == D("51020.40816326530612244897959")
    assert position.realized_pnl == D("0.0003")  # 0.0004 - 0.0001


# --------------------------------------------------------------------------- liquidation


def test_liquidation_of_a_leveraged_long_at_a_loss() -> None:
    driver = Driver()
    order_id, position_id = driver.open_position("long", "0.5", leverage=20)
    driver.fill(order_id, "0.5", "60000", fee="3")

    decision = driver.ok("liquidate_position", position_id=position_id, price="57300")

    [event] = decision.events
    assert isinstance(event, wire.PositionLiquidated)
    assert D(event.change_pnl) == D("-1350")  # (57300 - 60000) * 0.5
    position = driver.position(position_id)
    assert position.status is PositionStatus.LIQUIDATED
    assert position.size == D("0")
    assert position.exit_price == D("57300")
    assert position.gross_pnl == D("-1350")
    assert position.fees == D("3")
    assert position.realized_pnl == D("-1353")  # -1350 - 3
    assert position.close_reason == "liquidation"
    assert position.closed_at == driver.now  # the clock of the liquidation
    assert driver.open_slot("long") is None


# --------------------------------------------------------------------------- hedge mode


def test_hedge_mode_keeps_a_long_and_a_short_open_on_one_symbol() -> None:
    driver = Driver()
    buy = driver.place("buy", "0.1", position_side="long")
    long_id = driver.fill(buy, "0.1", "50000").position_id
    sell = driver.place("sell", "0.2", position_side="short")

    short_id = driver.fill(sell, "0.2", "50100").position_id

    assert long_id != short_id
    long, short = driver.open_slot("long"), driver.open_slot("short")
    assert long is not None and short is not None
    assert (long.id, long.size, long.entry_price) == (long_id, D("0.1"), D("50000"))
    assert (short.id, short.size, short.entry_price) == (short_id, D("0.2"), D("50100"))


def test_hedge_mode_sell_on_the_long_side_reduces_only_the_long() -> None:
    driver = Driver()
    driver.fill(driver.place("buy", "0.1", position_side="long"), "0.1", "50000")
    driver.fill(driver.place("sell", "0.2", position_side="short"), "0.2", "50100")

    driver.fill(driver.place("sell", "0.05", position_side="long"), "0.05", "50200")

    long, short = driver.open_slot("long"), driver.open_slot("short")
    assert long is not None and short is not None
    assert long.size == D("0.05")  # 0.1 - 0.05
    assert long.gross_pnl == D("10")  # (50200 - 50000) * 0.05
    assert short.size == D("0.2")  # untouched
    assert short.version == 1


# --------------------------------------------------------------------------- models


def _position(**fields: object) -> Position:
    defaults: dict[str, object] = {
        "user_id": USER,
        "exchange": "okx",
        "symbol": LINEAR,
        "side": "long",
        "size": "0.2",
        "entry_price": "50000",
        "leverage": 10,
        "current_price": "51000",
    }
    return Position(**{**defaults, **fields})  # type: ignore[arg-type]


def test_position_model_linear_long_against_the_mark() -> None:
    position = _position()

    assert position.unrealized_pnl == D("200")  # (51000 - 50000) * 0.2
    assert position.margin == D("1000")  # 50000 * 0.2 / 10
    assert position.pnl_percentage == D("20")  # 200 / 1000 * 100
    assert position.notional_value == D("10200")  # 0.2 * 51000


def test_position_model_linear_short_against_the_mark() -> None:
    position = _position(side="short")

    assert position.unrealized_pnl == D("-200")  # (50000 - 51000) * 0.2
    assert position.pnl_percentage == D("-20")  # -200 / 1000 * 100
    assert position.notional_value == D("10200")


def test_position_model_percentage_is_rounded_to_28_digits() -> None:
    position = _position(entry_price="45500", current_price="46000")

    assert position.unrealized_pnl == D("100")  # (46000 - 45500) * 0.2
    # 100 / (45500 * 0.2 / 10) * 100 = 10000 / 910 = 10.989010989...  -> 28 digits
    assert position.pnl_percentage == D("10.98901098901098901098901099")


def test_position_model_inverse_against_the_mark() -> None:
    position = _position(symbol=INVERSE, size="10", entry_price="50000", leverage=5, current_price="62500")

    # 10 * 100 * (1/50000 - 1/62500) = 1000 * 0.000004
    assert position.unrealized_pnl == D("0.004")
    assert position.margin == D("0.004")  # 10 * 100 / 50000 / 5
    assert position.pnl_percentage == D("100")  # 0.004 / 0.004 * 100
    assert position.notional_value == D("0.016")  # 10 * 100 / 62500


def test_position_model_without_a_mark_has_no_computed_pnl() -> None:
    position = _position(current_price=None)

    assert position.unrealized_pnl is None
    assert position.pnl_percentage is None
    assert position.notional_value is None


def test_position_model_pnl_info_totals_realized_and_unrealized() -> None:
    position = _position(realized_pnl="-12.5", fees="12.5", current_price=None)

    info = position.pnl(D("50500"))

    assert info.unrealized_pnl == D("100")  # (50500 - 50000) * 0.2
    assert info.pnl_percentage == D("10")  # 100 / 1000 * 100
    assert info.total_pnl == D("87.5")  # -12.5 + 100
    assert info.fees == D("12.5")


def _order(**fields: object) -> Order:
    defaults: dict[str, object] = {
        "user_id": USER,
        "exchange": "okx",
        "symbol": LINEAR,
        "side": "buy",
        "order_type": "limit",
        "quantity": "0.5",
        "price": "46000",
    }
    return Order(**{**defaults, **fields})  # type: ignore[arg-type]


def test_order_model_without_fills() -> None:
    order = _order()

    assert order.status is OrderStatus.PENDING
    assert order.remaining_qty == D("0.5")
    assert order.fill_percentage == D("0")
    assert order.avg_fill_price is None


def test_order_model_after_two_fills() -> None:
    order = _order()
    for quantity, price in (("0.1", "45000"), ("0.1", "46000")):
        order = order.with_fill(Fill(order_id="o", fill_id="t", quantity=quantity, price=price))

    assert order.filled_qty == D("0.2")
    assert order.fill_basis == D("9100")  # 0.1*45000 + 0.1*46000
    assert order.remaining_qty == D("0.3")  # 0.5 - 0.2
    assert order.fill_percentage == D("40")  # 0.2 * 100 / 0.5
    assert order.avg_fill_price == D("45500")  # 9100 / 0.2


def test_order_model_inverse_average_is_harmonic() -> None:
    order = _order(symbol=INVERSE, quantity="10", price="50000")
    for quantity, price in (("4", "40000"), ("6", "60000")):
        order = order.with_fill(Fill(order_id="o", fill_id="t", quantity=quantity, price=price))

    assert order.fill_basis == D("0.0002")  # 4/40000 + 6/60000
    assert order.avg_fill_price == D("50000")  # 10 / 0.0002
    assert order.fill_percentage == D("100")


def test_order_model_sums_are_exact_at_38_digits() -> None:
    order = _order(quantity="12345678901234567890.123456789012345678", price=None)
    order = order.with_fill(Fill(order_id="o", fill_id="t", quantity="0.000000000000000001", price="1"))

    # 12345678901234567890.123456789012345678 - 0.000000000000000001
    assert order.remaining_qty == D("12345678901234567890.123456789012345677")


def test_pnl_info_total_is_an_exact_sum() -> None:
    info = PnLInfo(realized_pnl="12345678901234567890.1", unrealized_pnl="0.000000000000000001")

    assert info.total_pnl == D("12345678901234567890.100000000000000001")


def test_order_model_overfilled_has_nothing_remaining() -> None:
    order = _order(filled_qty="0.6", fill_basis="27600")

    assert order.remaining_qty == D("0")  # never negative
    assert order.fill_percentage == D("120")  # 0.6 * 100 / 0.5
    assert order.avg_fill_price == D("46000")  # 27600 / 0.6
