"""What the commands of the ``ledger`` CLI share: their errors, the recorded shard count, and
the tables they print on a terminal."""

from __future__ import annotations

from collections.abc import Sequence
from decimal import Decimal
from typing import Any

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


def table(rows: list[dict[str, Any]], columns: Sequence[str]) -> str:
    widths = {c: max([len(c)] + [len("" if r.get(c) is None else str(r.get(c))) for r in rows]) for c in columns}
    lines = ["  ".join(c.ljust(widths[c]) for c in columns)]
    lines += ["  ".join(("" if r.get(c) is None else str(r.get(c))).ljust(widths[c]) for c in columns) for r in rows]
    return "\n".join(lines)


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
