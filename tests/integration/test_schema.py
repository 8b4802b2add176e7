"""schema.sql against a real PostgreSQL: idempotent, the right columns, constraints that bite."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import errors

from projections.schema import apply_schema, schema_path, schema_sql

UUID_ = ("uuid", None, "NO")
TS = ("timestamp with time zone", None, "NO")


def vc(length: int, nullable: str = "NO") -> tuple[str, int, str]:
    return ("character varying", length, nullable)


NUM = ("numeric", None, "YES")
NUM_NN = ("numeric", None, "NO")

# column -> (data_type, character_maximum_length, is_nullable)
EXPECTED_COLUMNS: dict[str, dict[str, tuple[str, int | None, str]]] = {
    "positions": {
        "id": UUID_,
        "user_id": vc(64),
        "exchange": vc(32),
        "symbol": vc(48),
        "side": vc(16),
        "size": NUM,
        "entry_price": NUM,
        "exit_price": NUM,
        "leverage": ("integer", None, "NO"),
        "realized_pnl": NUM,
        "gross_pnl": NUM,
        "unrealized_pnl": NUM,
        "fees": NUM,
        "status": vc(16),
        "close_reason": vc(64, "YES"),
        "version": ("integer", None, "NO"),
        "metadata": ("jsonb", None, "NO"),
        "created_at": TS,
        "updated_at": TS,
        "closed_at": ("timestamp with time zone", None, "YES"),
    },
    "orders": {
        "id": UUID_,
        "user_id": vc(64),
        "exchange": vc(32),
        "symbol": vc(48),
        "side": vc(16),
        "order_type": vc(32),
        "quantity": NUM_NN,
        "price": NUM,
        "trigger_price": NUM,
        "filled_qty": NUM_NN,
        "avg_fill_price": NUM,
        "status": vc(16),
        "exchange_order_id": vc(128, "YES"),
        "client_order_id": vc(64, "YES"),
        "position_id": ("uuid", None, "YES"),
        "position_side": vc(8, "YES"),
        "reduce_only": ("boolean", None, "NO"),
        "grid_level": ("integer", None, "YES"),
        "reject_reason": ("text", None, "YES"),
        "version": ("integer", None, "NO"),
        "metadata": ("jsonb", None, "NO"),
        "created_at": TS,
        "updated_at": TS,
    },
    "fills": {
        "order_id": UUID_,
        "fill_id": vc(128),
        "event_id": UUID_,
        "user_id": vc(64),
        "exchange": vc(32),
        "symbol": vc(48),
        "side": vc(16),
        "position_id": ("uuid", None, "YES"),
        "quantity": NUM_NN,
        "price": NUM_NN,
        "fee": NUM_NN,
        "fee_currency": vc(32, "YES"),
        "overfill": ("boolean", None, "NO"),
        "late": ("boolean", None, "NO"),
        "ts": TS,
    },
    "ledger_events": {
        "event_id": UUID_,
        "shard": ("integer", None, "NO"),
        "entry_id": vc(41),
        "entry_ms": ("bigint", None, "NO"),
        "entry_seq": ("bigint", None, "NO"),
        "type": vc(64),
        "aggregate_id": UUID_,
        "version": ("integer", None, "NO"),
        "command_id": vc(64, "YES"),
        "user_id": vc(64),
        "data": ("jsonb", None, "NO"),
        "ts": TS,
        "data_raw": ("text", None, "YES"),  # the hash chain (ledger.store.chain): NULL before it existed
        "chain_n": ("bigint", None, "YES"),
        "chain_hash": ("text", None, "YES"),
    },
    "projector_checkpoints": {
        "projector": vc(64),
        "shard": ("integer", None, "NO"),
        "entry_ms": ("bigint", None, "NO"),
        "entry_seq": ("bigint", None, "NO"),
        "updated_at": TS,
    },
    "projector_gaps": {
        "shard": ("integer", None, "NO"),
        "entry_id": vc(41),
        "entry_ms": ("bigint", None, "NO"),
        "entry_seq": ("bigint", None, "NO"),
        "type": vc(64),
        "event_id": ("uuid", None, "YES"),
        "aggregate_id": ("uuid", None, "YES"),
        "code": vc(32),
        "reason": ("text", None, "NO"),
        "recorded_at": TS,
        "filled_at": ("timestamp with time zone", None, "YES"),
    },
    "ledger_outcomes": {
        "shard": ("integer", None, "NO"),
        "user_id": vc(64),
        "command_id": vc(64),
        "reply": ("text", None, "NO"),
        "archived_at": TS,
    },
}

EXPECTED_INDEXES = {
    ("positions", "positions_pkey"): "(id)",
    ("positions", "positions_user_exchange_idx"): "(user_id, exchange)",
    ("positions", "positions_status_idx"): "(status)",
    ("orders", "orders_pkey"): "(id)",
    ("orders", "orders_exchange_order_id_key"): "(exchange, exchange_order_id)",
    ("orders", "orders_user_exchange_idx"): "(user_id, exchange)",
    ("orders", "orders_status_idx"): "(status)",
    ("fills", "fills_pkey"): "(order_id, fill_id)",
    ("fills", "fills_event_id_key"): "(event_id)",
    ("fills", "fills_user_exchange_ts_idx"): "(user_id, exchange, ts)",
    ("ledger_events", "ledger_events_pkey"): "(event_id)",
    ("ledger_events", "ledger_events_entry_key"): "(shard, entry_ms, entry_seq)",
    ("ledger_events", "ledger_events_aggregate_version_key"): "(aggregate_id, version)",
    ("ledger_events", "ledger_events_user_ts_idx"): "(user_id, ts)",
    ("projector_checkpoints", "projector_checkpoints_pkey"): "(projector, shard)",
    ("projector_gaps", "projector_gaps_pkey"): "(shard, entry_ms, entry_seq)",
    ("ledger_outcomes", "ledger_outcomes_pkey"): "(shard, user_id, command_id)",
}

CATALOG_SNAPSHOT = """
SELECT 'column', table_name || '.' || column_name || ' ' || data_type || ' '
       || coalesce(column_default, '-') || ' ' || is_nullable
  FROM information_schema.columns WHERE table_schema = 'public'
