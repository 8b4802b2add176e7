"""Dead letters for operators: ``ledger dead list|show|retry|drop|ops``.

A dead letter (``ledger:{s}:dead``, written by ``consumers.deadletter``) is the original entry's
fields plus ``dead_*`` fields: code, reason, source stream, consumer group, source entry id and
time. Its id is its entry id in the dead stream (unique per shard: give ``--shard`` when two
shards hold the same id).

**Retry.** What a retry does depends on where the entry came from:

* a *command* (``ledger:{s}:commands``) is published again as a new command entry, as it was
  or with a fixed ``type`` and ``data``, on the shard of its ``user_id`` (a ``WRONG_SHARD``
  command reaches its own shard). Its reply key is cleared in the same step as the publish, so
  the reply found there afterwards is the new one. The same ``command_id`` is fine: a malformed
  command recorded no outcome (CONTRACT §3), and a republished one that did (a command
  dead-lettered after its append) gets its first outcome again. The dead letter is removed
  after the publish, so a crash in between leaves it to retry again, never a lost command;
* an *event* (``ledger:{s}:events``) is never edited: it is handled again by the consumer group
  that dead-lettered it, from its original entry. One atomic step on the shard's slot removes the
  dead letter and its index field, resets the group's try counter of the entry and adds the
  entry id to the group's retry set (``keys.retries``); the group's runner handles it alone
  within a second, with fresh tries (``consumers.runner``), and dead-letters it again if it
  still fails. The entry must still be in the stream and the group must exist. (The live
  projection applies the log in order, not deliveries: an entry before its checkpoint is applied
  already, or skipped for good when it cannot be decoded, so re-running it there changes nothing.)

**Drop** removes the dead letter and its index field, with a note. Every retry and drop is
recorded in the operations stream (``ledger.store.operations``) with the dead letter as it was.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from consumers.deadletter import index_field
from ledger.app.console import CliError, shard_count
from ledger.domain.values import RULES
from ledger.store.keys import ShardKeys, dead_index, retries, shard_of, tries
from ledger.store.operations import iso_time, record_operation
from ledger.store.redis_conn import text

DEAD_PREFIX = "dead_"  # the fields a dead letter adds to the original entry's
REASON_WIDTH = 60  # a reason is cut to this many characters in a terminal listing (show gives it whole)
FIELD_WIDTH = 40  # any other text column of a terminal listing is cut to this many characters
TS = re.compile(r"[0-9]{1,15}")
ENTRY_ID = re.compile(r"[0-9]{1,20}-[0-9]{1,20}")

# KEYS[1] dead stream, KEYS[2] dead index. ARGV[1] dead entry id, ARGV[2] index field.
# Removes the dead letter, and its index field when the field names it.
_REMOVE_LETTER = """
local removed = redis.call('XDEL', KEYS[1], ARGV[1])
if redis.call('HGET', KEYS[2], ARGV[2]) == ARGV[1] then
  redis.call('HDEL', KEYS[2], ARGV[2])
end
"""
# Returns 1 if the dead letter was there.
_REMOVE = _REMOVE_LETTER + "return removed\n"

# KEYS[1] dead stream, KEYS[2] dead index, KEYS[3] source stream, KEYS[4] the group's try
# counters, KEYS[5] the group's retry set. ARGV[1] dead entry id, ARGV[2] index field, ARGV[3]
# source entry id. Returns 'gone' (no such dead letter), 'trimmed' (the source entry is gone) or 'ok'.
_RETRY_EVENT = (
    """
if #redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[1]) == 0 then
  return 'gone'
end
if #redis.call('XRANGE', KEYS[3], ARGV[3], ARGV[3]) == 0 then
  return 'trimmed'
end
redis.call('HDEL', KEYS[4], ARGV[3], ARGV[3] .. ':error')
redis.call('SADD', KEYS[5], ARGV[3])
"""
    + _REMOVE_LETTER
    + "return 'ok'\n"
)

# KEYS[1] command stream, KEYS[2] the command's reply list or nothing. ARGV: the entry's
# field/value pairs. Clears the reply and publishes the command in one step.
_REPUBLISH = """
if #KEYS > 1 then
  redis.call('DEL', KEYS[2])
