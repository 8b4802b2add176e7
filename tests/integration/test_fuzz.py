"""Fuzz test of the command path (issue 7): hostile entries against the real ``ledger serve`` roles.

Entries are published black-box, as a strategy in another language would: raw XADD of ``type``
and ``data`` bytes to ``ledger:{0}:commands`` (CONTRACT §2, §3). A hypothesis session mixes
well-formed commands (orders, fills, partial fills, cancels, accepts, rejects, expiries, opens,
closes, liquidations: so that real positions open and close) with hostile ones: random bytes,
JSON nested 1,000+ levels, wrong types, numbers for decimal strings, unicode tricks (NUL, lone
surrogates escaped or raw, a trailing newline, RTL marks, full-width digits, homoglyphs), key
injection (``:`` ``{`` ``}`` ``*`` newlines spaces in user_id, symbol and every id), huge values
(40-digit decimals, exponents, ``ts`` in year 10000, 1 MB metadata, a 10,000-character reason),
missing fields and entry fields, duplicate JSON keys, republished entries and reused command ids.
Commands go in rounds; after each round the real roles (the handler, the live projection and the
PostgreSQL projector, built by the factories ``ledger serve`` uses) are drained with ``burst``,
and the next round uses the order and position ids the replies and live hashes revealed.

Properties, after draining (CONTRACT §2-§6, §9):

* **Outcomes.** Every entry stays in the command stream and is consumed (no group has anything
  pending). A well-formed command gets a reply and no dead letter. A malformed entry gets exactly
  one dead letter in ``ledger:{0}:dead``; when its ``command_id`` and ``user_id`` can be read
  (``data`` is a strict JSON object within the parser's depth and both ids are valid per CONTRACT
  §1) it ALSO gets a rejection reply (CONTRACT §3: each malformed command gets a rejection with a
  reason, and entries too broken to answer go to the dead stream): so a readable malformed
  command ends in one reply AND one dead letter, an unreadable one in one dead letter only, and
  no entry ever has two dead letters.
* **Replies.** Each reply key holds exactly one JSON element of the shape of CONTRACT §4, with an
  expiry. It says either the rejection of one of the dead-lettered entries of its (user_id,
  command_id), with that dead letter's code, or the outcome of the command, whose ``events`` are
  exactly the log's events of that command (a duplicate never appends twice). When well-formed
  and malformed entries share a command id, the recorded outcome wins, whatever the batches:
  a malformed entry records none and never replaces one (CONTRACT §3).
* **Keys.** Every key in Redis (SCAN) fully matches a key pattern of CONTRACT §2, §6 or §8 with
  identifiers valid per §1, with the right Redis type, or is an internal key documented in
  ``ledger/keys.py`` (``fuzz_helpers.internal_keys``); every event carries valid identifiers.
* **History.** Every event of ``ledger:{0}:events`` is in ``ledger_events``; every
  ``OrderFilled`` is a ``fills`` row; every order whose last event is final and every closed or
  liquidated position is a row with that status and version; the projector's checkpoint is the
  last event; nothing of the event log is dead-lettered (projector or live projection).

``make test`` runs a bounded session; ``make test-fuzz`` a long one (``LEDGER_FUZZ_EXAMPLES``).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
from collections import defaultdict
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis.asyncio as aioredis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import event as reached
from hypothesis import strategies as st

from consumers.runner import ConsumerSettings, StreamConsumer
from ledger.app.service import role_factory
from ledger.config import Settings, parse_execution
from ledger.store.redis_conn import connect, ensure_shard_count
from projections.projector import open_pool, projector_consumer
from tests.fuzz_helpers import (
    COMMAND_ID,
    SYMBOL,
    USER_ID,
    Known,
    KnownOrder,
    KnownPosition,
    Planned,
    classify,
    encode,
    entry,
    hostile,
    internal_keys,
    readable_ids,
    reply_problems,
    show,
    valid_command,
)

EXAMPLES_ENV = "LEDGER_FUZZ_EXAMPLES"
LONG_RUN = os.environ.get(EXAMPLES_ENV)
# Bounded (make test): no shrinking, which would take minutes at about a second per example; the
# failing session is printed as drawn and each finding names its entry. Long (make test-fuzz):
# failures are shrunk to a minimal session.
FUZZ = settings(
    max_examples=int(LONG_RUN) if LONG_RUN else 25,
    phases=tuple(Phase) if LONG_RUN else (Phase.explicit, Phase.reuse, Phase.generate),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)
ROUNDS = 8  # rounds of publishing then draining per example
BATCH = 12  # entries per round at most

SHARDS = 1
COMMANDS, EVENTS, DEAD = "ledger:{0}:commands", "ledger:{0}:events", "ledger:{0}:dead"
FINAL_ORDER = {"filled", "cancelled", "rejected", "expired"}
FINAL_POSITION = {"PositionClosed": "closed", "PositionLiquidated": "liquidated"}
TABLES = ("ledger_events", "fills", "positions", "orders", "projector_checkpoints")


def text(value: Any) -> str:
    return value.decode("utf-8", "backslashreplace") if isinstance(value, bytes) else str(value)


# --------------------------------------------------------------------------- the session


@dataclass(frozen=True)
class Sent:
    entry_id: str
    planned: Planned
    ids: tuple[str, str] | None  # (user_id, command_id) when readable

    def __str__(self) -> str:
        return f"{self.entry_id} [{self.planned.label}] {show(self.planned.fields)}"


@dataclass
class Session:
    raw: Any  # a bytes client: the strategy's side
    consumers: list[StreamConsumer]
    known: Known = field(default_factory=Known)
    sent: list[Sent] = field(default_factory=list)

    async def publish(self, planned: Planned) -> Sent:
        entry_id = text(await self.raw.xadd(COMMANDS, planned.fields))
        sent = Sent(entry_id, planned, readable_ids(planned.fields))
        self.sent.append(sent)
        return sent

    async def drain(self) -> None:
        """Burst every role until none of them finds anything to do."""
        for _ in range(100):
            moved = 0
            for consumer in self.consumers:
                moved += await consumer.burst()
            if moved == 0:
                return
        raise AssertionError("the roles did not settle after 100 rounds of bursts")

    async def learn(self, batch: list[Sent]) -> None:
        """Take order and position ids from accepted replies, remaining quantities from the
        live order hashes (CONTRACT §4, §6), for the next round's commands."""
        for sent in batch:
            if sent.ids is None:
                continue
            user, command_id = sent.ids
            raw = await self.raw.lindex(f"ledger:{{0}}:reply:{user}:{command_id}", 0)
            try:
                reply = json.loads(raw) if raw is not None else {}
            except ValueError:
                continue
            if not isinstance(reply, dict) or reply.get("status") != "accepted":
                continue
            if isinstance(reply.get("order_id"), str):
                self.known.orders.setdefault(reply["order_id"], KnownOrder(user))
            if isinstance(reply.get("position_id"), str):
                self.known.positions.setdefault(reply["position_id"], KnownPosition(user))
        for order_id, order in self.known.orders.items():
            fields = await self.raw.hgetall(f"orders:{order_id}")
            try:
                quantity = Decimal(text(fields[b"quantity"]))
                remaining = quantity - Decimal(text(fields.get(b"filled_qty") or b"0"))
            except (KeyError, InvalidOperation):
                continue
            order.remaining = format(remaining if remaining > 0 else quantity, "f")
            order.final = text(fields.get(b"status")) in FINAL_ORDER
        active = {text(i) for i in await self.raw.smembers("positions:active")}
        for position_id, position in self.known.positions.items():
            position.open = position_id in active


