"""The PostgreSQL schema (``schema.sql``) and applying it.

``schema.sql`` lives at the repository root. An editable install (and a source checkout) finds
it next to the ``ledger`` package; a regular wheel installs it as
``<prefix>/share/trading-ledger/schema.sql``.
"""

from __future__ import annotations

import functools
import sys
import sysconfig
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from psycopg import AsyncConnection

__all__ = ["SCHEMA_LOCK_KEY", "apply_schema", "schema_path", "schema_sql"]

SCHEMA_FILE = "schema.sql"
DATA_SUBDIR = Path("share") / "trading-ledger"

# pg_advisory_xact_lock key that serializes concurrent apply_schema() calls (two `ledger serve`
# starting at once would otherwise race inside CREATE TABLE IF NOT EXISTS).
SCHEMA_LOCK_KEY = 0x4C454447  # "LEDG"


def _candidates() -> list[Path]:
    """Where schema.sql may be, in order of preference."""
    prefixes = [sys.prefix, sysconfig.get_path("data"), sys.base_prefix]
    user_base = sysconfig.get_config_var("userbase")
    if user_base:
        prefixes.append(user_base)
    paths = [Path(__file__).resolve().parent.parent / SCHEMA_FILE]
    for prefix in prefixes:
        path = Path(prefix) / DATA_SUBDIR / SCHEMA_FILE
        if path not in paths:
            paths.append(path)
    return paths


@functools.cache
def schema_path() -> Path:
    """The path of ``schema.sql``; raises FileNotFoundError listing where it looked."""
    candidates = _candidates()
    for path in candidates:
        if path.is_file():
            return path
    looked = ", ".join(str(p) for p in candidates)
    raise FileNotFoundError(f"schema.sql not found (looked in {looked}); reinstall trading-ledger (`make install`)")


def schema_sql() -> str:
    """The text of ``schema.sql`` (idempotent DDL for PostgreSQL 15)."""
    return schema_path().read_text(encoding="utf-8")


async def apply_schema(conn: AsyncConnection[Any]) -> None:
    """Create the ledger's tables and indexes on a psycopg ``AsyncConnection``.

    The whole script runs in one transaction (a savepoint if the caller already has one open,
    in which case committing is up to the caller) under an advisory lock, so concurrent callers
    do not race. The script is idempotent: applying it again changes nothing.
    """
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK_KEY,))
        await conn.execute(schema_sql().encode("utf-8"))