end
return redis.call('XADD', KEYS[1], '*', unpack(ARGV))
"""


@dataclass(frozen=True, slots=True)
class DeadLetter:
    shard: int
    id: str
    fields: dict[str, str]  # every field as stored

    def _dead(self, name: str) -> str:
        return self.fields.get(DEAD_PREFIX + name, "")

    @property
    def stream(self) -> str:
        return self._dead("stream")

    @property
    def group(self) -> str:
        return self._dead("group")

    @property
    def entry_id(self) -> str:
        return self._dead("entry_id")

    @property
    def original(self) -> dict[str, str]:
        """The fields of the entry that died."""
        return {k: v for k, v in self.fields.items() if not k.startswith(DEAD_PREFIX)}

    @property
    def kind(self) -> str:
        """``command`` or ``event`` by the stream it came from; ``other`` for anything else."""
        keys = ShardKeys(self.shard)
        return {keys.commands: "command", keys.events: "event"}.get(self.stream, "other")

    @property
    def target(self) -> str:
        """How the operations stream names this dead letter."""
        return f"{ShardKeys(self.shard).dead}/{self.id}"

    @property
    def ts(self) -> int | None:
        """When it was dead-lettered (epoch ms); None when ``dead_ts`` is not a time (a dead
        letter someone else wrote)."""
        raw = self._dead("ts")
        if not TS.fullmatch(raw):
            return None
        try:
            iso_time(int(raw))
        except (ValueError, OverflowError):
            return None
        return int(raw)

    def summary(self) -> dict[str, Any]:
        ts = self.ts
        return {
            "shard": self.shard,
            "id": self.id,
            "ts": ts,
            "time": None if ts is None else iso_time(ts),
            "kind": self.kind,
            "type": self.fields.get("type", ""),
            "code": self._dead("code"),
            "reason": self._dead("reason"),
            "stream": self.stream,
            "group": self.group,
            "entry_id": self.entry_id,
        }

    def terminal_row(self) -> dict[str, Any]:
        """The summary for a table: every text printable on one line, a long one cut short."""
        row = self.summary()
        for name, value in row.items():
            if isinstance(value, str):
                row[name] = printable(value, REASON_WIDTH if name == "reason" else FIELD_WIDTH)
        return row

    def as_dict(self) -> dict[str, Any]:
        """The whole dead letter: the summary, the original fields and any other ``dead_*``."""
        shown = {DEAD_PREFIX + name for name in ("code", "reason", "stream", "group", "entry_id", "ts")}
        extra = {k: v for k, v in self.fields.items() if k.startswith(DEAD_PREFIX) and k not in shown}
        return {**self.summary(), "fields": self.original, **extra}


def printable(value: str, width: int) -> str:
    """``value`` safe for a terminal, at most ``width`` characters: bytes that are not UTF-8 (read
    as lone surrogates) as ``\\xNN``, control and other unprintable characters escaped as Python
    writes them (``\\n``, ``\\x1b``), a longer text cut with ``…`` (never inside an escape)."""
    shown = ""
    for index, char in enumerate(value):
        piece = char if char.isprintable() else _escape(char)
        last = index == len(value) - 1
        if len(shown) + len(piece) > (width if last else width - 1):
            return shown + "…"
        shown += piece
    return shown


def _escape(char: str) -> str:
    if "\udc80" <= char <= "\udcff":  # a byte that was not UTF-8 (surrogateescape)
        return f"\\x{ord(char) - 0xDC00:02x}"
    return repr(char)[1:-1]


def entry_id(value: str) -> str:
    """A stream entry id ``<ms>-<seq>`` (the CLI's argument type)."""
    if not ENTRY_ID.fullmatch(value):
        raise ValueError(f"must be a stream entry id such as 1700000000000-0 (got {value!r})")
    return value


async def shards_of(redis: Any, shard: int | None) -> list[int]:
    """The shards to look in: ``shard`` if given (it must exist), else every shard."""
    count = await shard_count(redis)
    if shard is None:
        return list(range(count))
    if not 0 <= shard < count:
        raise ValueError(f"--shard: must be from 0 to {count - 1}: this ledger has {count} shards (got {shard})")
    return [shard]


def _letter(shard: int, entry: tuple[Any, dict[Any, Any]]) -> DeadLetter:
    entry_id_, raw = entry
    return DeadLetter(shard, text(entry_id_), {text(k): text(v) for k, v in raw.items()})


async def dead_letters(redis: Any, shards: list[int], limit: int) -> tuple[list[DeadLetter], int]:
    """The oldest ``limit`` dead letters of each shard, and how many the shards hold in all."""
    found: list[DeadLetter] = []
    total = 0
    for shard in shards:
        dead = ShardKeys(shard).dead
        total += await redis.xlen(dead)
        found += [_letter(shard, entry) for entry in await redis.xrange(dead, count=limit)]
    return found, total


async def find(redis: Any, shards: list[int], dead_id: str) -> DeadLetter:
    """The dead letter ``dead_id`` in one of ``shards`` (exactly one)."""
    found = [
        _letter(shard, entry)
        for shard in shards
        for entry in await redis.xrange(ShardKeys(shard).dead, dead_id, dead_id)
    ]
    if not found:
        where = f"shard {shards[0]}" if len(shards) == 1 else f"any of {len(shards)} shards"
        raise CliError(f"no dead letter {dead_id} in {where}: list them with `ledger dead list`")
    if len(found) > 1:
        held = ", ".join(str(letter.shard) for letter in found)
        raise CliError(f"dead letter id {dead_id} exists in shards {held}: give --shard")
    return found[0]


async def _remove(redis: Any, letter: DeadLetter) -> bool:
    dead = ShardKeys(letter.shard).dead
    field = index_field(letter.stream, letter.group, letter.entry_id)
    return bool(await redis.eval(_REMOVE, 2, dead, dead_index(dead), letter.id, field))


async def drop(redis: Any, letter: DeadLetter, note: str) -> dict[str, Any]:
    """Remove a dead letter for good; record the operation with the note."""
    if not await _remove(redis, letter):
        raise CliError(f"dead letter {letter.id} was removed meanwhile: list them with `ledger dead list`")
    operation = await record_operation(redis, "drop", letter.target, note, {"dead_letter": letter.as_dict()})
    return operation.as_dict()


async def retry(
    redis: Any, letter: DeadLetter, note: str, *, type_name: str | None = None, data: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Retry a dead letter (module docstring); return the recorded operation."""
    if letter.kind == "event":
        if type_name is not None or data is not None:
            raise ValueError("--type/--data: an event is never edited; retry it as it was")
        outcome = await _rerun_event(redis, letter)
    elif letter.kind == "command":
        outcome = await _republish(redis, letter, type_name, data)
    else:
        raise CliError(
            f"dead letter {letter.id} came from {letter.stream!r}, not a stream of shard {letter.shard}: "
            "nothing can retry it; drop it with `ledger dead drop`"
        )
    detail = {"dead_letter": letter.as_dict(), **outcome}
    operation = await record_operation(redis, "retry", letter.target, note, detail)
    return operation.as_dict()


async def _rerun_event(redis: Any, letter: DeadLetter) -> dict[str, Any]:
    stream, group = letter.stream, letter.group
    groups = {text(g["name"]) for g in await redis.xinfo_groups(stream)} if await redis.exists(stream) else set()
    if group not in groups:
        raise CliError(f"consumer group {group!r} does not read {stream}: nothing would re-run entry {letter.entry_id}")
    dead = ShardKeys(letter.shard).dead
    rerun = retries(stream, group)
    keys = [dead, dead_index(dead), stream, tries(stream, group), rerun]
    field = index_field(stream, group, letter.entry_id)
    status = text(await redis.eval(_RETRY_EVENT, len(keys), *keys, letter.id, field, letter.entry_id))
    if status == "gone":
        raise CliError(f"dead letter {letter.id} was removed meanwhile: list them with `ledger dead list`")
    if status == "trimmed":
        raise CliError(
            f"entry {letter.entry_id} is no longer in {stream} (trimmed): it cannot be re-run; "
            "drop the dead letter with a note"
        )
    return {"rerun": {"stream": stream, "group": group, "entry_id": letter.entry_id, "retry_set": rerun}}


def _ids(data: str) -> tuple[str | None, str | None]:
    """A command's ``user_id`` and ``command_id``, each None unless readable and valid."""
    try:
        parsed = json.loads(data)
    except (ValueError, RecursionError):
        parsed = None
    if not isinstance(parsed, dict):
        return None, None
    user_id, command_id = parsed.get("user_id"), parsed.get("command_id")
    return (
        user_id if RULES["user_id"].matches(user_id) else None,
        command_id if RULES["command_id"].matches(command_id) else None,
    )


async def _republish(
    redis: Any, letter: DeadLetter, type_name: str | None, data: dict[str, Any] | None
) -> dict[str, Any]:
    fields = letter.original
    if type_name is not None:
        fields["type"] = type_name
    if data is not None:
        fields["data"] = json.dumps(data)
    user_id, command_id = _ids(fields.get("data", ""))
    shard = letter.shard if user_id is None else shard_of(user_id, await shard_count(redis))
    commands = ShardKeys(shard).commands
    reply = None if user_id is None or command_id is None else ShardKeys(shard).reply(user_id, command_id)
    keys = [commands] if reply is None else [commands, reply]
    args = [item for pair in fields.items() for item in pair]
    new_id = text(await redis.eval(_REPUBLISH, len(keys), *keys, *args))
    await _remove(redis, letter)
    return {"published": {"stream": commands, "entry_id": new_id, "fields": fields, "reply_key": reply}}
