"""A small consumer-group runner shared by every consumer of the ledger.

It reads a stream with XREADGROUP in batches, hands each batch to an async handler and XACKs it
after success, in the round trip of its next read (the acknowledgement first in the pipeline:
Redis runs it at once, before the read behind it blocks; one fsynced round trip fewer per batch
under ``appendfsync always``). Entries left pending by a dead consumer are taken over with
XAUTOCLAIM once idle for ``claim_idle_ms``. Redis (or, for a consumer that passes its errors as
``retryable``, PostgreSQL) going away means backoff and reconnection, not a crash, and never a
dead letter. ``run`` stops cleanly when its stop event is set (the batch in hand is finished
and acknowledged first); ``burst`` processes what is there, acknowledges it and returns (for
tests and tools); a ``step`` leaves its batch to be acknowledged by the next one.

Failures are counted in Redis, so that they survive the process (``keys.tries``, one hash per
stream and group on the stream's hash tag):

* a fresh entry gets no counter: the group's pending list already records its delivery, so a
  batch that succeeds costs one XACK and one HDEL, whatever its size;
* an entry read again from the pending list (this consumer's own after a failed batch, or one
  claimed from a consumer that died) was in a batch that failed or never finished: it gets a
  counter of 0 if it has none, and is handled alone, its counter incremented *before* it is
  handled, so a delivery that kills the process counts too; its last error is kept next to the
  counter;
* a batch that raises is retried at once entry by entry, the same way;
* an entry whose counter would exceed ``max_deliveries`` is dead-lettered with its last known
  error instead (``consumers.deadletter``: written once, acknowledged in the same step);
* acknowledging an entry deletes its counter in the same step;
* an entry the handler declares unprocessable for good (``Undeliverable``: an event that cannot
  be decoded, say) is dead-lettered at once, with the handler's code and reason, once it is
  handled alone.

Before a dead letter is written, ``on_dead_letter`` (if given) is told: the PostgreSQL
projector records the gap in history there.

An operator re-runs a dead-lettered entry (``ledger dead retry``) by adding its id to the
group's retry set (``keys.retries``) in the step that removes its dead letter and its index
field. Every ``block_ms`` (and at the start of a ``burst``) the runner reads the set and handles
each listed entry alone from the stream, in id order, exactly like an entry tried before: its
tries start again from zero, a failure is counted, and ``max_deliveries`` failures dead-letter it
again. An entry leaves the set once it is acknowledged or dead-lettered (it has no try counter
any more); one the stream no longer holds (trimmed) leaves it with an error logged.

So only the entry that fails (or kills the process) accumulates tries: the other entries of its
batch are handled alone once and acknowledged. A delivery cut short by a ``retryable`` error
(a server down) gives its count back, so an outage never dead-letters anything.

Handlers must be idempotent: delivery is at least once.

A consumer whose role has nothing to do (``reads=False``: the paper venue when no exchange is
``paper``, the live venue when none is ``live``) reads nothing: every ``block_ms`` it moves its
group's last-delivered id to the stream's last entry and acknowledges whatever the group has
pending (``_SKIP``), so it keeps its place in the log (an exchange switched to that mode later
never sees orders placed before) without costing the server and the process a read of every
event. It is what a consumer whose handler ignores every entry would leave behind, and it obeys
the lease like one.

With ``lease_key`` the consumer is exclusive: only the holder of the lease (a key with a
time-to-live of ``claim_idle_ms``, renewed at every step) reads the stream, so entries are
applied strictly in log order; other processes stand by and take over when the lease lapses,
first claiming everything the previous holder left pending, in id order. A lease elects, it does
not fence: a holder whose batch outlives the lease (a pause, a slow server) would still write it
after the new holder wrote newer state. So every exclusive handler fences its own writes: it
checks, in the batch's atomic step, that the lease still names this consumer (``name``) and
raises ``LeaseLost`` when it does not; the delivery is then given back like a server outage.
Its reads check the lease too (``_READ_NEW``, a script), so a holder whose lease lapsed takes
nothing and entries reach the handler strictly in log order. A handler that applies the log from
its own checkpoint whatever it is delivered (the live projection) passes ``ordered=False``: its
reads block in one XREADGROUP (no script, and woken only by entries its group has not been
moved past), and what a lapsed holder took stays pending until claimed, harmless to it.

``idle``, when given, is called after a read that found nothing (every ``block_ms`` while
nothing comes), and with a lease only when that read found the lease still this consumer's:
work a handler does on its own time (the live projection's sweep).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog
from redis import exceptions as redis_errors

from consumers.backoff import Backoff, poll
from consumers.deadletter import write_dead_letter
from consumers.entries import Entry
from ledger import defaults
from ledger.errors import HandlingSignal
from ledger.store.keys import retries, tries
from ledger.store.redis_conn import entry_order, text

if TYPE_CHECKING:
    from ledger.config import Settings

_RENEW_LEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

# KEYS[1] a lease; ARGV[1] its holder: deleted only while it still names that holder.
_RELEASE_LEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""

# KEYS[1] try counters; ARGV[1] the increment (0: mark), ARGV[2..] entry ids. A mark (0) creates
# a counter of 0 only where there is none. Returns each entry's counter as it was before; an
# entry counted (increment > 0) without a counter was delivered once already (a fresh entry has
# none): 0.
_COUNT = """
local absent = ARGV[1] == '0' and '-1' or '0'
local before = {}
for i = 2, #ARGV do
  local n = tonumber(redis.call('HGET', KEYS[1], ARGV[i]) or absent)
  before[#before + 1] = n
  if ARGV[1] ~= '0' or n < 0 then
    redis.call('HINCRBY', KEYS[1], ARGV[i], ARGV[1])
  end
end
return before
"""

# KEYS[1] stream, KEYS[2] the lease; ARGV[1] group, ARGV[2] consumer, ARGV[3] batch size, ARGV[4]
# the lease's holder. Reads the group's new entries (never blocking), only while the lease names
# the holder. Returns {entries, '', 0}; with no new entry,
# {false, the stream's last entry id, 0} for a blocking XREAD to wait after; {false, '', 1}, having
# read nothing, when the lease does not name the holder.
_READ_NEW = """
if redis.call('GET', KEYS[2]) ~= ARGV[4] then
  return {false, '', 1}
end
local read = redis.call('XREADGROUP', 'GROUP', ARGV[1], ARGV[2], 'COUNT', ARGV[3], 'STREAMS', KEYS[1], '>')
if not read then
  local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)[1]
  return {false, last and last[1] or '0-0', 0}
