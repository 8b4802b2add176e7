"""CONTRACT §11 at the edge: every expected failure of the real ``ledger`` console script is ONE
line on stderr and a non-zero exit status (2: the command line or a setting is wrong; 1: the
ledger or a server could not do it). Run as a subprocess against real servers and closed ports."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from ledger.app.servers import free_port
from ledger.config import MAX_SHARDS, ConfigError, Settings
from ledger.domain.values import RULES
from ledger.store.redis_conn import ShardCountMismatch, ensure_shard_count, recorded_shards

LEDGER_BIN = Path(sys.executable).parent / "ledger"
USER_RULE = RULES["user_id"].description
START_REDIS = "start it (`ledger serve` starts a private one) or point --redis-url / LEDGER_REDIS_URL at a running one"
START_POSTGRES = "start it or point --database-url / LEDGER_DATABASE_URL at a running one"
SHARDS_RULE = f"must be a whole number from 1 to {MAX_SHARDS}"
# A command the handler would accept: `submit` refuses any other before it connects.
ORDER = {
    "user_id": "u1",
    "exchange": "okx",
    "symbol": "BTC-USDT-SWAP",
    "side": "buy",
    "order_type": "market",
    "quantity": "0.1",
}


def ledger(home: Path, *args: str, timeout: float = 60.0, **env: str) -> subprocess.CompletedProcess[str]:
    """Run the installed ``ledger`` script in ``home`` with only the given LEDGER_* settings."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("LEDGER_")}
    clean.update(LEDGER_HOME=str(home / ".ledger"), LEDGER_LOG_FORMAT="json", **env)
    return subprocess.run(
        [str(LEDGER_BIN), *args], env=clean, cwd=home, capture_output=True, text=True, timeout=timeout
    )


def one_line(result: subprocess.CompletedProcess[str], status: int) -> str:
    """The single stderr line of a failed run (asserting there is exactly one and the status)."""
    assert result.returncode == status, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and result.stderr.endswith("\n"), result.stderr
    assert result.stdout == ""
    return lines[0]


@pytest.fixture
def closed_port() -> int:
    return free_port()


# --------------------------------------------------------------------------- usage: exit 2


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (
            ["positions", "--user", "x:y"],
            f"ledger positions: argument --user: user_id: must be {USER_RULE} (got 'x:y') "
            "(see `ledger positions --help`)",
        ),
        (
            ["orders", "--user", "alice\n"],
            f"ledger orders: argument --user: user_id: must be {USER_RULE} (got 'alice\\n') "
            "(see `ledger orders --help`)",
        ),
        (
            ["submit", "place_order", "--wait", "-1", "--data", "{}"],
            "ledger submit: argument --wait: must be a number of seconds > 0 (got '-1') (see `ledger submit --help`)",
        ),
        (
            ["submit", "place_order", "--wait", "nan", "--data", "{}"],
            "ledger submit: argument --wait: must be a number of seconds > 0 (got 'nan') (see `ledger submit --help`)",
        ),
        (
            ["submit", "place_order", "--data", '{"user_id": "x:y"}'],
            f"ledger: --data: user_id: must be {USER_RULE} (got 'x:y')",
        ),
        (
            ["submit", "place_order", "--data", '{"user_id": "u1", "command_id": "a b"}'],
            f"ledger: --data: command_id: must be {RULES['command_id'].description} (got 'a b')",
        ),
        (["submit", "place_order", "--data", "[1]"], "ledger: --data: must be a JSON object"),
        (
            ["submit", "place_order", "--data", '{"user_id": "u1"}'],
            "ledger: --data: place_order: Object missing required field `exchange` (MISSING_FIELD): "
            "fix the command; nothing was published",
        ),
        (
            ["submit", "place_order", "--data", json.dumps({**ORDER, "quantity": 0.1})],
            "ledger: --data: place_order: Expected `str`, got `float` - at `$.quantity` (decimals are JSON "
            'strings such as "0.1", never numbers) (INVALID_FIELD): fix the command; nothing was published',
        ),
        (
            ["submit", "plcae_order", "--data", json.dumps(ORDER)],
            "ledger: --data: unknown command type 'plcae_order'; known: adjust_position, adopt_order, cancel_order, "
            "close_position, liquidate_position, open_position, order_accepted, order_cancelled, order_expired, "
            "order_rejected, place_order, record_drift, record_fill, resolve_drift (UNKNOWN_TYPE): fix the command; "
            "nothing was published",
        ),
        (
            ["serve", "--shards", "0"],
            f"ledger serve: argument --shards: LEDGER_SHARDS / --shards: {SHARDS_RULE} (got '0') "
            "(see `ledger serve --help`)",
        ),
        (
            ["history", "--user", "u1", "--limit", "0"],
            "ledger history: argument --limit: must be a whole number from 1 to 10000 (got '0') "
            "(see `ledger history --help`)",
        ),
        (
            ["nope"],
            "ledger: argument command: invalid choice: 'nope' (choose from 'serve', 'submit', 'status', "
            "'positions', 'orders', 'mark', 'history', 'replay', 'export', 'dead', 'markets', 'reconcile', 'verify', "
            "'checkpoint', "
            "'trim', 'rebuild', 'execution', 'demo') "
            "(see `ledger --help`)",
        ),  # fmt: skip
        (
            ["execution", "set", "okx=bogus"],
            "ledger execution set: argument spec: LEDGER_EXECUTION: 'bogus' is not one of paper, external, live "
            "(see `ledger execution set --help`)",
        ),
    ],
)
def test_a_bad_command_line_is_one_line_and_status_2(tmp_path: Path, args: list[str], line: str) -> None:
    assert one_line(ledger(tmp_path, *args), 2) == line


