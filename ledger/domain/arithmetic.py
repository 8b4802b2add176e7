"""Position arithmetic of CONTRACT §7, as pure functions over exact Decimals.

Linear and spot: value is ``quantity * price``; inverse: quantity counts contracts of face value
``contract_value`` (quote currency) and PnL is in the base coin. Sums and products are exact;
every division goes through ``ledger.domain.values.divide`` (28 significant digits, half-even);
every function runs in the ``EXACT`` context so that no sum or product is rounded.
"""

from __future__ import annotations

from decimal import ROUND_HALF_EVEN, Decimal

from ledger.domain.enums import OrderSide, PositionSide
from ledger.domain.instruments import Instrument
from ledger.domain.values import MAX_AMOUNT, MAX_FRACTION_DIGITS, ZERO, divide, exact

HUNDRED = Decimal(100)
_FEE_UNIT = Decimal(1).scaleb(-MAX_FRACTION_DIGITS)


@exact
def basis(instrument: Instrument, quantity: Decimal, price: Decimal) -> Decimal:
    """What one fill adds to a weighted average: ``q * p`` (linear) or ``q / p`` (inverse)."""
    if instrument.is_inverse:
        return divide(quantity, price)
    return quantity * price


def average_price(instrument: Instrument, quantity: Decimal, total_basis: Decimal) -> Decimal:
    """Quantity-weighted mean (linear) or contract-weighted harmonic mean (inverse)."""
    if instrument.is_inverse:
        return divide(quantity, total_basis)
    return divide(total_basis, quantity)


@exact
def gross_pnl(instrument: Instrument, side: PositionSide, entry: Decimal, price: Decimal, quantity: Decimal) -> Decimal:
    """Gross PnL of ``quantity`` leaving a position entered at ``entry`` at ``price``."""
    if instrument.is_inverse:
        move = divide(quantity * instrument.contract_value * (price - entry), entry * price)
    else:
        move = (price - entry) * quantity
    return move if side is PositionSide.LONG else -move


@exact
def margin(instrument: Instrument, entry: Decimal, size: Decimal, leverage: int) -> Decimal:
    """Margin of an open position: ``entry * size / leverage`` (inverse: in the base coin)."""
    if instrument.is_inverse:
        return divide(size * instrument.contract_value, entry * leverage)
    return divide(entry * size, Decimal(leverage))


@exact
def notional_value(instrument: Instrument, size: Decimal, mark: Decimal) -> Decimal:
    """Value of ``size`` at ``mark``: ``size * mark`` (inverse: ``size * contract_value / mark``)."""
    if instrument.is_inverse:
        return divide(size * instrument.contract_value, mark)
    return size * mark


def amount_fits(instrument: Instrument, quantity: Decimal, price: Decimal) -> bool:
    """Whether ``quantity`` at ``price`` is worth at most ``MAX_AMOUNT`` in the settlement
    currency, so that its fee and PnL fit the wire's decimal rule."""
    return notional_value(instrument, quantity, price) <= MAX_AMOUNT


@exact
def pnl_percentage(unrealized: Decimal, position_margin: Decimal) -> Decimal:
    """Return on margin in percent; zero when there is no margin."""
    if position_margin == 0:
        return ZERO
    return divide(unrealized * HUNDRED, position_margin)


@exact
def split_fee(fee: Decimal, part: Decimal, whole: Decimal) -> Decimal:
    """The share of ``fee`` that belongs to ``part`` of a fill of ``whole`` (proportional)."""
    if part == whole:
        return fee
    return divide(fee * part, whole)


@exact
def fill_fee(instrument: Instrument, quantity: Decimal, price: Decimal, rate: Decimal) -> Decimal:
    """The fee of a fill at ``rate``, in the settlement currency: what the paper venue charges
    and what the ledger computes for a fill a live venue reported without a fee.

    Spot and linear: ``quantity * price * rate`` (exact). The quantity is in base units, so a
    linear contract's size is already in it (OKX ``BTC-USDT-SWAP``: 3 contracts of 0.01 BTC are
    a quantity of 0.03); ccxt's ``calculate_fee`` multiplies contracts by the price and ignores
    the size. Inverse: ``quantity * contract_value / price * rate`` in the base coin (quantity in
    contracts; one division, 28 significant digits). At most 18 fraction digits, rounded
    half-even: what a command can carry.
    """
    if instrument.is_inverse:
        fee = divide(quantity * instrument.contract_value * rate, price)
    else:
        fee = quantity * price * rate
    if fee.as_tuple().exponent < -MAX_FRACTION_DIGITS:  # type: ignore[operator]
        fee = fee.quantize(_FEE_UNIT, rounding=ROUND_HALF_EVEN)
    return fee


@exact
def held_change(side: OrderSide, quantity: Decimal, coin_fee: Decimal) -> Decimal:
    """How much of a spot market's coin a fill moves in or out of the holding when its fee is
    paid in that coin: a buy receives ``quantity - fee``, a sell gives up ``quantity + fee``."""
    return quantity - coin_fee if side is OrderSide.BUY else quantity + coin_fee
