"""Properties of spot fees paid in the coin traded (hypothesis; CONTRACT §7 refined for spot).

Over random spot sessions of buys and sells whose fees are paid in the coin, the quote or
unnamed (the settlement currency):

* the coin held is exactly what was received less what was sent: ``sum(q - fee)`` of the buys
  with a coin fee, ``sum(q)`` of the others, less ``sum(q + fee)`` of the sells likewise;
* ``fees`` is exactly the sum of the quote fees and of each coin fee at its fill's price;
* every order's ``filled_qty`` is the venue's quantity;
* once everything is sold, the realized PnL is the cash the session made (sales less purchases
  less fees), within the rounding of the averages (one 28-digit division each).
"""

from __future__ import annotations

from decimal import Decimal
from fractions import Fraction

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from ledger.domain.enums import PositionStatus
from tests.domain_helpers import SPOT, Driver, fraction

PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
UNIT = Decimal("0.00000001")
PRICE = st.integers(50_000_000_000, 15_000_000_000_000).map(lambda units: units * UNIT)  # 500 .. 150000
# A fill: its quantity, its price, the share of it paid as fee (0 .. 1%) and where the fee is paid.
FILL = st.tuples(
    st.integers(1, 2 * 10**8).map(lambda units: units * UNIT),
    PRICE,
    st.integers(0, 100),
    st.sampled_from(["BTC", "BTC", "USDT", None]),
)
# A sell: the share of the holding it sells (1..100%), its price, fee share, fee currency.
SELL = st.tuples(st.integers(1, 100), PRICE, st.integers(0, 100), st.sampled_from(["BTC", "BTC", "USDT", None]))
SESSION = st.tuples(st.lists(FILL, min_size=1, max_size=5), st.lists(SELL, max_size=4), st.booleans())
# Two fills of one session may differ in the 28th significant digit of each average: 1e-20 of the
# traded value is far above that and far below any real mistake (see test_properties.RELATIVE).
RELATIVE = Fraction(1, 10**20)


def _fee(quantity: Decimal, price: Decimal, per_ten_thousand: int, currency: str | None) -> Decimal:
    """A fee of ``per_ten_thousand`` / 10000 of the fill, in the coin or in the quote."""
    share = Decimal(per_ten_thousand) / 10_000
    return (quantity * share).quantize(UNIT) if currency == "BTC" else (quantity * price * share).quantize(UNIT)


@PROPERTY
@given(SESSION)
@example(  # buy 1 (0.001 BTC fee), sell half of the 0.999 (0.0004995 BTC fee), then the rest
    ([(Decimal("1"), Decimal("50000"), 10, "BTC")], [(50, Decimal("60000"), 10, "BTC")], True)
)
def test_the_spot_holding_is_what_was_received_less_what_was_sent(
    session: tuple[list[tuple[Decimal, Decimal, int, str | None]], list[tuple[int, Decimal, int, str | None]], bool],
) -> None:
    buys, sells, sell_all = session
    driver = Driver()
    held = Fraction(0)  # by hand: received less sent
    fees = Fraction(0)  # by hand: quote fees + coin fees at their fill's price
    cash = Fraction(0)  # by hand: sales - purchases - quote fees (coin fees already left the holding)
    orders: list[tuple[str, Decimal]] = []

    def fill(side: str, quantity: Decimal, price: Decimal, fee: Decimal, currency: str | None) -> None:
        nonlocal held, fees, cash
        order_id = driver.place(side, quantity, symbol=SPOT)
        driver.fill(order_id, quantity, price, fee=fee, fee_currency=currency)
        orders.append((order_id, quantity))
        coin = fraction(fee) if currency == "BTC" else Fraction(0)
        held += fraction(quantity) - coin if side == "buy" else -(fraction(quantity) + coin)
        fees += coin * fraction(price) if currency == "BTC" else fraction(fee)
        value = fraction(quantity) * fraction(price)
        cash += (-value if side == "buy" else value) - (0 if currency == "BTC" else fraction(fee))

    for quantity, price, share, currency in buys:
        fee = _fee(quantity, price, share, currency)
        if currency == "BTC" and fee >= quantity:
            continue
        fill("buy", quantity, price, fee, currency)
    for percent, price, share, currency in sells:
        quantity = (Decimal(held.numerator) / held.denominator * percent / 100).quantize(UNIT, rounding="ROUND_DOWN")
        fee = _fee(quantity, price, share, currency)
        if quantity <= 0 or (currency == "BTC" and fraction(quantity + fee) > held):
            continue
        fill("sell", quantity, price, fee, currency)
    if sell_all and held > 0:
        fill("sell", Decimal(held.numerator) / held.denominator, Decimal(60000), Decimal(0), None)

    positions = [p for p in driver.store.positions.values() if p is not None]
    assert sum((fraction(p.size) for p in positions), Fraction(0)) == held
    assert sum((fraction(p.fees) for p in positions), Fraction(0)) == fees
    assert all(
        p.other_fees == {} and fraction(p.realized_pnl) == fraction(p.gross_pnl) - fraction(p.fees) for p in positions
    )
    for order_id, quantity in orders:
        assert driver.order(order_id).filled_qty == quantity
    if held == 0 and positions:
        assert all(p.status is PositionStatus.CLOSED for p in positions)
        realized = sum((fraction(p.realized_pnl) for p in positions), Fraction(0))
        traded = sum((fraction(q) * 150_000 for _, q in orders), Fraction(0))
        assert abs(realized - cash) <= RELATIVE * traded
