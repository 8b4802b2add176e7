"""The operations stream: every operator action on the ledger, with its time, actor and reason.

``ledger dead retry`` and ``drop`` (and the repair, trim and rebuild tools) record what they did
in ``ledger:ops`` (``keys.OPERATIONS``) once it is done: one entry per action with ``ts`` (epoch
milliseconds), ``actor`` (``user@host`` of the process), ``action``, ``target`` (what was acted
on, e.g. ``ledger:{0}:dead/1700000000000-0``), ``reason`` (the operator's note) and ``detail``
(a JSON object: the dead letter as it was, the entry a retry published, ...). ``ledger dead ops``
lists them.
"""

from __future__ import annotations

import getpass
import json
import socket
from dataclasses import dataclass
from typing import Any

from ledger.domain.values import ms_to_datetime, now_ms
from ledger.store.keys import OPERATIONS
from ledger.store.redis_conn import text


@dataclass(frozen=True, slots=True)
class Operation:
    id: str
    ts: int
    actor: str
    action: str
    target: str
    reason: str
    detail: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "ts": self.ts,
            "time": iso_time(self.ts),
            "actor": self.actor,
            "action": self.action,
            "target": self.target,
            "reason": self.reason,
            "detail": self.detail,
        }


def iso_time(ms: int) -> str:
    """Epoch milliseconds as ISO 8601 in UTC, to the millisecond."""
    return ms_to_datetime(ms).isoformat(timespec="milliseconds")


def actor() -> str:
    """Who acts: ``user@host`` of this process (``?`` when the OS names no user)."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "?"
    return f"{user}@{socket.gethostname()}"


async def record_operation(
    redis: Any,
    action: str,
    target: str,
    reason: str,
    detail: dict[str, Any] | None = None,
    *,
    stream: str = OPERATIONS,
    keep: int | None = None,
) -> Operation:
    """Append one operator action to ``ledger:ops`` (or ``stream``, keeping only its last
    ``keep`` entries); return it as recorded."""
    ts = now_ms()
    who = actor()
    body = detail or {}
    fields = {
        "ts": str(ts),
        "actor": who,
        "action": action,
        "target": target,
        "reason": reason,
        "detail": json.dumps(body, sort_keys=True, default=str),
    }
    entry_id = text(await redis.xadd(stream, fields, maxlen=keep, approximate=False))
    return Operation(entry_id, ts, who, action, target, reason, body)


async def operations(redis: Any, limit: int) -> list[Operation]:
    """The last ``limit`` operations, oldest first."""
    entries = await redis.xrevrange(OPERATIONS, count=limit)
    found = []
    for entry_id, raw in reversed(entries):
        fields = {text(k): text(v) for k, v in raw.items()}
        found.append(
            Operation(
                text(entry_id),
                int(fields.get("ts") or 0),
                fields.get("actor", ""),
                fields.get("action", ""),
                fields.get("target", ""),
                fields.get("reason", ""),
                json.loads(fields.get("detail") or "{}"),
            )
        )
    return found