@st.composite
def planned_entry(draw: st.DrawFn, session: Session) -> Planned:
    """A well-formed command, a hostile one, an entry published again, or a reused command id."""
    choice = draw(st.sampled_from(["valid"] * 7 + ["hostile"] * 3 + ["again", "reused-id"]))
    if choice == "again" and session.sent:
        before = draw(st.sampled_from(session.sent)).planned
        return Planned(before.fields, f"again: {before.label}", before.well_formed)
    kind, data = valid_command(draw, session.known)
    readable = [s.ids for s in session.sent if s.ids is not None]
    if choice == "reused-id" and readable:
        data["user_id"], data["command_id"] = draw(st.sampled_from(readable))
        return entry(kind, encode(data, True), "reused command_id", True)
    if choice == "hostile":
        return hostile(draw, kind, data)
    return entry(kind, encode(data, draw(st.booleans())), "valid", True)


async def run_session(redis_url: str, database_url: str, home: Path, data: st.DataObject) -> None:
    raw = aioredis.Redis.from_url(redis_url)
    ledger_redis = await connect(redis_url)
    pg = await psycopg.AsyncConnection.connect(database_url, autocommit=True)
    pool = open_pool(database_url, max_size=2)
    await pool.open()
    try:
        await raw.flushall()
        await pg.execute(f"TRUNCATE {', '.join(TABLES)}")
        config = Settings(
            redis_url=redis_url,
            database_url=database_url,
            shards=SHARDS,
            execution=parse_execution("external"),
            home=home,
        )
        await ensure_shard_count(ledger_redis, SHARDS)
        consumers = [
            *await role_factory("handler")(ledger_redis, config),
            *await role_factory("projection")(ledger_redis, config),
            projector_consumer(ledger_redis, pool, 0, settings=ConsumerSettings.from_settings(config)),
        ]
        session = Session(raw, consumers)
        for _ in range(data.draw(st.integers(2, ROUNDS), label="rounds")):
            batch = [
                await session.publish(data.draw(planned_entry(session), label="entry"))
                for _ in range(data.draw(st.integers(2, BATCH), label="entries"))
            ]
            await session.drain()
            await session.learn(batch)
        await check(session, pg)
    finally:
        await pool.close()
        await pg.close()
        await ledger_redis.aclose()
        await raw.aclose()


