"""Every Redis key the ledger reads or writes, built in one place (CONTRACT §2, §6).

Shard keys carry the hash tag ``{s}`` so that a Redis Cluster keeps a shard on one slot. The
legacy live-state keys carry no tag: they are written by the projection, never by a script.
Builders validate the identifiers they put into a key.
"""

from __future__ import annotations

import zlib

from ledger.values import check_identifier

META = "ledger:meta"
MARKS_PREFIX = "marks:"


def shard_of(user_id: str, shards: int) -> int:
    """The shard of a user: zlib CRC-32 of the UTF-8 user id modulo the shard count."""
    return zlib.crc32(user_id.encode()) % shards


class ShardKeys:
    """The keys of one shard."""

    __slots__ = (
        "shard",
        "commands",
        "events",
        "dead",
        "orders",
        "positions",
        "slots",
        "sequence",
        "outcomes",
        "checkpoint",
    )

    def __init__(self, shard: int) -> None:
        tag = f"ledger:{{{shard}}}"
        self.shard = shard
        self.commands = f"{tag}:commands"
        self.events = f"{tag}:events"
        self.dead = f"{tag}:dead"
        # Aggregate snapshots (JSON per id), open-position slots and the per-user concurrency
        # token, all written by the append script with the events they come from.
        self.orders = f"{tag}:orders"
        self.positions = f"{tag}:positions"
        self.slots = f"{tag}:slots"
        self.sequence = f"{tag}:sequence"
        # Every command outcome ever given, by "user_id:command_id" (deduplication).
        self.outcomes = f"{tag}:outcomes"
        # The live projection's position in the event log.
        self.checkpoint = f"{tag}:projection"

    def reply(self, user_id: str, command_id: str) -> str:
        check_identifier("user_id", user_id)
        check_identifier("command_id", command_id)
        return f"ledger:{{{self.shard}}}:reply:{user_id}:{command_id}"


def outcome_field(user_id: str, command_id: str) -> str:
    return f"{user_id}:{command_id}"


def marks(exchange: str) -> str:
    return f"{MARKS_PREFIX}{exchange}"
