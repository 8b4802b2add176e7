"""The command handler: decode, validate, decide, append, reply (CONTRACT §3, §4).

A batch of command entries of one shard is handled in log order. State is loaded from the
shard's snapshots in a few pipelined waves, every command is decided by the pure decider
against one in-memory book, and all outcomes are appended in one pipeline, each atomically with
its reply and deduplication record. When another handler changed a user's state in between (the
append script answers ``conflict``), that user's remaining commands are decided again, one by
one, on freshly loaded state. Malformed entries are dead-lettered, with a rejection reply when
their ``command_id`` and ``user_id`` can be read, once per entry: a redelivered entry (a batch
retried entry by entry, a claimed entry) writes neither again. Any other failure of one entry
is the runner's to isolate (it retries the entry alone and counts its tries).
"""

from __future__ import annotations

import secrets
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import structlog

from consumers.deadletter import Reply, write_dead_letter
from consumers.runner import ConsumerSettings, Entry, StreamConsumer
from ledger import wire
from ledger.config import Settings
from ledger.decider import Context, Decision, Rejection, Requirements, decide, requirements
from ledger.eventstore import Append, EventStore
from ledger.evolution import evolve
from ledger.keys import outcome_field, shard_of
from ledger.state import Book, StateError
from ledger.values import now_ms

GROUP = "ledger-handler"
PREFETCH_WAVES = 3
MAX_CONFLICT_RETRIES = 20

log = structlog.get_logger("ledger.handler")


def new_uuid() -> str:
    return str(uuid.uuid4())


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
    ) -> None:
        self.store = store
        self.shards = shards
        self.clock = clock
        self.new_id = new_id

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
        log.warning(
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
        # Tokens first, state after: state read later is at least as new as the token, so an
        # append made in between by another handler always shows as a conflict.
        tokens = await self.store.tokens(p.command.user_id for p in commands)
        await self._prefetch(book, [p.command for p in commands])
        appends = [await self._decide(p, book, tokens) for p in commands]
        results = await self.store.append_many(appends)
        conflicted: set[str] = set()
        retry: list[_Pending] = []
        for pending, append, result in zip(commands, appends, results, strict=True):
            user = pending.command.user_id
            if result.status == "conflict" or user in conflicted:
                conflicted.add(user)
                retry.append(pending)
            else:
                self._log_outcome(pending, append, result.status)
        for pending in retry:
            await self._handle_alone(pending)

    async def _prefetch(self, book: Book, commands: Sequence[wire.Command]) -> None:
        for _ in range(PREFETCH_WAVES):
            wanted: list[Requirements] = [requirements(c, book).missing(book) for c in commands]
            missing = Requirements(
                frozenset().union(*(w.order_ids for w in wanted)),
                frozenset().union(*(w.position_ids for w in wanted)),
                frozenset().union(*(w.slots for w in wanted)),
            )
            if not missing:
                return
            await self.store.load(book, missing)

    async def _load(self, book: Book, command: wire.Command) -> None:
        while missing := requirements(command, book).missing(book):
            await self.store.load(book, missing)

    async def _decide(self, pending: _Pending, book: Book, tokens: dict[str, str]) -> Append:
        command = pending.command
        await self._load(book, command)
        decision = decide(command, book, Context(now=self.clock(), new_id=self.new_id))
        user = command.user_id
        append = Append(
            user_id=user,
            command_id=command.command_id,
            expected_token=tokens.get(user, ""),
            # Unique to this decision, not just the entry: when two handlers decide the same
            # entry (a claimed one), the loser's next commands must not match the winner's token.
            new_token=f"{pending.entry.id}:{secrets.token_hex(6)}",
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
            tokens = await self.store.tokens([pending.command.user_id])
            append = await self._decide(pending, book, tokens)
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
            log.info("duplicate command, first outcome replayed", **fields)
        elif append.reply.error is not None:
            log.info("command rejected", code=append.reply.error.code, reason=append.reply.error.message, **fields)
        else:
            log.debug("command accepted", event_ids=[e.event_id for e in append.events], **fields)


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


async def handler_role(redis: Any, settings: Settings) -> list[StreamConsumer]:
    """``ledger serve`` role ``handler``: one command consumer per shard (more may run)."""
    consumers = []
    for shard in range(settings.shards):
        store = EventStore(redis, shard, reply_ttl_s=settings.reply_ttl_s)
        consumers.append(
            StreamConsumer(
                redis,
                stream=store.keys.commands,
                group=GROUP,
                handler=CommandHandler(store, settings.shards).handle,
                dead_stream=store.keys.dead,
                settings=ConsumerSettings.from_settings(settings),
            )
        )
    return consumers