end
return {read[1][2], '', 0}
"""

# ``chunked(command, head, items)``: redis.call(command, head..., items...) at most 1,000 items
# at a time (Lua's ``unpack`` stops at about 8,000 values; a batch may be larger than that).
_CHUNKED = """
local function chunked(command, head, items)
  for i = 1, #items, 1000 do
    local args = {}
    for _, value in ipairs(head) do
      args[#args + 1] = value
    end
    for j = i, math.min(i + 999, #items) do
      args[#args + 1] = items[j]
    end
    redis.call(command, unpack(args))
  end
end
"""

# KEYS[1] try counters; ARGV[1..] ids of entries read again from the group's pending list: each
# was delivered in a batch that failed or never finished, so one without a counter gets 0 (a try
# to count; handled alone). Returns the counters (-1: a delivery given back, not a try).
_MARK_PENDING = (
    _CHUNKED
    + """
local before, marks = {}, {}
for i = 1, #ARGV, 1000 do
  local found = redis.call('HMGET', KEYS[1], unpack(ARGV, i, math.min(i + 999, #ARGV)))
  for j, value in ipairs(found) do
    before[i + j - 1] = tonumber(value or '0')
    if not value then
      marks[#marks + 1] = ARGV[i + j - 1]
      marks[#marks + 1] = 0
    end
  end
end
chunked('HSET', {KEYS[1]}, marks)
return before
"""
)

# KEYS[1] try counters; ARGV[1..] entry ids: give back the count of a delivery that a server
# outage cut short; a delivery not counted (a fresh entry's) is left at -1, so that reading the
# entry again from the pending list does not take it for a try.
_UNCOUNT = """
for i = 1, #ARGV do
  if redis.call('HINCRBY', KEYS[1], ARGV[i], -1) < -1 then
    redis.call('HSET', KEYS[1], ARGV[i], -1)
  end
end
return 1
"""

# KEYS[1] stream, KEYS[2] try counters; ARGV[1] group, ARGV[2..] entry ids: one XACK and, when the
# group has counters at all (most batches: none), one HDEL of the entries' counters and last errors.
_ACK = (
    _CHUNKED
    + """
for i = 2, #ARGV, 1000 do
  redis.call('XACK', KEYS[1], ARGV[1], unpack(ARGV, i, math.min(i + 999, #ARGV)))
end
if redis.call('EXISTS', KEYS[2]) == 1 then
  local fields = {}
  for i = 2, #ARGV do
    fields[#fields + 1] = ARGV[i]
    fields[#fields + 1] = ARGV[i] .. ':error'
  end
  chunked('HDEL', {KEYS[2]}, fields)
end
return 1
"""
)

# KEYS[1] stream, KEYS[2] try counters, KEYS[3] the lease (when ARGV[2] is not ''); ARGV[1]
# group, ARGV[2] the lease's holder or ''. Acknowledges (up to 1,000 of) the group's pending
# entries, drops their counters, and moves the group's last-delivered id to the stream's last
# entry, reading nothing (an idle consumer: module doc). Returns the number acknowledged; -1,
# having done nothing, when the lease does not name the holder.
_SKIP = (
    _CHUNKED
    + """
if ARGV[2] ~= '' and redis.call('GET', KEYS[3]) ~= ARGV[2] then
  return -1
end
local pending = redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1000)
local ids, fields = {}, {}
for i, p in ipairs(pending) do
  ids[i] = p[1]
  fields[#fields + 1] = p[1]
  fields[#fields + 1] = p[1] .. ':error'
end
chunked('XACK', {KEYS[1], ARGV[1]}, ids)
chunked('HDEL', {KEYS[2]}, fields)
local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)[1]
if last then
  for _, group in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
    local info = {}
    for j = 1, #group, 2 do
      info[group[j]] = group[j + 1]
    end
    if info['name'] == ARGV[1] and info['last-delivered-id'] ~= last[1] then
      redis.call('XGROUP', 'SETID', KEYS[1], ARGV[1], last[1])
    end
  end
end
return #pending
"""
)

# The reason given when an entry's last delivery never finished (the process died in it).
UNFINISHED = "the consumer handling it stopped before finishing (a crash, a kill or a timeout)"


class LeaseLost(HandlingSignal):
    """A leased consumer found, in the atomic step of a batch, that it no longer holds its lease:
    the batch was not applied (or only where nothing newer was), and another consumer applies it.
    Retryable: the delivery's count is given back and the consumer stands by."""


RETRYABLE = (
    LeaseLost,
    redis_errors.ConnectionError,
    redis_errors.TimeoutError,
    redis_errors.BusyLoadingError,
    ConnectionError,
    OSError,
)


Handler = Callable[[list[Entry]], Awaitable[None]]
# Told (entry, code, reason) before the entry is dead-lettered; may raise a retryable error.
DeadLetterHook = Callable[[Entry, str, str], Awaitable[None]]


class Undeliverable(HandlingSignal):
    """Raised by a handler for an entry that no retry can process: dead-letter it now."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


@dataclass(frozen=True, slots=True)
class ConsumerSettings:
    batch_size: int = defaults.BATCH_SIZE
    block_ms: int = defaults.BLOCK_MS
    claim_idle_ms: int = defaults.CLAIM_IDLE_MS
    max_deliveries: int = defaults.MAX_DELIVERIES
    backoff_max_s: float = defaults.BACKOFF_MAX_S
    # After a batch smaller than batch_size, wait this long before the next read (``run`` only, not
    # ``burst``): a consumer off the order path whose cost is per batch gathers larger ones.
    linger_ms: int = 0

    @classmethod
    def from_settings(cls, settings: Settings) -> ConsumerSettings:
        return cls(
            batch_size=settings.batch_size,
            claim_idle_ms=settings.claim_idle_ms,
            max_deliveries=settings.max_deliveries,
        )


def consumer_name(role: str) -> str:
    """A consumer name unique to this process."""
    return f"{names_of(role)}{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


async def release_lease(redis: Any, lease: str, holder: str) -> None:
    """Delete ``lease`` while it still names ``holder``."""
    await redis.eval(_RELEASE_LEASE, 1, lease, holder)


def names_of(role: str) -> str:
    """How the names of ``role``'s consumers begin (a lease naming one is held by ``role``, not
    by a tool that paused it: ``consumers.pause``)."""
    return f"{role}:"


class StreamConsumer:
    def __init__(
        self,
        redis: Any,
        *,
        stream: str,
        group: str,
        handler: Handler,
        dead_stream: str,
        name: str | None = None,
        settings: ConsumerSettings | None = None,
        start_id: str = "0",
        lease_key: str | None = None,
        ordered: bool = True,
        reads: bool = True,
        retryable: tuple[type[BaseException], ...] = (),
        on_dead_letter: DeadLetterHook | None = None,
        idle: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.redis = redis
        self.stream = stream
        self.group = group
        self.handler = handler
        self.dead_stream = dead_stream
        self.name = name or consumer_name(group)
        self.settings = settings or ConsumerSettings()
        self.start_id = start_id
        self.lease_key = lease_key
        self.ordered = ordered
        self.reads = reads
        self.idle = idle
        self.retryable = RETRYABLE + retryable
        self.on_dead_letter = on_dead_letter
        self.tries = tries(stream, group)
        self.retries = retries(stream, group)
        self.log = structlog.get_logger("ledger.consumer").bind(stream=stream, group=group, consumer=self.name)
        # Entries whose delivery a server outage cut short, their count not given back yet.
        self._uncounted: set[str] = set()
        # A batch handled and not acknowledged yet: its acknowledgement goes in the round trip of
        # the next read (``_read``), or alone before anything else reads the group (``_flush``).
        self._handled: list[Entry] = []
        self._own_pending = True
        self._next_claim = 0.0
        self._next_retry = 0.0
        self._group_ready = False
        # The last entry this consumer took, or the stream's last when the group had nothing
        # new: the blocking XREAD of the next read waits after it.
        self._last_seen = "0-0"
        # When the lease was last confirmed (monotonic s): renewed at most every third of its life.
        self._lease_confirmed: float | None = None
        self._scripts = {name: redis.register_script(source) for name, source in _SCRIPTS.items()}

    # ----------------------------------------------------------------- lifecycle

    async def ensure_group(self) -> None:
        """Create the group if it is missing and load the consumer's scripts (at the start and
        after every outage: a restarted server has none), so that an acknowledgement sent by
        SHA ahead of a blocking read runs before the read blocks."""
        try:
            await self.redis.xgroup_create(self.stream, self.group, id=self.start_id, mkstream=True)
        except redis_errors.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        for script in self._scripts.values():
            await self.redis.script_load(script.script)
        self._group_ready = True

    async def run(self, stop: asyncio.Event) -> None:
        """Consume until ``stop`` is set; survive Redis outages with capped backoff."""
        backoff = Backoff(max_s=self.settings.backoff_max_s)
        await poll(stop, self._attempt, retry_on=self.retryable, on_retry=self._server_away, backoff=backoff)
        await self._leave()
        self.log.info("consumer stopped")

    async def _leave(self) -> None:
        """A consumer that stops acknowledges its last batch and gives its lease up: a standby
        takes over at once, and what watches the lease sees the role stopped (the handler's
        append step makes the live projection's writes only while a projection consumer holds
        it). With the server away, the batch is claimed later and handled again (idempotently),
        and the lease lapses by itself."""
        try:
            await self._flush()
            if self.lease_key is not None:
                await release_lease(self.redis, self.lease_key, self.name)
        except RETRYABLE as exc:
            self.log.warning(
                "stopped with the server away: last batch left pending, lease left to lapse", error=str(exc)
            )

    async def _attempt(self) -> bool:
        try:
            if not self._group_ready:
                await self.ensure_group()
            await self.step()
        except LeaseLost as exc:
            self.log.warning("lease lost mid-batch: batch left to the new holder, standing by", error=str(exc))
        except redis_errors.ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            self.log.warning("consumer group missing, recreating it")
            self._group_ready = False
        return False

    async def _server_away(self, exc: BaseException, retry_in_s: float) -> None:
        self.log.warning("a server is unavailable, retrying", error=str(exc), retry_in_s=retry_in_s)
        self._group_ready = False

    async def burst(self, max_rounds: int = 10_000) -> int:
        """Process everything available now (new and own pending entries), then return."""
        await self.ensure_group()
        self._next_retry = 0.0
        handled = 0
        for _ in range(max_rounds):
            count = await self.step(block=False)
            if count == 0:
                break
            handled += count
        await self._flush()
        return handled

    # ----------------------------------------------------------------- one step

    async def step(self, block: bool = True) -> int:
        """Claim, read, handle and acknowledge one batch; return the number of entries read."""
        if self.lease_key is not None and not await self._hold_lease():
            if block:
                await asyncio.sleep(self.settings.block_ms / 1000)
            return 0
        if not self.reads:
            retried = await self._retry_requested()
            await self._skip()
            if block:
                await asyncio.sleep(self.settings.block_ms / 1000)
            return retried
        try:
            await self._give_back()
            retried = await self._retry_requested()
            entries = await self._claim_stale()
            before = await self._mark_pending(entries) if entries else []
            if not entries:
                entries, before = await self._read(block)
            if entries:
                await self._process(entries, before)
                if block and self.settings.linger_ms and len(entries) < self.settings.batch_size:
                    await asyncio.sleep(self.settings.linger_ms / 1000)
            elif self.idle is not None and (self.lease_key is None or self._lease_confirmed is not None):
                await self.idle()  # not when the read found the lease moved (a tool's work stands)
        except LeaseLost:
            self._lease_confirmed = None  # the next step asks Redis who holds it
            raise
        return retried + len(entries)

    async def _read(self, block: bool) -> tuple[list[Entry], list[int]]:
        """The next batch and the entries' try counters as they were before it was marked:
        this consumer's own pending entries first (a batch that failed), else new ones, in one
        round trip with the acknowledgement of the batch before (Redis runs a connection's
        commands in order: the acknowledgement runs at once, before a read behind it blocks). A
        consumer without a lease takes new entries with one XREADGROUP, blocking while there are
        none; one not ``ordered`` too, then reads who holds the lease (a GET behind the read).
        An ``ordered`` one takes them with ``_READ_NEW`` (which checks the lease) behind a plain
        XREAD that waits for an entry after the last one it saw (``_last_seen``: the last entry
        it took, or the stream's last when it found nothing), at once when one is there already:
        a batch is one round trip, busy or idle."""
        if self._own_pending:
            await self._flush()  # else the batch handled last is read again as pending
            response = await self.redis.xreadgroup(
                self.group, self.name, {self.stream: "0"}, count=self.settings.batch_size
            )
            entries = _entries(response)
            if entries:
                return entries, await self._mark_pending(entries)
            self._own_pending = False
        pipe = self._acknowledging()
        if self.lease_key is None or not self.ordered:
            block_ms = self.settings.block_ms if block else None
            pipe.xreadgroup(self.group, self.name, {self.stream: ">"}, count=self.settings.batch_size, block=block_ms)
            if self.lease_key is not None:
                pipe.get(self.lease_key)
            results = await self._execute(pipe)
            if self.lease_key is not None and text(results.pop()) != self.name:
                return await self._lost()
            entries = _entries(results[-1])
            return entries, [-1] * len(entries)
        if block:
            # Wait without taking (a plain read, which costs the server no write).
            pipe.xread({self.stream: self._last_seen}, count=1, block=self.settings.block_ms)
        # By SHA through ``execute_command``: redis-py's cluster pipeline refuses ``evalsha``; the
        # raw command is routed by its keys, both on the stream's slot.
        keys, args = [self.stream, self.lease_key], [self.group, self.name, self.settings.batch_size, self.name]
        pipe.execute_command("EVALSHA", self._scripts["read_new"].sha, len(keys), *keys, *args)
        *_, taken = await self._execute(pipe)
        if isinstance(taken, redis_errors.NoScriptError):  # the server lost its script cache: the call loads it
            taken = await self._scripts["read_new"](keys, args)
        return await self._taken(taken)

    def _acknowledging(self) -> Any:
        """A pipeline that starts with the acknowledgement of the batch handled last, if any:
        Redis runs it at once, before the read queued behind it blocks."""
        pipe = self.redis.pipeline(transaction=False)
        if self._handled:
            ids = [e.id for e in self._handled]
            pipe.execute_command("EVALSHA", self._scripts["ack"].sha, 2, self.stream, self.tries, self.group, *ids)
        return pipe

    async def _execute(self, pipe: Any) -> list[Any]:
        """Run a pipeline made by ``_acknowledging``; the batch is acknowledged once it returns.
        Cut short by an outage, the acknowledgement may or may not have run: it is sent again
        with the next read (acknowledging an entry twice changes nothing)."""
        handled, self._handled = self._handled, []
        try:
            results: list[Any] = await pipe.execute(raise_on_error=False)
        except self.retryable:
            self._handled = handled + self._handled
            raise
        if handled and isinstance(results[0], redis_errors.NoScriptError):
            await self._ack(handled)  # the server lost its script cache: the call loads it
        for result in results:
            if isinstance(result, Exception) and not isinstance(result, redis_errors.NoScriptError):
                raise result
        return results

    async def _flush(self) -> None:
        """Acknowledge the batch handled last, if any, on its own (kept for the next read if the
        server does not answer)."""
        if self._handled:
            await self._ack(self._handled)
            self._handled = []

    async def _taken(self, result: Any) -> tuple[list[Entry], list[int]]:
        """The entries ``_READ_NEW`` took (``result``), with their counters before the mark."""
        found, last, lost = result
        if lost:
            return await self._lost()
        if not found:
            self._last_seen = text(last) or "0-0"
            return [], []
        entries = [_entry(raw_id, fields) for raw_id, fields in found]
        self._last_seen = entries[-1].id
        return entries, [-1] * len(entries)

    async def _lost(self) -> tuple[list[Entry], list[int]]:
        """A read found the lease naming another holder: taken by a tool (``consumers.pause``) or
        lapsed since this consumer last renewed it. Take it again now if it is free (adopting
        what was left pending, what a read not ``ordered`` took included), else stand by."""
        self._lease_confirmed = None
        if not await self._hold_lease():
            return [], []
        return await self._read(block=False)

    async def _process(self, entries: list[Entry], before: list[int]) -> None:
        """Handle a batch whose entries were marked (``before``: their counters before the mark);
        entries tried before (or a batch that fails) are handled alone."""
        if any(n >= 0 for n in before):
            await self._process_alone(entries)
            return
        try:
            await self.handler(entries)
        except self.retryable:
            await self._uncount(entries)
            raise
        except Exception as exc:  # noqa: BLE001 - isolate the failing entry, keep the stream moving
            self.log.error("batch failed, retrying entry by entry", error=repr(exc), size=len(entries))
            await self._process_alone(entries)
            return
        self._handled = self._handled + entries  # acknowledged with the next read (``_acknowledging``)

    async def _process_alone(self, entries: list[Entry]) -> None:
        for entry in entries:
            (before,) = await self._count([entry], 1)
            if before >= self.settings.max_deliveries:
                reason = text(await self.redis.hget(self.tries, f"{entry.id}:error")) or UNFINISHED
                await self._dead_letter(entry, "DELIVERY_LIMIT", f"failed deliveries: {before}; last error: {reason}")
                continue
            try:
                await self.handler([entry])
            except self.retryable:
                await self._uncount([entry])
                raise
            except Undeliverable as exc:
                await self._dead_letter(entry, exc.code, exc.reason)
                continue
            except Exception as exc:  # noqa: BLE001 - counted; dead-lettered after max_deliveries
                self._own_pending = True
                await self.redis.hset(self.tries, f"{entry.id}:error", repr(exc))
                self.log.error("entry failed", entry_id=entry.id, tries=before + 1, error=repr(exc))
                continue
            await self._ack([entry])

    async def _count(self, entries: list[Entry], increment: int) -> list[int]:
        """Increment (or, with 0, mark) the entries' try counters; return them as they were."""
        before = await self._scripts["count"]([self.tries], [increment, *[e.id for e in entries]])
        return [int(n) for n in before]

    async def _skip(self) -> None:
        """Keep the group's place at the end of the stream without reading (``_SKIP``)."""
        holder = self.name if self.lease_key is not None else ""
        skipped = await self._scripts["skip"](
            [self.stream, self.tries, self.lease_key or self.stream], [self.group, holder]
        )
        if skipped == -1:
            self._lease_confirmed = None  # taken by a tool or lapsed: the next step asks again
        elif skipped:
            self.log.info("idle consumer acknowledged pending entries without handling them", count=skipped)

    async def _mark_pending(self, entries: list[Entry]) -> list[int]:
        """The try counters of entries read again from the group's pending list (``_MARK_PENDING``)."""
        before = await self._scripts["mark_pending"]([self.tries], [e.id for e in entries])
        return [int(n) for n in before]

    async def _uncount(self, entries: list[Entry]) -> None:
        """Give back the count of a delivery a server outage cut short (now, or before the next)."""
        self._own_pending = True
        self._uncounted.update(e.id for e in entries)
        with contextlib.suppress(*self.retryable):
            await self._give_back()

    async def _give_back(self) -> None:
        if self._uncounted:
            await self._scripts["uncount"]([self.tries], sorted(self._uncounted))
            self._uncounted.clear()

    async def _ack(self, entries: list[Entry]) -> None:
        await self._scripts["ack"]([self.stream, self.tries], [self.group, *[e.id for e in entries]])

    async def _retry_requested(self) -> int:
        """Handle, each alone, the entries an operator asked this group to retry; return how many."""
        now = time.monotonic()
        if now < self._next_retry:
            return 0
        self._next_retry = now + self.settings.block_ms / 1000
        ids = sorted((text(i) for i in await self.redis.smembers(self.retries)), key=entry_order)
        entries: list[Entry] = []
        for entry_id in ids:
            found = _entry_list(await self.redis.xrange(self.stream, entry_id, entry_id))
            if not found:
                self.log.error("retry asked for an entry the stream no longer holds: not run", entry_id=entry_id)
                await self.redis.srem(self.retries, entry_id)
            entries += found
        if not entries:
            return 0
        self.log.info("re-running entries an operator retried", entry_ids=[e.id for e in entries])
        await self._count(entries, 0)
        await self._process_alone(entries)
        counters = await self.redis.hmget(self.tries, [e.id for e in entries])
        done = [e.id for e, counter in zip(entries, counters, strict=True) if counter is None]
        if done:
            await self.redis.srem(self.retries, *done)
        return len(entries)

    # ----------------------------------------------------------------- exclusivity

    async def _hold_lease(self) -> bool:
        """Take or renew the lease; on taking it, adopt every entry left pending."""
        ttl = self.settings.claim_idle_ms
        now = time.monotonic()
        # Renewed at most every third of its life; in between, the step that reads a batch checks
        # that the lease still names this consumer (``_READ_NEW``), and the handlers' atomic
        # steps fence their writes (a lease lost meanwhile shows there as ``LeaseLost``).
        if self._lease_confirmed is not None and now - self._lease_confirmed < ttl / 3000:
            return True
        self._lease_confirmed = None
        if await self._scripts["renew"]([self.lease_key], [self.name, ttl]):
            self._lease_confirmed = now
            return True
        if not await self.redis.set(self.lease_key, self.name, nx=True, px=ttl):
            return False
        self._lease_confirmed = now
        self.log.info("lease taken: this consumer is now the active one")
        start = "0-0"
        while True:
            # Not JUSTID: redis-py then returns only the claimed ids and drops the cursor.
            start, _claimed, _deleted = await self.redis.xautoclaim(
                self.stream, self.group, self.name, 0, start_id=start, count=1000
            )
            if text(start) == "0-0":
                break
        self._own_pending = True
        return True

    # ----------------------------------------------------------------- failures

    async def _dead_letter(self, entry: Entry, code: str, reason: str) -> None:
        if self.on_dead_letter is not None:
            await self.on_dead_letter(entry, code, reason)
        written = await write_dead_letter(
            self.redis,
            self.dead_stream,
            entry.fields,
            stream=self.stream,
            entry_id=entry.id,
            group=self.group,
            code=code,
            reason=reason,
            ack_tries=self.tries,
        )
        self.log.error("entry dead-lettered", entry_id=entry.id, code=code, reason=reason, written=written)

    async def _claim_stale(self) -> list[Entry]:
        """Take over entries another consumer left pending for longer than claim_idle_ms.

        A claimed entry was in a delivery that failed or never finished: it is handled alone,
        and counted (``_process``), unless that delivery was given back (an outage).
        """
        now = time.monotonic()
        if now < self._next_claim:
            return []
        self._next_claim = now + self.settings.claim_idle_ms / 2000
        idle = self.settings.claim_idle_ms
        _next, claimed, _deleted = await self.redis.xautoclaim(
            self.stream, self.group, self.name, idle, start_id="0-0", count=self.settings.batch_size
        )
        entries = _entry_list(claimed)
        if entries:
            self.log.info("claimed stale entries", count=len(entries), first=entries[0].id)
        return entries

    # ----------------------------------------------------------------- status


_SCRIPTS = {
    "renew": _RENEW_LEASE,
    "count": _COUNT,
    "read_new": _READ_NEW,
    "mark_pending": _MARK_PENDING,
    "uncount": _UNCOUNT,
    "ack": _ACK,
    "skip": _SKIP,
}


def _entries(response: Any) -> list[Entry]:
    if not response:
        return []
    if isinstance(response, dict):  # RESP3
        return [e for value in response.values() for e in _entry_list(value[0])]
    return [e for _stream, items in response for e in _entry_list(items)]


def _entry_list(items: Any) -> list[Entry]:
    return [Entry(text(i), dict(f)) for i, f in items if f is not None]  # type: ignore[arg-type]


def _entry(raw_id: Any, flat: list[Any]) -> Entry:
    """An entry as a script returns it: its id and its fields as a flat field/value list."""
    pairs = iter(flat)
    return Entry(text(raw_id), dict(zip(pairs, pairs, strict=True)))
