"""Issue 11 at the edge: ``ledger serve`` refuses to start, in one line and before it touches any
server, while an exchange configured ``live`` has no account (or no markets) for the venue."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tests.blackbox.test_cli_errors import ledger, one_line


async def test_serve_refuses_a_live_exchange_without_credentials(tmp_path: Path, redis: Any, redis_url: str) -> None:
    result = ledger(tmp_path, "serve", "--role", "venue", LEDGER_REDIS_URL=redis_url, LEDGER_EXECUTION="okx=live")
    assert one_line(result, 2) == (
        "ledger: LEDGER_EXECUTION has okx=live but LEDGER_CREDENTIALS is not set: name the venue accounts file "
        "(README, Configuration) or set those exchanges to paper"
    )
    assert await redis.keys("*") == []  # refused before anything was started or written


async def test_serve_refuses_a_live_exchange_the_credentials_do_not_name(
    tmp_path: Path, redis: Any, redis_url: str
) -> None:
    credentials = tmp_path / "venues.json"
    account = {"apiKey": "k", "secret": "never-shown", "users": ["alice"]}
    credentials.write_text(json.dumps({"binance": {"accounts": {"main": account}}}))
    env = {"LEDGER_REDIS_URL": redis_url, "LEDGER_CREDENTIALS": str(credentials)}
    result = ledger(tmp_path, "serve", LEDGER_EXECUTION="binance=live,upbit=live", **env)
    assert one_line(result, 2) == (
        f"ledger: LEDGER_EXECUTION has upbit=live but {credentials} has no upbit account: add one or set upbit=paper"
    )
    credentials.write_text(json.dumps({"okx": {"accounts": {"main": account}}}))
    result = ledger(tmp_path, "serve", "--role", "venue", LEDGER_EXECUTION="okx=live", **env)
    assert one_line(result, 2) == (
        "ledger: LEDGER_CREDENTIALS: okx.accounts.main: password is missing (OKX API keys have a passphrase)"
    )
    assert "never-shown" not in result.stderr
    assert await redis.keys("*") == []
