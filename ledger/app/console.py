"""What the commands of the ``ledger`` CLI share: their errors, the recorded shard count, and
the tables they print on a terminal."""

from __future__ import annotations

import io
import sys
from collections.abc import Sequence
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from ledger.client.queries import position_from_hash
from ledger.domain.mapping import ORDER, POSITION
from ledger.domain.values import format_decimal
from ledger.errors import InvalidInput, OperationFailed
from ledger.store.redis_conn import recorded_shards

NO_LEDGER = "no ledger in this Redis yet (ledger:meta has no shards): start `ledger serve`"


class CliError(OperationFailed):
    """A failure to report on one line (exit status 1)."""


class UsageError(InvalidInput):
    """The command line asks for something impossible (exit status 2)."""


async def shard_count(redis: Any) -> int:
    """The ledger's recorded shard count; a one-line error when this Redis holds no ledger."""
    count = await recorded_shards(redis)
    if count is None:
        raise CliError(NO_LEDGER)
    return count


# How a table shows a number (the exact values stay in ``--json`` and in the models): every
# decimal without its trailing zeros and with thousands separators ("-1.80000" -> "-1.8",
# "64000.0" -> "64,000"); amounts and prices exact (never rounded: their digits are the
# instrument's steps); money (PnL, fees, notional) to at most MONEY_PLACES decimals, half-even (an
# inverse contract's PnL in BTC keeps its satoshis); a percentage to 2 decimals with "%". Numbers
# are right-aligned. A cell that is not a number (an id, an empty field, "n/a") is shown as it is.
MONEY_PLACES = 8
AMOUNT_COLUMNS = frozenset(
    {"size", "quantity", "filled_qty", "excess_qty", "contract_size", "amount_step", "min_amount"}
    | {"price", "entry_price", "exit_price", "avg_fill_price", "trigger_price", "mark", "price_step"}
    | {"stop_loss", "take_profit"}
)
MONEY_COLUMNS = frozenset({"realized_pnl", "unrealized_pnl", "gross_pnl", "fees", "notional_value"})
PERCENT_COLUMNS = frozenset({"pnl_percentage"})
COUNT_COLUMNS = frozenset(
    {"length", "consumers", "pending", "lag", "n", "removed", "entries", "already", "eligible", "compacted"}
    | {"version", "grid_level", "leverage"}
)
_MONEY_STEP = Decimal(1).scaleb(-MONEY_PLACES)
_PERCENT_STEP = Decimal("0.01")


def _decimal(value: Any) -> Decimal | None:
    if isinstance(value, bool) or value is None:
        return None
    try:
        number = Decimal(value)
    except (ArithmeticError, TypeError, ValueError):
        return None
    return number if number.is_finite() else None


NUMBER_COLUMNS = AMOUNT_COLUMNS | MONEY_COLUMNS | PERCENT_COLUMNS | COUNT_COLUMNS


def shown(column: str, value: Any) -> str:
    """A table cell: ``value`` of ``column`` by the display rule above."""
    number = _decimal(value) if column in NUMBER_COLUMNS else None
    if number is None:
        return "" if value is None else str(value)
    if column in PERCENT_COLUMNS:
        return f"{number.quantize(_PERCENT_STEP, ROUND_HALF_EVEN) or _PERCENT_STEP * 0:,f}%"
    if column in MONEY_COLUMNS:
        number = number.quantize(_MONEY_STEP, ROUND_HALF_EVEN)
    return f"{number.normalize() or Decimal(0):,f}"


def table(rows: list[dict[str, Any]], columns: Sequence[str], *, color: bool = False) -> str:
    """``rows`` as a rich table: one header line, then a line per row, two spaces between columns,
    no borders, numbers right-aligned (``shown``), nothing ever wrapped or cut (a table wider than
    the terminal runs past its edge: an id stays whole to copy). Plain text, trailing spaces
    stripped, unless ``color`` (a terminal): then the header is bold and negative money red."""
    grid = Table(box=None, pad_edge=False, padding=(0, 1), show_edge=False, header_style="bold" if color else "")
    for column in columns:
        grid.add_column(column, justify="right" if column in NUMBER_COLUMNS else "left", no_wrap=True)
    for row in rows:
        grid.add_row(*(_cell(column, row.get(column), color) for column in columns))
    out = io.StringIO()
    console = Console(file=out, width=_WIDE, force_terminal=color, color_system="standard" if color else None)
    console.print(grid, crop=False, soft_wrap=False, highlight=False)
    return "\n".join(line.rstrip() for line in out.getvalue().splitlines())


def _cell(column: str, value: Any, color: bool) -> Text:
    text = shown(column, value)
    return Text(text, style="red" if color and column in MONEY_COLUMNS and text.startswith("-") else "")


_WIDE = 100_000  # the console width tables are measured against: never a constraint


def print_table(rows: list[dict[str, Any]], columns: Sequence[str], empty: str | None = None) -> None:
    """Print ``rows`` (coloured on a terminal, plain when piped); ``empty`` instead when there are
    none and it is given (else the header alone)."""
    print(table(rows, columns, color=sys.stdout.isatty()) if rows or empty is None else empty)


# The names of CONTRACT §6, in its order: the fields of `positions --json` / `orders --json`.
POSITION_COLUMNS = POSITION.contract_fields
ORDER_COLUMNS = ORDER.contract_fields


def position_rows(hashes: list[dict[str, str]], prices: dict[tuple[str, str], Decimal]) -> list[dict[str, Any]]:
    """Live position hashes as CONTRACT §11 prints them: §6 names, plus PnL when a mark is known."""
    rows = []
    for fields in hashes:
        row: dict[str, Any] = {name: fields.get(name, "") for name in POSITION_COLUMNS}
        mark = prices.get((fields["exchange"], fields["symbol"]))
        if mark is not None:
            position = position_from_hash(fields, mark)
            row["mark"] = format_decimal(mark)
            for name in ("unrealized_pnl", "pnl_percentage", "notional_value"):
                row[name] = format_decimal(getattr(position, name))
        rows.append(row)
    return rows
