"""Dead letters: entries that could not be processed, kept with the reason (CONTRACT §2).

A dead letter is the original entry's fields plus ``dead_*`` fields saying where it came from
and why. It is written **at most once** per (stream, group, entry id), however often the entry is
delivered again: the dead stream's index (``keys.dead_index``, a hash "stream/group/entry id" ->
dead entry id) is written in the same Lua step as the XADD, so a redelivered entry finds it and
writes nothing. What goes with the first dead letter goes in that same step: the rejection reply
of a malformed command (never written twice either), and, for a consumer giving up on an entry,
its XACK and the removal of its try counter (``keys.tries``). Every key of the step is on the
shard's hash tag, so it is one step on Redis Cluster too.

A Lua step cannot pass more than about 8,000 arguments to one command, so a hostile entry with
more than ``MAX_FIELDS`` fields keeps its first ``MAX_FIELDS`` and says how many it dropped in
``dead_fields_dropped``.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from consumers.entries import Entry
from ledger.domain import wire
from ledger.domain.values import now_ms
from ledger.store.archived import ARCHIVED_LUA, ArchivedIndex, fingerprint
from ledger.store.keys import dead_index, waiting

MAX_FIELDS = 1000

# KEYS[1] dead stream, KEYS[2] dead index, then KEYS[3] source stream and KEYS[4] its try
# counters (when ARGV[2], the group, is not empty: acknowledge), then the reply list, the
# shard's outcomes hash, its waiting duplicates, the archived outcomes' index (meta) and the
# command's bucket in it (when ARGV[4], the reply, is not empty).
# ARGV[1] index field, ARGV[2] group or '', ARGV[3] entry id, ARGV[4] reply or '', ARGV[5] reply
# time-to-live in seconds, ARGV[6] the command's outcome field or '', ARGV[7] the index
# generation the bucket was computed with or '', ARGV[8] the field's fingerprint or '',
# ARGV[9..] the dead letter's field/value pairs.
# A command whose id already has an outcome keeps it: the reply written is that outcome (CONTRACT
# §3: a repeated command_id gets the first outcome), so a malformed entry never overwrites it;
# a compacted outcome (in the index, or a marker '~...' left before it) is answered from
# PostgreSQL by the handler's OutcomeReader.
# Returns 1 if this call wrote the dead letter, 0 if it was already there, or the index's
# generation when it is not ARGV[7] (nothing written: the caller retries with it).
_DEAD_LETTER_LUA = (
    ARCHIVED_LUA
    + """
