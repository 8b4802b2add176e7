"""``ledger execution``: the execution mode of each exchange recorded in ``ledger:meta``.

``serve`` (the roles of ``ledger.app.service.EXECUTION_ROLES``) records the modes of its
``LEDGER_EXECUTION`` when none is recorded and refuses to start with other ones; the venues
read them with each batch and step aside for an exchange no longer recorded in their mode
(``consumers.guard``). ``show`` prints them; ``set SPEC`` (the syntax of ``LEDGER_EXECUTION``,
read by the same parser, so an exchange it does not name is ``paper``) rewrites every exchange's
mode, prints what changed and records the switch in the operations stream (``ledger:ops``,
action ``execution``). Switching: stop every ``serve``, ``ledger execution set SPEC``, start
them all with ``LEDGER_EXECUTION=SPEC``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ledger.app.console import print_table
from ledger.config import format_execution
from ledger.domain.enums import Exchange
from ledger.store.keys import META
from ledger.store.operations import record_operation
from ledger.store.redis_conn import record_execution, recorded_execution

ACTION = "execution"
NOT_RECORDED = "(not recorded)"
COLUMNS = ["exchange", "mode"]


async def show_execution(redis: Any) -> dict[str, str | None]:
    """The recorded mode of every exchange: exchange -> mode, None where none is recorded (what
    ``execution show --json`` prints)."""
    recorded = await recorded_execution(redis)
    return {str(exchange): recorded.get(exchange) for exchange in Exchange}


def print_execution(modes: Mapping[str, str | None]) -> None:
    """``show_execution``'s answer as the table ``execution show`` prints."""
    print_table([{"exchange": exchange, "mode": mode or NOT_RECORDED} for exchange, mode in modes.items()], COLUMNS)


async def set_execution(redis: Any, modes: Mapping[Exchange, str], reason: str) -> list[str]:
    """Record ``modes`` (``ledger.config.parse_execution`` of a ``LEDGER_EXECUTION`` spelling);
    return the lines that say what changed, the last one what to start ``serve`` with."""
    setting = format_execution(modes)
    changed = await record_execution(redis, modes)
    if not changed:
        return [f"nothing changed: LEDGER_EXECUTION={setting} is recorded already"]
    detail = {
        "execution": setting,
        "changed": {str(exchange): {"before": before, "after": after} for exchange, (before, after) in changed.items()},
    }
    await record_operation(redis, ACTION, META, reason, detail)
    lines = [f"{exchange}: {before or NOT_RECORDED} -> {after}" for exchange, (before, after) in changed.items()]
    return [*lines, f"recorded: start every serve with LEDGER_EXECUTION={setting}"]