# --------------------------------------------------------------------------- the properties


@dataclass
class Findings:
    outcomes: list[str] = field(default_factory=list)
    replies: list[str] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)
    history: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Logged:
    entry_id: str
    type: str
    data: dict[str, Any]


def listing(problems: list[str], limit: int = 12) -> str:
    more = f"\n... and {len(problems) - limit} more" if len(problems) > limit else ""
    return "\n".join(problems[:limit]) + more


async def check(session: Session, pg: psycopg.AsyncConnection[Any]) -> None:
    raw = session.raw
    found = Findings()
    events = [Logged(text(i), text(f[b"type"]), json.loads(f[b"data"])) for i, f in await raw.xrange(EVENTS)]
    dead = await dead_letters(raw, found)
    for name in sorted(
        {e.type for e in events} | {f"dead letter {text(d[0].get(b'dead_code'))}" for d in dead.values()}
    ):
        reached(name)  # what the session reached: --hypothesis-show-statistics
    await check_consumed(raw, session, found)
    by_key = check_outcomes(session, dead, found)
    await check_replies(raw, by_key, dead, events, found)
    await check_keys(raw, session, by_key, events, found)
    await check_history(pg, events, dead, found)
    assert not found.outcomes, "entries without exactly one outcome:\n" + listing(found.outcomes)
    assert not found.replies, "replies that break CONTRACT §4:\n" + listing(found.replies)
    assert not found.keys, "keys or identifiers outside the contract:\n" + listing(found.keys)
    assert not found.history, "accepted events missing from PostgreSQL:\n" + listing(found.history)


async def dead_letters(raw: Any, found: Findings) -> dict[tuple[str, str], list[dict[bytes, bytes]]]:
    """Dead letters by (stream, entry id) they came from; more than one per entry is a finding."""
    dead: dict[tuple[str, str], list[dict[bytes, bytes]]] = defaultdict(list)
    for dead_id, fields in await raw.xrange(DEAD):
        if b"dead_stream" not in fields or b"dead_entry_id" not in fields:
            found.outcomes.append(f"dead letter {text(dead_id)} does not say where it came from: {show(fields)}")
            continue
        dead[(text(fields[b"dead_stream"]), text(fields[b"dead_entry_id"]))].append(fields)
    for (stream, entry_id), letters in dead.items():
        if len(letters) > 1:
            found.outcomes.append(f"{len(letters)} dead letters for {stream} entry {entry_id}: {show(letters[0])}")
        if stream not in (COMMANDS, EVENTS):
            found.outcomes.append(f"dead letter of an unknown stream {stream!r}: {show(letters[0])}")
    return dead


