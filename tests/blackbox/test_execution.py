"""``ledger execution`` and the execution mode guard of ``ledger serve``, as subprocesses against a
real Redis: the recorded modes shown and set, a ``serve`` with other modes refused in one line,
and a running ``serve`` whose paper venue steps aside once ``execution set`` moves an exchange."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path
from typing import Any

from ledger.store.eventstore import EventStore
from ledger.store.keys import ShardKeys
from tests.blackbox.test_cli_errors import ORDER as CLI_ORDER
from tests.blackbox.test_cli_errors import ledger, one_line
from tests.live_helpers import wait_for
from tests.pipeline_helpers import LEDGER_BIN, ledger_env

NOTHING_RECORDED = "exchange  mode\nokx       (not recorded)\nbinance   (not recorded)\nupbit     (not recorded)\n"
ORDER = {**CLI_ORDER, "price": "45000"}  # a market order the paper venue fills at its price
STEPPED_ASIDE = (
    "okx is recorded as live but this serve executes it as paper: it no longer executes okx; "
    "stop this serve or restart it with LEDGER_EXECUTION=okx=live"
)


def _ok(result: subprocess.CompletedProcess[str]) -> str:
    assert (result.returncode, result.stderr) == (0, ""), result
    return result.stdout


async def test_execution_show_and_set_print_exactly_what_is_recorded(
    tmp_path: Path, redis: Any, redis_url: str
) -> None:
    env = {"LEDGER_REDIS_URL": redis_url}
    assert _ok(ledger(tmp_path, "execution", "show", **env)) == NOTHING_RECORDED
    assert json.loads(_ok(ledger(tmp_path, "execution", "show", "--json", **env))) == {
        "okx": None,
        "binance": None,
        "upbit": None,
    }
    assert _ok(ledger(tmp_path, "execution", "set", "okx=live,upbit=external", **env)) == (
        "okx: (not recorded) -> live\n"
        "binance: (not recorded) -> paper\n"
        "upbit: (not recorded) -> external\n"
        "recorded: start every serve with LEDGER_EXECUTION=okx=live,upbit=external\n"
    )
    assert _ok(ledger(tmp_path, "execution", "set", "okx=live", **env)) == (
        "upbit: external -> paper\nrecorded: start every serve with LEDGER_EXECUTION=okx=live\n"
    )
    assert _ok(ledger(tmp_path, "execution", "show", **env)) == (
        "exchange  mode\nokx       live\nbinance   paper\nupbit     paper\n"
    )
    assert json.loads(_ok(ledger(tmp_path, "execution", "show", "--json", **env))) == {
        "okx": "live",
        "binance": "paper",
        "upbit": "paper",
    }
    assert await redis.hgetall("ledger:meta") == {
        "execution:okx": "live",
        "execution:binance": "paper",
        "execution:upbit": "paper",
    }


async def test_serve_with_other_modes_than_the_recorded_ones_is_refused(
    tmp_path: Path, redis: Any, redis_url: str
) -> None:
    env = {"LEDGER_REDIS_URL": redis_url}
    _ok(ledger(tmp_path, "execution", "set", "okx=live", **env))
    expected = (
        "ledger: okx is recorded as live but this serve has okx=paper: to switch, stop every serve, run "
        "`ledger execution set paper` and start them all with LEDGER_EXECUTION=paper; to keep the recorded "
        "modes, start this serve with LEDGER_EXECUTION=okx=live"
    )
    for roles in (["--role", "paper"], ["--role", "handler", "--role", "venue"]):
        assert one_line(ledger(tmp_path, "serve", *roles, **env), 1) == expected
    assert await redis.hgetall("ledger:meta") == {
        "execution:okx": "live",
        "execution:binance": "paper",
        "execution:upbit": "paper",
        "shards": "1",
    }


async def test_a_running_serve_stops_filling_an_exchange_set_to_live(
    tmp_path: Path, redis: Any, redis_url: str
) -> None:
    log = tmp_path / "serve.log"
    env = ledger_env(redis_url, LEDGER_PROCESSES="1", LEDGER_HOME=str(tmp_path / ".ledger"))
    with open(log, "wb") as out:
        serve = subprocess.Popen(
            [str(LEDGER_BIN), "serve", "--role", "handler", "--role", "paper"],
            cwd=tmp_path,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        store = EventStore(redis, 0)

        def submit(command_id: str) -> str:
            data = json.dumps({**ORDER, "command_id": command_id})
            reply = json.loads(
                _ok(ledger(tmp_path, "submit", "place_order", "--data", data, LEDGER_REDIS_URL=redis_url))
            )
            assert reply["status"] == "accepted", reply
            return str(reply["order_id"])

        async def status(order_id: str) -> str:
            order = await store.order(order_id)
            return "" if order is None else str(order.status)

        before = submit("before")
        await wait_for(lambda: _is(status(before), "filled"), "the paper fill of the order placed before the switch")
        await wait_for(lambda: _caught_up(redis), "the handler and the paper venue to handle every entry")
        assert _ok(ledger(tmp_path, "execution", "set", "okx=live", LEDGER_REDIS_URL=redis_url)) == (
            "okx: paper -> live\nrecorded: start every serve with LEDGER_EXECUTION=okx=live\n"
        )
        after = submit("after")

        async def stepped_aside() -> list[dict[str, Any]]:
            lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
            return [line for line in lines if line["event"] == STEPPED_ASIDE]

        (line,) = await wait_for(stepped_aside, "the paper venue's error line")
        assert (line["level"], line["exchange"], line["recorded"], line["mode"]) == ("error", "okx", "live", "paper")
        await wait_for(lambda: _caught_up(redis), "the paper venue to acknowledge the order placed after")
        assert await status(after) == "pending"
        commands = [json.loads(f["data"])["command_id"] for _id, f in await redis.xrange(ShardKeys(0).commands)]
        assert commands == ["before", f"paper:{before}:accept", f"paper:{before}:fill", "after"]
    finally:
        serve.send_signal(signal.SIGTERM)
        assert serve.wait(timeout=30) == 0, log.read_text()


async def _is(value: Any, expected: str) -> bool:
    return bool(await value == expected)


async def _caught_up(redis: Any) -> bool:
    """Whether the handler read every command and the paper venue every event, none pending."""
    keys = ShardKeys(0)
    for stream, name in ((keys.commands, "ledger-handler"), (keys.events, "ledger-paper")):
        last = (await redis.xinfo_stream(stream))["last-generated-id"]
        (group,) = [g for g in await redis.xinfo_groups(stream) if g["name"] == name]
        if group["last-delivered-id"] != last or group["pending"]:
            return False
    return True