local fresh = redis.call('HEXISTS', KEYS[2], ARGV[1]) == 0
local stale = fresh and ARGV[4] ~= '' and archived_stale(KEYS[#KEYS - 1], ARGV[7])
if stale then
  return stale
end
if fresh then
  redis.call('HSET', KEYS[2], ARGV[1], redis.call('XADD', KEYS[1], '*', unpack(ARGV, 9)))
  if ARGV[4] ~= '' then
    local body = redis.call('HGET', KEYS[#KEYS - 3], ARGV[6])
    local marker
    if not body then
      marker = archived_marker(KEYS[#KEYS], ARGV[8])
    elseif string.sub(body, 1, 1) == '~' then
      marker = body
    end
    if marker then
      redis.call('HSET', KEYS[#KEYS - 2], ARGV[6], marker)
    else
      local reply = KEYS[#KEYS - 4]
      redis.call('DEL', reply)
      redis.call('RPUSH', reply, body or ARGV[4])
      redis.call('EXPIRE', reply, ARGV[5])
    end
  end
end
if ARGV[2] ~= '' then
  redis.call('XACK', KEYS[3], ARGV[2], ARGV[3])
  redis.call('HDEL', KEYS[4], ARGV[3], ARGV[3] .. ':error')
end
return fresh and 1 or 0
"""
)


@dataclass(frozen=True, slots=True)
class Reply:
    """A reply to write with the first dead letter: its list key, JSON and time-to-live, and
    where the command's outcome would be recorded (an outcome found there is written instead)."""

    key: str
    body: bytes | str
    ttl_s: int
    outcomes_key: str
    outcome_field: str
    index: ArchivedIndex  # the shard's archived outcomes (``EventStore.index``)


def index_field(stream: str, group: str, entry_id: str) -> str:
    """The dead index's field of an entry of ``stream`` dead-lettered by ``group``."""
    return f"{stream}/{group}/{entry_id}"


def dead_letter_fields(
    fields: Mapping[str, Any], *, stream: str, entry_id: str, group: str, code: str, reason: str
) -> dict[str, Any]:
    """The original fields plus ``dead_*`` fields saying where the entry came from and why."""
    kept = dict(list(fields.items())[:MAX_FIELDS])
    dropped = len(fields) - len(kept)
    if dropped:
        kept["dead_fields_dropped"] = str(dropped)
    return {
        **kept,
        "dead_code": code,
        "dead_reason": reason,
        "dead_stream": stream,
        "dead_entry_id": entry_id,
        "dead_group": group,
        "dead_ts": str(now_ms()),
    }


async def write_dead_letter(
    redis: Any,
    dead_stream: str,
    fields: Mapping[str, Any],
    *,
    stream: str,
    entry_id: str,
    group: str,
    code: str,
    reason: str,
    reply: Reply | None = None,
    ack_tries: str | None = None,
) -> bool:
    """Dead-letter an entry unless it already is; True if this call wrote the dead letter.

    ``reply`` is written only with the dead letter. ``ack_tries`` (the group's try-counter
    key) also acknowledges the entry and drops its counter, whether or not it was written now.
    """
    letter = dead_letter_fields(fields, stream=stream, entry_id=entry_id, group=group, code=code, reason=reason)
    pairs = [x for name, value in letter.items() for x in (name, value)]
    fp = fingerprint(reply.outcome_field) if reply is not None else b""

    async def call() -> Any:
        keys = [dead_stream, dead_index(dead_stream)]
        if ack_tries is not None:
            keys += [stream, ack_tries]
        answer: list[Any] = ["", 0, "", "", ""]
        if reply is not None:
            index = reply.index
            keys += [reply.key, reply.outcomes_key, waiting(reply.outcomes_key), index.meta, index.bucket(fp)]
            answer = [reply.body, reply.ttl_s, reply.outcome_field, str(index.generation), fp]
        group_arg = group if ack_tries is not None else ""
        args = [index_field(stream, group, entry_id), group_arg, entry_id, *answer, *pairs]
        return await redis.eval(_DEAD_LETTER_LUA, len(keys), *keys, *args)

    if reply is None:
        return bool(await call())
    return bool(await reply.index.current(call, lambda written: None if isinstance(written, int) else written))


async def decode_events(
    redis: Any,
    entries: Sequence[Entry],
    *,
    stream: str,
    dead_stream: str,
    group: str,
    log: Any,
    types: Collection[str] | None = None,
) -> list[tuple[str, wire.Event]]:
    """Decode a batch of event entries (``wire.decode_entry``) with the one policy for an event
    that cannot be decoded: dead-letter it once (per group) with the reason and go on. Unknown
    types are skipped, as readers do (CONTRACT §5); with ``types``, so is every other type,
    undecoded.

    The PostgreSQL projector follows the same policy by raising ``Undeliverable``, because it must
    record the gap in history before the dead letter is written.
    """
    events: list[tuple[str, wire.Event]] = []
    for entry in entries:
        if types is not None and wire.entry_fields(entry.fields)[0] not in types:
            continue
        try:
            event = wire.decode_entry(entry.id, entry.fields)
        except wire.WireError as error:
            written = await write_dead_letter(
                redis,
                dead_stream,
                entry.fields,
                stream=stream,
                entry_id=entry.id,
                group=group,
                code=error.code,
                reason=error.message,
            )
            log.error(
                "undecodable event dead-lettered" if written else "undecodable event already dead-lettered",
                entry_id=entry.id,
                code=error.code,
                reason=error.message,
            )
            continue
        if event is not None:
            events.append((entry.id, event))
    return events