async def check_consumed(raw: Any, session: Session, found: Findings) -> None:
    logged = [text(i) for i, _ in await raw.xrange(COMMANDS)]
    if logged != [s.entry_id for s in session.sent]:
        found.outcomes.append(f"the command stream holds {len(logged)} entries, {len(session.sent)} were published")
    for stream in (COMMANDS, EVENTS):
        last = await raw.xrevrange(stream, count=1)
        last_id = text(last[0][0]) if last else None
        for info in await raw.xinfo_groups(stream):
            name, pending, delivered = text(info["name"]), int(info["pending"]), text(info["last-delivered-id"])
            if pending or (last_id is not None and delivered != last_id):
                found.outcomes.append(
                    f"group {name} of {stream}: {pending} pending, delivered up to {delivered} of {last_id}"
                )


def check_outcomes(
    session: Session, dead: dict[tuple[str, str], list[dict[bytes, bytes]]], found: Findings
) -> dict[tuple[str, str], list[Sent]]:
    """Each entry: a dead letter, or a reply it can be found by; returns entries by reply key."""
    by_key: dict[tuple[str, str], list[Sent]] = defaultdict(list)
    for sent in session.sent:
        letters = dead.get((COMMANDS, sent.entry_id), [])
        if sent.planned.well_formed and letters:
            letter = letters[0]
            found.outcomes.append(
                f"well-formed command dead-lettered ({text(letter.get(b'dead_code'))}: "
                f"{text(letter.get(b'dead_reason'))[:200]}): {sent}"
            )
        if not letters and sent.ids is None:
            found.outcomes.append(f"neither dead-lettered nor answerable (no readable ids): {sent}")
        if sent.ids is not None:
            by_key[sent.ids].append(sent)
    return by_key


async def check_replies(
    raw: Any,
    by_key: dict[tuple[str, str], list[Sent]],
    dead: dict[tuple[str, str], list[dict[bytes, bytes]]],
    events: list[Logged],
    found: Findings,
) -> None:
    types = {e.type for e in events}
    by_command: dict[tuple[str, str], list[dict[str, str]]] = defaultdict(list)
    for event in events:
        by_command[(event.data.get("user_id"), event.data.get("command_id"))].append(  # type: ignore[index]
            {"type": event.type, "id": event.entry_id}
        )
    for (user, command_id), sent in by_key.items():
        key = f"ledger:{{0}}:reply:{user}:{command_id}"
        items = await raw.lrange(key, 0, -1)
        last = sent[-1]
        if len(items) != 1:
            found.replies.append(f"{key} holds {len(items)} elements, not exactly one; last entry: {last}")
            continue
        try:
            reply = json.loads(items[0])
        except ValueError:
            found.replies.append(f"{key} is not JSON: {items[0][:200]!r}; last entry: {last}")
            continue
        for problem in reply_problems(reply, command_id, types):
            found.replies.append(f"{key}: {problem}; last entry: {last}")
        if await raw.ttl(key) <= 0:
            found.replies.append(f"{key} never expires; last entry: {last}")
        if not isinstance(reply, dict):
            continue
        codes = {
            text(dead[(COMMANDS, s.entry_id)][0].get(b"dead_code")) for s in sent if (COMMANDS, s.entry_id) in dead
        }
        error = reply.get("error")
        malformed = reply.get("status") == "rejected" and isinstance(error, dict) and error.get("code") in codes
        logged = by_command.get((user, command_id), [])
        decided = len(codes) < len(sent)  # a well-formed entry was decided: its outcome is recorded
        if decided and reply.get("events") != logged:
            found.replies.append(
                f"{key} says {reply}: not the recorded outcome, whose events are the log's {logged} "
                f"(a malformed entry must never replace it); last entry: {last}"
            )
        elif not decided and not malformed:
            found.replies.append(
                f"{key} says {reply}: not the rejection of a dead-lettered entry ({sorted(codes)}); last entry: {last}"
            )
    answered = {ids for ids, sent in by_key.items() if any((COMMANDS, s.entry_id) not in dead for s in sent)}
    for event in events:
        ids = (event.data.get("user_id"), event.data.get("command_id"))
        if ids not in answered:
            found.outcomes.append(f"event {event.entry_id} {event.type} of {ids}, a command never answered")


