"""A malformed command records no outcome; a rejected one does (issue 7, defect 16; CONTRACT §3).

Black-box on the wire: raw XADD of hand-written JSON, replies read with LRANGE; the command
handler of shard 0 runs in bursts against a real Redis.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from consumers.command_handler import handler_role
from ledger.config import Settings, parse_execution

COMMANDS = "ledger:{0}:commands"
PLACE = {
    "command_id": "retry-1",
    "user_id": "alice",
    "exchange": "okx",
    "symbol": "BTC-USDT-SWAP",
    "side": "buy",
    "order_type": "market",
}


async def _send(redis: Any, tmp_path: Path, type_name: str, data: dict[str, Any]) -> list[dict[str, Any]]:
    settings = Settings(shards=1, execution=parse_execution("external"), home=tmp_path)
    (handler, _outcome_reader) = await handler_role(redis, settings)
    await redis.xadd(COMMANDS, {"type": type_name, "data": json.dumps(data)})
    await handler.burst()
    replies = await redis.lrange(f"ledger:{{0}}:reply:{data['user_id']}:{data['command_id']}", 0, -1)
    return [json.loads(r) for r in replies]


async def test_a_malformed_command_fixed_and_republished_with_its_command_id_executes(
    redis: Any, tmp_path: Path
) -> None:
    (first,) = await _send(redis, tmp_path, "place_order", {**PLACE, "quantity": "1e5"})
    assert first["status"] == "rejected" and first["error"]["code"] == "INVALID_FIELD"
    assert await redis.xlen("ledger:{0}:dead") == 1
    assert await redis.xlen("ledger:{0}:events") == 0

    (second,) = await _send(redis, tmp_path, "place_order", {**PLACE, "quantity": "100000"})

    assert second["status"] == "accepted" and second["order_id"]
    assert [e["type"] for e in second["events"]] == ["OrderPlaced"]
    assert await redis.xlen("ledger:{0}:events") == 1


async def test_a_command_the_decider_rejected_keeps_its_outcome(redis: Any, tmp_path: Path) -> None:
    close = {"command_id": "close-1", "user_id": "alice", "position_id": "00000000-0000-4000-8000-000000000000"}
    (first,) = await _send(redis, tmp_path, "close_position", close)
    assert first["status"] == "rejected" and first["error"]["code"] == "UNKNOWN_POSITION"

    (again,) = await _send(redis, tmp_path, "close_position", {**close, "reason": "retry"})

    assert again == first
    assert await redis.xlen("ledger:{0}:dead") == 0
