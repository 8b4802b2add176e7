"""Whatever the command handler accepts, every store can hold (issue 7, defect 2).

The limits are declared once (``ledger.domain.values.RULES`` and the wire types); this file checks them
against the columns of ``schema.sql`` as a real PostgreSQL reports them, against what
PostgreSQL's JSONB, NUMERIC and TIMESTAMPTZ take, and against Python's datetime range.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import msgspec
import psycopg
import pytest

from ledger.domain import wire
from ledger.domain.enums import Exchange, OrderSide, OrderStatus, OrderType, PositionSide, PositionStatus
from ledger.domain.values import (
    MAX_AMOUNT,
    MAX_FRACTION_DIGITS,
    MAX_INTEGER_DIGITS,
    MAX_TS_MS,
    METADATA_MAX_DEPTH,
    RULES,
    format_decimal,
    ms_to_datetime,
)

TABLES = ("positions", "orders", "fills", "ledger_events")
# Columns filled from a closed vocabulary: the longest value must fit.
VOCABULARIES: dict[str, list[str]] = {
    "exchange": list(Exchange),
    "side": [*OrderSide, *PositionSide],
    "position_side": list(PositionSide),
    "order_type": list(OrderType),
    "status": [*OrderStatus, *PositionStatus],
    "type": list(wire.EVENT_TYPES),
}
# Integer columns filled from a bounded wire field: (command type, field).
INTEGERS = {"leverage": (wire.PlaceOrder, "leverage"), "grid_level": (wire.PlaceOrder, "grid_level")}
INT4_MAX = 2**31 - 1


async def _columns(pg: psycopg.AsyncConnection[Any]) -> list[tuple[str, str, str, int | None]]:
    cursor = await pg.execute(
        "SELECT table_name, column_name, data_type, character_maximum_length FROM information_schema.columns"
        " WHERE table_schema = 'public' AND table_name = ANY(%s) ORDER BY table_name, ordinal_position",
        [list(TABLES)],
    )
    return await cursor.fetchall()  # type: ignore[return-value]


async def test_every_text_column_holds_the_longest_value_its_rule_admits(pg: psycopg.AsyncConnection[Any]) -> None:
    checked = set()
    for table, column, data_type, length in await _columns(pg):
        if data_type == "uuid":  # ids: the ledger's own, or a client's checked by the full "id" rule
            assert RULES["id"].max_length == 36
            continue
        if column in RULES:
            rule = RULES[column]
            assert data_type in ("character varying", "text"), (table, column, data_type)
            if data_type == "character varying":
                assert length is not None and rule.max_length <= length, (table, column, rule.max_length, length)
            checked.add(column)
        elif column in VOCABULARIES:
            longest = max(len(value) for value in VOCABULARIES[column])
            assert length is not None and longest <= length, (table, column, longest, length)
            checked.add(column)
    expected = {"user_id", "symbol", "close_reason", "exchange_order_id", "client_order_id", "reject_reason"}
    assert expected | {"fill_id", "fee_currency", "command_id", "exchange", "status", "type"} <= checked


@pytest.mark.parametrize("column", sorted(INTEGERS))
def test_every_integer_column_holds_the_largest_value_the_wire_admits(column: str) -> None:
    command, field = INTEGERS[column]
    info = next(f for f in msgspec.inspect.type_info(command).fields if f.name == field)  # type: ignore[attr-defined]
    types = info.type.types if isinstance(info.type, msgspec.inspect.UnionType) else (info.type,)
    bounded = [t for t in types if isinstance(t, msgspec.inspect.IntType)]
    assert bounded and bounded[0].le is not None and bounded[0].le <= INT4_MAX


@pytest.mark.parametrize("rule", sorted(RULES))
def test_no_rule_admits_nul_control_characters_or_a_trailing_newline(rule: str) -> None:
    text_rule = RULES[rule]
    uuid = "0" * 8 + "-0000-0000-0000-" + "0" * 12
    sample = {"decimal": "1", "uuid": uuid, "id": uuid}.get(rule, "a")
    assert text_rule.matches(sample)
    for bad in (f"{sample}\n", f"{sample}\x00", f"\x00{sample}", f"{sample}\r"):
        assert not text_rule.matches(bad), (rule, bad)


async def test_postgresql_refuses_what_the_rules_keep_out(pg: psycopg.AsyncConnection[Any]) -> None:
    """The reason for the NUL rules: JSONB and text columns refuse it."""
    with pytest.raises(psycopg.DataError):
        await pg.execute("SELECT %s::jsonb", [json.dumps({"note": "a\u0000b"})])
    await pg.rollback()
    with pytest.raises(psycopg.DataError):
        await pg.execute("SELECT %s::text", ["a\x00b"])
    await pg.rollback()


async def test_the_extremes_the_wire_admits_round_trip_through_postgresql(pg: psycopg.AsyncConnection[Any]) -> None:
    longest = "9" * MAX_INTEGER_DIGITS + "." + "9" * MAX_FRACTION_DIGITS
    smallest = "-" + longest
    nested: dict[str, Any] = {"leaf": "\u202eé\U0001f600"}
    for _ in range(METADATA_MAX_DEPTH - 1):
        nested = {"n": nested}
    latest = ms_to_datetime(MAX_TS_MS)
    cursor = await pg.execute(
        "SELECT %s::numeric, %s::numeric, %s::numeric, %s::timestamptz, %s::timestamptz, %s::jsonb",
        [longest, smallest, format_decimal(MAX_AMOUNT), latest, ms_to_datetime(0), json.dumps(nested)],
    )
    row = await cursor.fetchone()
    assert row is not None
    assert [format_decimal(v) for v in row[:3]] == [longest, smallest, format_decimal(MAX_AMOUNT)]
    assert row[3] == latest and row[4] == datetime(1970, 1, 1, tzinfo=UTC)
    assert row[5] == nested


def test_the_wire_timestamp_range_is_pythons_datetime_range() -> None:
    assert ms_to_datetime(MAX_TS_MS) == datetime(9999, 12, 31, 23, 59, 59, 999000, tzinfo=UTC)
    with pytest.raises(OverflowError):
        ms_to_datetime(MAX_TS_MS + 1)


def test_a_fee_on_the_largest_amount_fits_the_decimal_rule() -> None:
    assert RULES["decimal"].matches(format_decimal(MAX_AMOUNT))
    assert not RULES["decimal"].matches(format_decimal(MAX_AMOUNT + 1))
    assert MAX_AMOUNT == Decimal(10) ** MAX_INTEGER_DIGITS - 1
