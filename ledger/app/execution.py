"""``ledger execution``: the execution mode of each exchange recorded in ``ledger:meta``.

``serve`` (the roles of ``ledger.app.service.EXECUTION_ROLES``) records the modes of its
``LEDGER_EXECUTION`` when none is recorded and refuses to start with other ones; the venues
read them with each batch and step aside for an exchange no longer recorded in their mode
(``consumers.guard``). ``show`` prints them; ``set SPEC`` (the syntax of ``LEDGER_EXECUTION``,
read by the same parser, so an exchange it does not name is ``paper``) rewrites every exchange's
mode, prints what changed and records the switch in the operations stream (``ledger:ops``,
action ``execution``). Switching: stop every ``serve``, ``ledger execution set SPEC``, start
them all with ``LEDGER_EXECUTION=SPEC``.

The mode is recorded per exchange, not per order: an order placed before a switch and read after
it by a venue of the new mode could be executed by the venues of both modes. So ``set`` ends with
a warning naming every group that takes orders on their way to a venue (the handler, the paper
and the live venue) and has not handled every entry of its shard yet (``in_flight``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from consumers import command_handler, paper, venue
from ledger.app.console import print_table
from ledger.config import format_execution
from ledger.domain.enums import Exchange
from ledger.store.keys import META, ShardKeys
from ledger.store.operations import record_operation
from ledger.store.redis_conn import entry_order, record_execution, recorded_execution, recorded_shards, text

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
    lines.append(f"recorded: start every serve with LEDGER_EXECUTION={setting}")
    busy = await in_flight(redis)
    if busy:
        lines.append(
            f"warning: not every entry is handled yet by {', '.join(busy)}: an order placed before the switch may "
            "still be executed by a venue of the new mode too; wait until `ledger status` shows no lag and nothing "
            "pending for them before starting the serves"
        )
    return lines


async def in_flight(redis: Any) -> list[str]:
    """The groups taking orders to a venue that have not handled every entry of their shard's
    stream (unread or pending), as ``<group> on shard <n>``."""
    found = []
    for shard in range(await recorded_shards(redis) or 0):
        keys = ShardKeys(shard)
        for stream, names in ((keys.commands, (command_handler.GROUP,)), (keys.events, (paper.GROUP, venue.GROUP))):
            if not await redis.exists(stream):
                continue
            last = entry_order(text((await redis.xinfo_stream(stream))["last-generated-id"]))
            for group in await redis.xinfo_groups(stream):
                name = text(group["name"])
                behind = entry_order(text(group["last-delivered-id"])) < last
                if name in names and (group["pending"] or behind):
                    found.append(f"{name} on shard {shard}")
    return found