@pytest.mark.parametrize(
    ("env", "line"),
    [
        ({"LEDGER_SHARDS": "0"}, f"ledger: LEDGER_SHARDS / --shards: {SHARDS_RULE} (got '0')"),
        ({"LEDGER_SHARDS": "-1"}, f"ledger: LEDGER_SHARDS / --shards: {SHARDS_RULE} (got '-1')"),
        ({"LEDGER_SHARDS": "1025"}, f"ledger: LEDGER_SHARDS / --shards: {SHARDS_RULE} (got '1025')"),
        (
            {"LEDGER_REDIS_URL": "localhost:6379"},
            "ledger: LEDGER_REDIS_URL / --redis-url: Redis URL must specify one of the following schemes "
            "(redis://, rediss://, unix://): use redis://[:password@]host:port/db",
        ),
        (
            {"LEDGER_REDIS_URL": "redis://127.0.0.1:99999/0"},
            "ledger: LEDGER_REDIS_URL / --redis-url: Port out of range 0-65535: use redis://[:password@]host:port/db",
        ),
        (
            {"LEDGER_LOG_LEVEL": "loud"},
            "ledger: LEDGER_LOG_LEVEL: must be one of debug, info, warning, error, critical (got 'loud')",
        ),
        (
            {"LEDGER_DURABILITY": "sometimes"},
            "ledger: LEDGER_DURABILITY: must be one of always, everysec, off (got 'sometimes')",
        ),
    ],
)
def test_a_bad_setting_is_one_line_and_status_2(tmp_path: Path, env: dict[str, str], line: str) -> None:
    assert one_line(ledger(tmp_path, "status", **env), 2) == line


async def test_serve_with_a_bad_shard_count_writes_nothing(tmp_path: Path, redis: Any, redis_url: str) -> None:
    """Defect 7: `serve --shards 0` recorded shards=0 in ledger:meta and bricked the Redis."""
    for args, env in (
        (["--shards", "0"], {}),
        (["--shards", "-1"], {}),
        ([], {"LEDGER_SHARDS": "0"}),
        ([], {"LEDGER_SHARDS": "-1"}),
    ):
        result = ledger(tmp_path, "serve", "--role", "handler", *args, LEDGER_REDIS_URL=redis_url, **env)
        assert result.returncode == 2, result.stderr
        assert len(result.stderr.splitlines()) == 1
        assert await redis.keys("*") == []
    with pytest.raises(ConfigError) as caught:
        Settings(shards=0)
    assert str(caught.value) == f"LEDGER_SHARDS / --shards: {SHARDS_RULE} (got 0)"
    with pytest.raises(ConfigError, match=r"\(got True\)$"):
        Settings().with_overrides(shards=True)
    with pytest.raises(ConfigError, match=r"\(got -1\)$"):
        await ensure_shard_count(redis, -1)
    assert await redis.keys("*") == []
    assert await ensure_shard_count(redis, 2) == 2
    assert await redis.hgetall("ledger:meta") == {"shards": "2"}