UNION ALL
SELECT 'constraint', conrelid::regclass::text || '.' || conname || ' '
       || pg_get_constraintdef(oid)
  FROM pg_constraint WHERE connamespace = 'public'::regnamespace
UNION ALL
SELECT 'index', indexdef FROM pg_indexes WHERE schemaname = 'public'
ORDER BY 1, 2
"""


async def _snapshot(conn: psycopg.AsyncConnection[Any]) -> list[tuple[str, str]]:
    cur = await conn.execute(CATALOG_SNAPSHOT)
    return await cur.fetchall()


def test_schema_file_is_the_repository_root_one() -> None:
    assert schema_path() == Path(__file__).resolve().parents[2] / "schema.sql"
    code = "\n".join(line.split("--")[0] for line in schema_sql().splitlines()).upper()
    assert code.count("CREATE TABLE IF NOT EXISTS ") == 7
    assert code.count("CREATE INDEX IF NOT EXISTS ") == 6
    assert code.count("CREATE ") == 13
    # Money columns are unconstrained NUMERIC: no precision anywhere.
    assert "DECIMAL" not in code
    assert "NUMERIC(" not in code.replace(" ", "")


async def test_schema_loads_twice_into_a_fresh_database(empty_database_url: str) -> None:
    async with await psycopg.AsyncConnection.connect(empty_database_url, autocommit=True) as conn:
        assert await _snapshot(conn) == []

        await apply_schema(conn)
        first = await _snapshot(conn)
        await apply_schema(conn)
        # Plain text of the file too, as `psql -f schema.sql` would send it.
        await conn.execute(schema_sql().encode())
        second = await _snapshot(conn)

    assert first == second
    tables = {row[1].split(".")[0] for row in first if row[0] == "column"}
    assert tables == set(EXPECTED_COLUMNS)


async def test_apply_schema_commits_on_a_non_autocommit_connection(
    empty_database_url: str,
) -> None:
    async with await psycopg.AsyncConnection.connect(empty_database_url) as conn:
        await apply_schema(conn)
    async with await psycopg.AsyncConnection.connect(empty_database_url) as other:
        cur = await other.execute("SELECT to_regclass('ledger_events')::text")
        assert await cur.fetchone() == ("ledger_events",)


async def test_tables_and_columns_have_the_specified_types(
    pg: psycopg.AsyncConnection[Any],
) -> None:
    cur = await pg.execute(
        """
        SELECT table_name, column_name, data_type, character_maximum_length, is_nullable,
               numeric_precision, numeric_scale
          FROM information_schema.columns
         WHERE table_schema = 'public'
        """
    )
    actual: dict[str, dict[str, tuple[str, int | None, str]]] = {}
    for table, column, data_type, length, nullable, precision, scale in await cur.fetchall():
        actual.setdefault(table, {})[column] = (data_type, length, nullable)
        if data_type == "numeric":
            # Unconstrained NUMERIC: no precision/scale that could truncate values.
            assert (precision, scale) == (None, None), f"{table}.{column}"
    assert actual == EXPECTED_COLUMNS


async def test_indexes_and_unique_constraints(pg: psycopg.AsyncConnection[Any]) -> None:
    cur = await pg.execute("SELECT tablename, indexname, indexdef FROM pg_indexes WHERE schemaname = 'public'")
    actual = {
        (table, name): definition[definition.rindex(" (") + 1 :] for table, name, definition in await cur.fetchall()
    }
    assert actual == EXPECTED_INDEXES


async def test_defaults(pg: psycopg.AsyncConnection[Any]) -> None:
    position_id, order_id = uuid.uuid4(), uuid.uuid4()
    await pg.execute(
        "INSERT INTO positions (id, user_id, exchange, symbol, side, status, version)"
        " VALUES (%s, 'u1', 'okx', 'BTC-USDT-SWAP', 'long', 'open', 1)",
        (position_id,),
    )
    await pg.execute(
        "INSERT INTO orders (id, user_id, exchange, symbol, side, order_type, quantity, status,"
        " version) VALUES (%s, 'u1', 'okx', 'BTC-USDT-SWAP', 'buy', 'market', 0.1, 'pending', 1)",
        (order_id,),
    )
    cur = await pg.execute("SELECT leverage, metadata, created_at IS NOT NULL, closed_at FROM positions")
    assert await cur.fetchone() == (1, {}, True, None)
    cur = await pg.execute("SELECT filled_qty, reduce_only, metadata, quantity::text FROM orders")
    assert await cur.fetchone() == (Decimal("0"), False, {}, "0.1")


async def test_numeric_columns_store_wide_and_28_digit_values_exactly(
    pg: psycopg.AsyncConnection[Any],
) -> None:
    wide = Decimal("12345678901234567890.123456789012345678")  # 38 digits, 18 after the point
    tiny = Decimal("0.000000000123456789")  # below the seed's DECIMAL(20, 8)
    average = Decimal("43210.98765432109876543210987")  # 28 significant digits
    await pg.execute(
        "INSERT INTO positions (id, user_id, exchange, symbol, side, size, entry_price,"
        " exit_price, status, version) VALUES (%s, 'u1', 'binance', 'PEPE/USDT', 'long',"
        " %s, %s, %s, 'closed', 3)",
        (uuid.uuid4(), wide, tiny, average),
    )
    cur = await pg.execute("SELECT size, entry_price, exit_price, size::text FROM positions")
    assert await cur.fetchone() == (wide, tiny, average, "12345678901234567890.123456789012345678")


async def test_check_constraints_reject_bad_values(pg: psycopg.AsyncConnection[Any]) -> None:
    with pytest.raises(errors.CheckViolation) as exc:
        await pg.execute(
            "INSERT INTO positions (id, user_id, exchange, symbol, side, status, version)"
            " VALUES (%s, 'u1', 'okx', 'BTC-USDT-SWAP', 'long', 'archived', 1)",
            (uuid.uuid4(),),
        )
    assert exc.value.diag.constraint_name == "positions_status_check"

    with pytest.raises(errors.CheckViolation) as exc:
        await pg.execute(
            "INSERT INTO positions (id, user_id, exchange, symbol, side, status, version)"
            " VALUES (%s, 'u1', 'okx', 'BTC-USDT-SWAP', 'buy', 'open', 1)",
            (uuid.uuid4(),),
        )
    assert exc.value.diag.constraint_name == "positions_side_check"

    order_sql = (
        "INSERT INTO orders (id, user_id, exchange, symbol, side, order_type, quantity, status,"
        " position_side, version) VALUES (%s, 'u1', 'okx', 'BTC-USDT-SWAP', 'buy', %s, 1, %s,"
        " %s, 1)"
    )
    for order_type, status, position_side, constraint in [
        ("market", "done", None, "orders_status_check"),
        ("iceberg", "open", None, "orders_order_type_check"),
        ("limit", "open", "both", "orders_position_side_check"),
    ]:
        with pytest.raises(errors.CheckViolation) as exc:
            await pg.execute(order_sql, (uuid.uuid4(), order_type, status, position_side))
        assert exc.value.diag.constraint_name == constraint

    # Every contract status is accepted.
    for status in (
        "pending", "open", "partially_filled", "pending_cancel",
        "filled", "cancelled", "rejected", "expired",
    ):  # fmt: skip
        await pg.execute(order_sql, (uuid.uuid4(), "take_profit_market", status, "short"))
    cur = await pg.execute("SELECT count(*) FROM orders")
    assert await cur.fetchone() == (8,)


async def test_exchange_order_id_is_unique_per_exchange(pg: psycopg.AsyncConnection[Any]) -> None:
    sql = (
        "INSERT INTO orders (id, user_id, exchange, symbol, side, order_type, quantity, status,"
        " exchange_order_id, version) VALUES (%s, 'u1', %s, 'BTC/USDT', 'buy', 'limit', 1,"
        " 'open', %s, 1)"
    )
    await pg.execute(sql, (uuid.uuid4(), "okx", "123456"))
    await pg.execute(sql, (uuid.uuid4(), "binance", "123456"))  # another venue: fine
    await pg.execute(sql, (uuid.uuid4(), "okx", None))
    await pg.execute(sql, (uuid.uuid4(), "okx", None))  # not yet acknowledged: fine
    with pytest.raises(errors.UniqueViolation) as exc:
        await pg.execute(sql, (uuid.uuid4(), "okx", "123456"))
    assert exc.value.diag.constraint_name == "orders_exchange_order_id_key"


async def test_fills_primary_key_rejects_a_duplicate_fill(
    pg: psycopg.AsyncConnection[Any],
) -> None:
    sql = (
        "INSERT INTO fills (order_id, fill_id, event_id, user_id, exchange, symbol, side,"
        " quantity, price, ts) VALUES (%s, %s, %s, 'u1', 'okx', 'BTC-USDT-SWAP', 'buy',"
        " 0.05, 50000, %s)"
    )
    order_id, other_order = uuid.uuid4(), uuid.uuid4()
    now = datetime.now(UTC)
    await pg.execute(sql, (order_id, "t-1", uuid.uuid4(), now))
    await pg.execute(sql, (order_id, "t-2", uuid.uuid4(), now))
    await pg.execute(sql, (other_order, "t-1", uuid.uuid4(), now))  # same trade id, other order
    with pytest.raises(errors.UniqueViolation) as exc:
        await pg.execute(sql, (order_id, "t-1", uuid.uuid4(), now))
    assert exc.value.diag.constraint_name == "fills_pkey"
    cur = await pg.execute("SELECT count(*), sum(quantity), min(fee), bool_or(overfill) FROM fills")
    assert await cur.fetchone() == (3, Decimal("0.15"), Decimal("0"), False)


async def test_ledger_events_reject_a_duplicate_event(pg: psycopg.AsyncConnection[Any]) -> None:
    sql = (
        "INSERT INTO ledger_events (event_id, shard, entry_id, entry_ms, entry_seq, type,"
        " aggregate_id, version, command_id, user_id, data, ts) VALUES"
        " (%s, 0, %s, %s, %s, 'OrderPlaced', %s, %s, 'c-1', 'u1', '{}', now())"
    )
    event_id, aggregate = uuid.uuid4(), uuid.uuid4()
    await pg.execute(sql, (event_id, "1700000000000-0", 1700000000000, 0, aggregate, 1))

    with pytest.raises(errors.UniqueViolation) as exc:
        await pg.execute(sql, (event_id, "1700000000001-0", 1700000000001, 0, uuid.uuid4(), 1))
    assert exc.value.diag.constraint_name == "ledger_events_pkey"

    with pytest.raises(errors.UniqueViolation) as exc:  # same stream entry
        await pg.execute(sql, (uuid.uuid4(), "1700000000000-0", 1700000000000, 0, uuid.uuid4(), 1))
    assert exc.value.diag.constraint_name == "ledger_events_entry_key"

    with pytest.raises(errors.UniqueViolation) as exc:  # same aggregate version
        await pg.execute(sql, (uuid.uuid4(), "1700000000002-0", 1700000000002, 0, aggregate, 1))
    assert exc.value.diag.constraint_name == "ledger_events_aggregate_version_key"

    cur = await pg.execute("SELECT count(*) FROM ledger_events")
    assert await cur.fetchone() == (1,)
