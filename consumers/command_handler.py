"""The command handler: decode, validate, decide, append, reply (CONTRACT §3, §4).

A batch of command entries of one shard is handled in log order. State is taken from the
handler's memory of the users it appended for (``consumers.user_books``), else loaded from the
shard's snapshots in a few pipelined waves, every command is decided by the pure decider
against one in-memory book (in one exact decimal context for the whole batch), and all outcomes
are appended in one script call, each atomically with its reply and deduplication record. When
another handler changed a user's state in between (the append script answers ``conflict``:
loaded or remembered, the state was older than the user's token), that user's remaining
commands are decided again, one by one, on freshly loaded state. Malformed
entries are dead-lettered, with a rejection reply when their ``command_id`` and ``user_id`` can be
read, once per entry: a redelivered entry (a batch retried entry by entry, a claimed entry)
writes neither again. Any other failure of one entry is the runner's to isolate (it retries the
entry alone and counts its tries).

A duplicate of a command whose outcome was compacted (``projections.compact``: the reply moved to
PostgreSQL's ``ledger_outcomes``, its fingerprint to the archived index) is not answered in the
batch: the append step records it in ``ledger:{s}:outcomes:waiting`` and the shard's
``OutcomeReader`` answers it from PostgreSQL, retrying with back-off while PostgreSQL is away.
Likewise a command naming an order or position compaction moved out of Redis (found in the
archived aggregates' index when the snapshots lack it) is set aside in
``ledger:{s}:commands:cold`` and published again by the ``OutcomeReader`` once it wrote the
aggregate's state back. So commands keep flowing without PostgreSQL; only those wait for it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
import structlog

from consumers.backoff import Backoff, poll
from consumers.deadletter import Reply, write_dead_letter
from consumers.entries import Entry
from consumers.runner import RETRYABLE, ConsumerSettings, StreamConsumer
from consumers.user_books import Kept, UserBooks
from ledger import defaults
from ledger.config import ServerNotConfigured, Settings, known_url
from ledger.domain import wire
from ledger.domain.decider import Context, Decision, Rejection, Requirements, decide, requirements
from ledger.domain.evolution import evolve
from ledger.domain.ids import new_uuid, random_hex
from ledger.domain.state import Book, StateError
from ledger.domain.values import exact_arithmetic, now_ms
from ledger.errors import HandlingSignal
from ledger.sqlfiles import load_queries
from ledger.store.eventstore import Append, EventStore, InlineWrites, outcome_marker
from ledger.store.keys import outcome_field, outcome_ids, shard_of
from ledger.store.log import read_aggregates
from ledger.store.redis_conn import CONNECT_TIMEOUT_S
from ledger.venues.markets import instrument_table

GROUP = "ledger-handler"
MAX_CONFLICT_RETRIES = 20
# The OutcomeReader looks for waiting duplicates this often (it is also woken by its handler),
# and backs off (``consumers.backoff``) while PostgreSQL is away or a reply is missing.
OUTCOME_POLL_S = 1.0
OUTCOME_QUERY_TIMEOUT_S = 10.0
_SQL = load_queries("projections", "compact.sql")

log = structlog.get_logger("ledger.handler")


@dataclass(slots=True)
class _Pending:
    entry: Entry
    command: wire.Command


class CommandHandler:
    def __init__(
        self,
        store: EventStore,
        shards: int,
        *,
        clock: Callable[[], int] = now_ms,
        new_id: Callable[[], str] = new_uuid,
        on_archived: Callable[[], None] | None = None,
    ) -> None:
        self.store = store
        self.shards = shards
        self.clock = clock
        self.new_id = new_id
        # Called when a duplicate of a compacted command starts waiting (wakes its OutcomeReader).
        self.on_archived = on_archived
        # The users it appended for last, as it left them: no load for them (``UserBooks``).
        self.books = UserBooks()
        self.log = log.bind(shard=store.keys.shard)  # bound once: the module's proxy binds per call

    async def handle(self, entries: list[Entry]) -> None:
        commands: list[_Pending] = []
        for entry in entries:
            command = await self._decode(entry)
            if command is not None:
                commands.append(_Pending(entry, command))
        if commands:
            await self._handle_commands(commands)

    # ----------------------------------------------------------------- decoding

    async def _decode(self, entry: Entry) -> wire.Command | None:
        try:
            command = wire.decode_command(entry.fields)
        except wire.WireError as error:
            await self._reject_malformed(entry, error)
            return None
        home = shard_of(command.user_id, self.shards)
        if home != self.store.keys.shard:
            wrong_shard = wire.WireError(
                "WRONG_SHARD",
                f"user {command.user_id} belongs to shard {home}, not {self.store.keys.shard}: "
                f"publish to ledger:{{{home}}}:commands",
                command_id=command.command_id,
                user_id=command.user_id,
            )
            await self._reject_malformed(entry, wrong_shard)
            return None
        return command

    async def _reject_malformed(self, entry: Entry, error: wire.WireError) -> None:
        """Dead-letter a malformed entry and answer it, both once per entry however often it
        is delivered (a redelivered batch, a claimed entry, a retry entry by entry)."""
        keys = self.store.keys
        reply = None
        if error.command_id and error.user_id:
            body = wire.Reply(
                command_id=error.command_id,
                status="rejected",
                error=wire.ErrorInfo(error.code, error.message),
            )
            reply = Reply(
                keys.reply(error.user_id, error.command_id),
                wire.encode(body),
                self.store.reply_ttl_s,
                keys.outcomes,
                outcome_field(error.user_id, error.command_id),
                self.store.index,
            )
        written = await write_dead_letter(
            self.store.redis,
            keys.dead,
            entry.fields,
            stream=keys.commands,
            entry_id=entry.id,
            group=GROUP,
            code=error.code,
            reason=error.message,
            reply=reply,
        )
        self.log.warning(
            "malformed command" if written else "malformed command already dead-lettered",
            entry_id=entry.id,
            command_id=error.command_id,
            user_id=error.user_id,
            code=error.code,
            reason=error.message,
        )

    # ----------------------------------------------------------------- deciding

    async def _handle_commands(self, commands: list[_Pending]) -> None:
        book = Book()
        known = self.books.take({p.command.user_id for p in commands})
        tokens, cold = await self._load(book, [p.command for p in commands], known)
        decided = commands
        unsure: set[str] = set()  # users not kept in memory: a command not appended as decided
        if cold:
            decided = await self._defer(commands, book, cold)
            remaining = {id(p) for p in decided}
            unsure = {p.command.user_id for p in commands if id(p) not in remaining}
        with exact_arithmetic():
            appends = [self._decide(p, book, tokens) for p in decided]
        results = await self.store.append_many(appends)
        conflicted: set[str] = set()
        retry: list[_Pending] = []
        for pending, append, result in zip(decided, appends, results, strict=True):
            user = pending.command.user_id
            if result.status != "ok":
                unsure.add(user)
            if result.status == "conflict" or user in conflicted:
                conflicted.add(user)
                retry.append(pending)
            else:
                self._log_outcome(pending, append, result.status)
        self.books.keep(book, {user: token for user, token in tokens.items() if user not in unsure}, known)
        for pending in retry:
            await self._handle_alone(pending)

    async def _load(
        self, book: Book, commands: Sequence[wire.Command], known: dict[str, Kept]
    ) -> tuple[dict[str, str], set[str]]:
        """Load what the commands need, in pipelined waves until nothing is missing, and return
        the aggregates found archived (cold) and the users' tokens: the ``known`` users' from
        memory (``UserBooks``), whose entries are looked up first, the others' read first in the
        first wave's round trip: state read after a token is at least as new as it, so an append
        made in between by another handler always shows as a conflict. A wave follows what the
        last one loaded (an order's position, a slot's position; a position refers to nothing, so
        two waves follow the longest chain); what memory gives is walked again at once. A command
        is walked again only while it misses something: the book only grows. Deciding needs no
        more loading: evolving the book by a decision adds every aggregate and slot the decision
        made. With every user known and nothing missing, nothing is read."""
        table = instrument_table()
        pending = list(commands)
        tokens = {user: kept.token for user, kept in known.items()}
        tokens_of = [command.user_id for command in commands if command.user_id not in known]
        cold: set[str] = set()
        while True:
            wanted = [requirements(command, book, table) for command in pending]
            recalled = list(range(len(pending))) if known else []
            while recalled := [i for i in recalled if _recall(known, pending[i], book, wanted[i])]:
                for i in recalled:  # what memory gave may name more
                    wanted[i] = requirements(pending[i], book, table)
            missing = Requirements(
                frozenset().union(*(w.order_ids for w in wanted)),
                frozenset().union(*(w.position_ids for w in wanted)),
                frozenset().union(*(w.slots for w in wanted)),
            ).missing(book)
            if not missing and not tokens_of:
                return tokens, cold
            pending = [command for command, w in zip(pending, wanted, strict=True) if w.overlaps(missing)]
            loaded = await self.store.load(book, missing, tokens_of)
            tokens.update(loaded.tokens)
            cold |= loaded.cold
            tokens_of = []

    async def _defer(self, commands: list[_Pending], book: Book, cold: set[str]) -> list[_Pending]:
        """Set aside the commands that name an archived aggregate (``ledger:{s}:commands:cold``,
        published again by the ``OutcomeReader`` once it read that aggregate back) and return the
        others."""
        table = instrument_table()
        named = [(p, cold & ((w := requirements(p.command, book, table)).order_ids | w.position_ids)) for p in commands]
        waiting = [(p, ids) for p, ids in named if ids]
        if not waiting:
            return commands
        await self.store.defer([(p.entry.id, p.entry.fields, sorted(ids)) for p, ids in waiting])
        for p, _ids in waiting:
            self.log.info(
                "command on an archived aggregate waits for its state from PostgreSQL",
                command_id=p.command.command_id,
                user_id=p.command.user_id,
                entry_id=p.entry.id,
            )
        if self.on_archived is not None:
            self.on_archived()
        return [p for p, ids in named if not ids]

    def _decide(self, pending: _Pending, book: Book, tokens: dict[str, str]) -> Append:
        command = pending.command
        decision = decide(command, book, Context(now=self.clock(), new_id=self.new_id, instruments=instrument_table()))
        user = command.user_id
        append = Append(
            user_id=user,
            command_id=command.command_id,
            expected_token=tokens.get(user, ""),
            # Unique to this decision, not just the entry: when two handlers decide the same
            # entry (a claimed one), the loser's next commands must not match the winner's token.
            new_token=f"{pending.entry.id}:{random_hex(12)}",
            reply=_reply(command, decision),
        )
        tokens[user] = append.new_token
        if isinstance(decision, Decision):
            slots = evolve(book, decision.events)
            _snapshots(append, book, decision.events, slots)
        return append

    async def _handle_alone(self, pending: _Pending) -> None:
        """Decide one command again on fresh state until its append is not in conflict."""
        for _attempt in range(MAX_CONFLICT_RETRIES):
            book = Book()
            tokens, cold = await self._load(book, [pending.command], {})
            if cold and not await self._defer([pending], book, cold):
                return
            with exact_arithmetic():
                append = self._decide(pending, book, tokens)
            result = await self.store.append(append)
            if result.status != "conflict":
                self._log_outcome(pending, append, result.status)
                return
        raise RuntimeError(
            f"command {pending.command.command_id} of {pending.command.user_id} kept conflicting: "
            "another handler is writing the same user's state; it will be retried"
        )

    def _log_outcome(self, pending: _Pending, append: Append, status: str) -> None:
        command = pending.command
        fields: dict[str, Any] = {
            "command_id": command.command_id,
            "user_id": command.user_id,
            "type": command.__struct_config__.tag,
            "entry_id": pending.entry.id,
            "order_id": append.reply.order_id,
            "position_id": append.reply.position_id,
        }
        if status == "duplicate":
            self.log.info("duplicate command, first outcome replayed", **fields)
        elif status == "archived":
            self.log.info("duplicate of a compacted command: its first outcome is read from PostgreSQL", **fields)
            if self.on_archived is not None:
                self.on_archived()
        elif append.reply.error is not None:
            self.log.info("command rejected", code=append.reply.error.code, reason=append.reply.error.message, **fields)
        else:
            self.log.debug("command accepted", event_ids=[e.event_id for e in append.events], **fields)


def _recall(known: dict[str, Kept], command: wire.Command, book: Book, wanted: Requirements) -> bool:
    """Whether memory gave ``book`` some of what ``command`` wants (from its user's entry)."""
    kept = known.get(command.user_id)
    return kept is not None and kept.recall(book, wanted)


def _reply(command: wire.Command, decision: Decision | Rejection) -> wire.Reply:
    if isinstance(decision, Rejection):
        return wire.Reply(
            command_id=command.command_id,
            status="rejected",
            error=wire.ErrorInfo(decision.code.value, decision.message),
            order_id=decision.order_id,
            position_id=decision.position_id,
        )
    return wire.Reply(
        command_id=command.command_id,
        status="accepted",
        order_id=decision.order_id,
        position_id=decision.position_id,
    )


def _snapshots(append: Append, book: Book, events: Sequence[wire.Event], slots: set[str]) -> None:
    append.events = events
    for event in events:
        if isinstance(event, wire.DriftEvent):  # no snapshot: its slot says whether it is open
            continue
        if isinstance(event, wire.PositionEvent):
            position = book.positions[event.stream]
            if position is None:
                raise StateError(f"{event.type} of {event.stream}: no position state after evolving it")
            append.positions[event.stream] = position
        else:
            order = book.orders[event.stream]
            if order is None:
                raise StateError(f"{event.type} of {event.stream}: no order state after evolving it")
            append.orders[event.stream] = order
    append.slots = {slot: book.slots[slot] for slot in slots}


class _Unanswered(HandlingSignal):
    """A round of the OutcomeReader left duplicates waiting (their replies missing or altered)."""

    def __init__(self, left: int) -> None:
        super().__init__(f"{left} duplicates of compacted commands still wait")


class OutcomeReader:
    """Answers the duplicates of compacted commands of one shard from PostgreSQL, and reads back
    the archived aggregates the commands set aside by the handler name.

    Each command set aside (``ledger:{s}:commands:cold``) is published again once the states of
    the aggregates it names, folded from ``ledger_events``, are written back to the snapshots,
    in one step (``EventStore.rehydrate``). Each waiting duplicate (``ledger:{s}:outcomes:waiting``:
    outcome field -> marker) is answered with the reply stored in ``ledger_outcomes``, byte for
    byte, once its digest matches the marker, in one step that also stops its waiting
    (``EventStore.answer_waiting``). While
    PostgreSQL is away, or no database is configured (``database_url`` raises ``ServerNotConfigured``),
    or a reply is missing or does not match, it logs what to do and tries again with back-off.
    It connects only when a command or duplicate waits, so a ledger that never compacts never
    needs it.
    """

    def __init__(
        self,
        store: EventStore,
        database_url: Callable[[], str],
        *,
        poll_s: float = OUTCOME_POLL_S,
        backoff_s: tuple[float, float] = (defaults.BACKOFF_FIRST_S, defaults.BACKOFF_MAX_S),
    ) -> None:
        self.store = store
        self.database_url = database_url
        self.poll_s = poll_s
        self.backoff_s = backoff_s
        self.wake = asyncio.Event()
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self.log = log.bind(shard=store.keys.shard)

    async def run(self, stop: asyncio.Event) -> None:
        """Answer waiting duplicates every ``poll_s`` (or when woken) until ``stop`` is set; a
        failing round (PostgreSQL away, a reply missing) waits its back-off out, unwoken."""
        try:
            await poll(
                stop,
                self._attempt,
                retry_on=(_Unanswered, psycopg.OperationalError, ServerNotConfigured, TimeoutError, *RETRYABLE),
                on_retry=self._away,
                backoff=Backoff(*self.backoff_s),
                idle_s=self.poll_s,
                wake=self.wake,
            )
        finally:
            await self._disconnect()

    async def _attempt(self) -> bool:
        left = await self.answer_once()
        if left:
            raise _Unanswered(left)
        return False

    async def _away(self, exc: BaseException, retry_in_s: float) -> None:
        if isinstance(exc, _Unanswered):  # each unanswered duplicate was logged with what to do
            return
        self.log.warning(
            "duplicates of compacted commands wait: PostgreSQL is away; retrying",
            error=str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc),
            retry_in_s=retry_in_s,
        )
        await self._disconnect()

    async def answer_once(self) -> int:
        """Answer every waiting duplicate whose reply PostgreSQL gives; return how many are left."""
        _answered, left = await self._round()
        return left

    async def burst(self) -> int:
        """Answer what waits now; return how many were answered (as a consumer's ``burst``)."""
        answered, _left = await self._round()
        return answered

    async def _round(self) -> tuple[int, int]:
        sent, unsent = await self._cold_round()
        answered, left = await self._outcomes_round()
        return sent + answered, unsent + left

    async def _cold_round(self) -> tuple[int, int]:
        """Read back from PostgreSQL the archived aggregates the set-aside commands name, write
        them to Redis and publish those commands again (``EventStore.rehydrate``); a command
        whose aggregate PostgreSQL does not give stays set aside, with an error line."""
        deferred = await self.store.deferred()
        if not deferred:
            return 0, 0
        wanted = sorted({i for _entry, ids in deferred for i in ids if i})
        conn = await self._connection()
        states = await asyncio.wait_for(read_aggregates(conn, wanted), OUTCOME_QUERY_TIMEOUT_S)
        ready = [entry for entry, ids in deferred if all(i in states for i in ids if i)]
        for entry, ids in deferred:
            if any(i not in states for i in ids if i):
                self.log.error(
                    "command on an archived aggregate waits: ledger_events has no readable history of "
                    + ", ".join(i for i in ids if i and i not in states)
                    + "; restore ledger_events from a backup (it waits)",
                    deferred_entry=entry,
                )
        sent = await self.store.rehydrate(list(states.values()), ready) if ready else 0
        if sent:
            self.log.info("archived aggregates read back; their commands published again", commands=sent)
        return sent, len(deferred) - len(ready)

    async def _outcomes_round(self) -> tuple[int, int]:
        waiting = await self.store.waiting()
        if not waiting:
            return 0, 0
        ids = {field: outcome_ids(field) for field in waiting}
        conn = await self._connection()
        params = {
            "shard": self.store.keys.shard,
            "users": [user for user, _command in ids.values()],
            "commands": [command for _user, command in ids.values()],
        }
        cur = await asyncio.wait_for(conn.execute(_SQL["outcome_get"], params), OUTCOME_QUERY_TIMEOUT_S)
        replies = {(user, command): reply for user, command, reply in await cur.fetchall()}
        answered = left = 0
        for field, marker in waiting.items():
            user, command = ids[field]
            reply = replies.get((user, command))
            if reply is None or outcome_marker(reply.encode()) != marker:
                left += 1
                self.log.error(
                    "duplicate of a compacted command unanswered: its reply is "
                    + ("missing from" if reply is None else "altered in")
                    + " ledger_outcomes; restore that row from a backup (it waits)",
                    user_id=user,
                    command_id=command,
                    marker=marker,
                )
                continue
            if await self.store.answer_waiting(field, marker, reply):
                answered += 1
                self.log.info("compacted outcome given from PostgreSQL", user_id=user, command_id=command)
        return answered, left

    async def _connection(self) -> psycopg.AsyncConnection[Any]:
        if self._conn is None or self._conn.closed:
            self._conn = await psycopg.AsyncConnection.connect(
                self.database_url(), autocommit=True, connect_timeout=int(CONNECT_TIMEOUT_S)
            )
        return self._conn

    async def _disconnect(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(psycopg.Error, OSError):
                await conn.close()


async def handler_role(
    redis: Any, settings: Settings, live: Callable[[Any, int, Settings], InlineWrites | None] | None = None
) -> list[StreamConsumer | OutcomeReader]:
    """``ledger serve`` role ``handler``: one command consumer per shard (more may run), and one
    ``OutcomeReader`` per shard, which reaches the ledger's PostgreSQL (the configured one, else
    the private one of ``LEDGER_HOME``) only when a duplicate of a compacted command, or a
    command naming an archived aggregate, waits. ``live(redis, shard, settings)``: the live
    projection's writes that the append step makes itself (``EventStore``'s ``live``, given by
    the composition root; None on Redis Cluster)."""
    runnables: list[StreamConsumer | OutcomeReader] = []
    for shard in range(settings.shards):
        store = EventStore(
            redis, shard, reply_ttl_s=settings.reply_ttl_s, live=live(redis, shard, settings) if live else None
        )
        reader = OutcomeReader(store, lambda: known_url(settings, "postgres"))
        runnables.append(
            StreamConsumer(
                redis,
                stream=store.keys.commands,
                group=GROUP,
                handler=CommandHandler(store, settings.shards, on_archived=reader.wake.set).handle,
                dead_stream=store.keys.dead,
                settings=ConsumerSettings.from_settings(settings),
            )
        )
        runnables.append(reader)
    return runnables
