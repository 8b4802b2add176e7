"""The CLI's tables (``ledger.app.console``): the display rule for numbers, and the exact text a
pipe or a test gets (plain) or a terminal gets (bold header, negative money in red)."""

from __future__ import annotations

from decimal import Decimal

import pytest

from ledger.app.console import shown, table

ROWS = [
    {"id": "p1", "size": "-1.80000", "entry_price": "36.0", "realized_pnl": "1234.5000", "pnl_percentage": None},
    {
        "id": "p2",
        "size": "12000",
        "entry_price": "64000.50",
        "realized_pnl": "-0.000012345678901234567890",
        "pnl_percentage": "-2.3456789012345678901234567890",
    },
]
COLUMNS = ["id", "size", "entry_price", "realized_pnl", "pnl_percentage"]


@pytest.mark.parametrize(
    ("column", "value", "cell"),
    [
        ("size", "-1.80000", "-1.8"),  # trailing zeros trimmed, amounts exact
        ("entry_price", "36.0", "36"),
        ("price", Decimal("64000.00000001"), "64,000.00000001"),  # never rounded
        ("quantity", "1E+5", "100,000"),
        ("realized_pnl", "-0.000012345678901234567890", "-0.00001235"),  # money: 8 decimals, half-even
        ("fees", "0.000000005", "0"),  # half-even to 0, never "-0"
        ("unrealized_pnl", "-0.000000001", "0"),
        ("pnl_percentage", "12.345", "12.34%"),  # percentages: 2 decimals, half-even
        ("pnl_percentage", "-0.001", "0.00%"),
        ("lag", 12345, "12,345"),
        ("price", "", ""),  # not a number: as it is
        ("mark", None, ""),
        ("mark", "n/a", "n/a"),
        ("id", "1000", "1000"),  # not a number column: as it is
    ],
)
def test_the_display_rule(column: str, value: object, cell: str) -> None:
    assert shown(column, value) == cell


def test_a_table_is_plain_text_with_numbers_right_aligned() -> None:
    assert table(ROWS, COLUMNS).splitlines() == [
        "id    size  entry_price  realized_pnl  pnl_percentage",
        "p1    -1.8           36       1,234.5",
        "p2  12,000     64,000.5   -0.00001235          -2.35%",
    ]


def test_on_a_terminal_the_header_is_bold_and_negative_money_red() -> None:
    lines = table(ROWS[1:], ["id", "realized_pnl"], color=True).splitlines()
    bold = "\x1b[1m{}\x1b[0m"
    assert lines == [
        bold.format("id") + bold.format(" ") + bold.format(" ") + bold.format("realized_pnl"),
        "p2  \x1b[31m -0.00001235\x1b[0m",
    ]