async def check_keys(
    raw: Any, session: Session, by_key: dict[tuple[str, str], list[Sent]], events: list[Logged], found: Findings
) -> None:
    internal = internal_keys(SHARDS, session.consumers)
    replies = {f"ledger:{{0}}:reply:{user}:{command_id}" for user, command_id in by_key}
    async for key in raw.scan_iter(count=1000):
        try:
            name = key.decode("utf-8")
        except UnicodeDecodeError:
            found.keys.append(f"{key!r}: not UTF-8")
            continue
        allowed = classify(name, SHARDS, internal)
        if allowed is None:
            found.keys.append(f"{name!r}: neither a contract key nor a documented internal key")
            continue
        what, kind = allowed
        actual = text(await raw.type(key))
        if kind != "*" and actual != kind:
            found.keys.append(f"{name!r}: a {what} that is a {actual}, not a {kind}")
        if what == "reply" and name not in replies:
            found.keys.append(f"{name!r}: a reply to no readable entry")
    for event in events:
        for name, rule in (("user_id", USER_ID), ("command_id", COMMAND_ID), ("symbol", SYMBOL)):
            value = event.data.get(name)
            if not (isinstance(value, str) and re.fullmatch(rule, value)):
                found.keys.append(f"event {event.entry_id} {event.type} carries {name} {value!r}")


async def check_history(
    pg: psycopg.AsyncConnection[Any],
    events: list[Logged],
    dead: dict[tuple[str, str], list[dict[bytes, bytes]]],
    found: Findings,
) -> None:
    for (stream, entry_id), letters in dead.items():
        if stream == EVENTS:
            letter = letters[0]
            found.history.append(
                f"event {entry_id} dead-lettered by {text(letter.get(b'dead_group'))} "
                f"({text(letter.get(b'dead_code'))}: {text(letter.get(b'dead_reason'))[:300]}): {show(letter)}"
            )

    async def rows(sql: str) -> list[tuple[Any, ...]]:
        cursor = await pg.execute(sql)
        return await cursor.fetchall()

    def event_of(event_id: str) -> str:
        event = next(e for e in events if e.data["event_id"] == event_id)
        return (
            f"{event.entry_id} {event.type} (command {event.data.get('command_id')!r}): {json.dumps(event.data)[:300]}"
        )

    archived = {str(r[0]) for r in await rows("SELECT event_id FROM ledger_events")}
    for event_id in sorted({e.data["event_id"] for e in events} - archived):
        found.history.append(f"not in ledger_events: {event_of(event_id)}")
    fills = {str(r[0]) for r in await rows("SELECT event_id FROM fills")}
    for event_id in sorted({e.data["event_id"] for e in events if e.type == "OrderFilled"} - fills):
        found.history.append(f"no fills row: {event_of(event_id)}")

    last: dict[str, Logged] = {}
    for event in events:
        last[event.data["stream"]] = event
    stored = {str(r[0]): (r[1], r[2]) for r in await rows("SELECT id, status, version FROM orders")}
    stored |= {str(r[0]): (r[1], r[2]) for r in await rows("SELECT id, status, version FROM positions")}
    for aggregate, event in last.items():
        status = event.data.get("status")
        final = status in FINAL_ORDER if event.type.startswith("Order") else event.type in FINAL_POSITION
        row = stored.get(aggregate)
        expected = (status, event.data["version"])
        if (final and row != expected) or (row is not None and row != expected):
            found.history.append(
                f"{aggregate}: row {row}, log says {expected} after {event_of(event.data['event_id'])}"
            )
    for aggregate in sorted(set(stored) - set(last)):
        found.history.append(f"{aggregate}: a row {stored[aggregate]} of no aggregate in the log")
    if events:
        checkpoint = await rows("SELECT entry_ms, entry_seq FROM projector_checkpoints WHERE shard = 0")
        at = f"{checkpoint[0][0]}-{checkpoint[0][1]}" if checkpoint else None
        if at != events[-1].entry_id:
            found.history.append(f"projector checkpoint {at}, last event {events[-1].entry_id}")


# --------------------------------------------------------------------------- the test


@pytest.mark.fuzz
@FUZZ
@given(data=st.data())
def test_every_entry_ends_in_one_outcome_within_the_contract_and_history_keeps_every_event(
    redis_url: str, database_url: str, tmp_path: Path, data: st.DataObject
) -> None:
    asyncio.run(run_session(redis_url, database_url, tmp_path, data))