async def test_a_bogus_recorded_shard_count_says_how_to_repair_it(tmp_path: Path, redis: Any, redis_url: str) -> None:
    """A Redis bricked by an older `serve --shards 0` is named, with the repair, not obeyed."""
    await redis.hset("ledger:meta", "shards", "0")
    expected = (
        "ledger:meta records shards='0', which is not a shard count: if this Redis holds no ledger data "
        "yet, delete it (HDEL ledger:meta shards) and start `ledger serve` again"
    )
    with pytest.raises(ShardCountMismatch) as caught:
        await recorded_shards(redis)
    assert str(caught.value) == expected
    for args in (["status"], ["serve", "--role", "handler"], ["submit", "place_order", "--data", json.dumps(ORDER)]):
        assert one_line(ledger(tmp_path, *args, LEDGER_REDIS_URL=redis_url), 1) == f"ledger: {expected}"
    assert await redis.hgetall("ledger:meta") == {"shards": "0"}


# --------------------------------------------------------------------------- servers: exit 1


@pytest.mark.parametrize(
    "args",
    [
        ["status"],
        ["status", "--json"],
        ["positions"],
        ["positions", "--user", "u1", "--exchange", "okx"],
        ["orders", "--user", "u1"],
        ["mark", "okx", "BTC-USDT-SWAP", "45000"],
        ["submit", "place_order", "--data", json.dumps(ORDER)],
        ["serve", "--role", "handler"],
    ],
)
def test_redis_down_is_one_line_and_status_1(tmp_path: Path, closed_port: int, args: list[str]) -> None:
    result = ledger(tmp_path, *args, LEDGER_REDIS_URL=f"redis://127.0.0.1:{closed_port}/0")
    assert one_line(result, 1) == (
        f"ledger: Redis: Error 111 connecting to 127.0.0.1:{closed_port}. Connect call failed "
        f"('127.0.0.1', {closed_port}): {START_REDIS}"
    )


def test_no_redis_configured_is_one_line(tmp_path: Path) -> None:
    assert one_line(ledger(tmp_path, "status"), 1) == (
        "ledger: no redis configured: set LEDGER_REDIS_URL or start `ledger serve` first"
    )


def test_history_with_postgresql_down_is_one_line(tmp_path: Path, closed_port: int) -> None:
    url = f"postgresql://postgres@127.0.0.1:{closed_port}/postgres"
    result = ledger(tmp_path, "history", "--user", "u1", LEDGER_DATABASE_URL=url)
    assert one_line(result, 1) == (
        f'ledger: PostgreSQL: connection failed: connection to server at "127.0.0.1", port {closed_port} '
        f"failed: Connection refused: {START_POSTGRES}"
    )


def test_history_without_the_schema_says_to_apply_it(tmp_path: Path, empty_database_url: str) -> None:
    result = ledger(tmp_path, "history", "--user", "u1", LEDGER_DATABASE_URL=empty_database_url)
    line = one_line(result, 1)
    assert line.startswith('ledger: PostgreSQL: relation "') and line.endswith(
        '" does not exist: start `ledger serve` once: it applies schema.sql'
    )


async def test_submit_without_a_reply_says_how_to_retry(tmp_path: Path, redis: Any, redis_url: str) -> None:
    """No handler runs: the wait ends after --wait (in short blocks, never the socket timeout)."""
    await ensure_shard_count(redis, 1)
    data = json.dumps({**ORDER, "command_id": "c-wait"})
    result = ledger(tmp_path, "submit", "place_order", "--wait", "1.5", "--data", data, LEDGER_REDIS_URL=redis_url)
    assert one_line(result, 1) == (
        "ledger: no reply within 1.5 s (command_id c-wait): check that `ledger serve` runs, then submit again "
        "with the same command_id (it is answered once)"
    )
    assert await redis.xlen("ledger:{0}:commands") == 1
