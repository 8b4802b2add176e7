"""The consumer runner's contract (``consumers.runner.StreamConsumer``), run on a plain Redis and
on a Redis Cluster.

``RunnerContract`` holds what every consumer of the ledger relies on: delivery in log order and
in batches, acknowledgement, tries counted in Redis (so they survive the process), one dead
letter after ``max_deliveries`` failures, the operator's retry set, lease exclusivity with
takeover, and ``LeaseLost`` giving a delivery back. It is not collected by itself; each backend
subclasses it and says only how to get a client. Handlers here are plain functions that record
what they were given: the runner is checked alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis import exceptions as redis_errors

from consumers.entries import Entry
from consumers.runner import ConsumerSettings, LeaseLost, StreamConsumer, Undeliverable
from ledger.domain.values import now_ms
from tests.live_helpers import blocked_in

STREAM, DEAD, LEASE, GROUP = "t:{r}:in", "t:{r}:dead", "t:{r}:lease", "g"
TRIES, RETRIES, INDEX = f"{STREAM}:tries:{GROUP}", f"{STREAM}:retry:{GROUP}", f"{DEAD}:index"
SETTINGS = ConsumerSettings(batch_size=2, block_ms=50, claim_idle_ms=300, max_deliveries=2)
# A read that waits long enough to be seen blocked, and a lease not renewed within a test.
WAITING = ConsumerSettings(batch_size=2, block_ms=10_000, claim_idle_ms=60_000, max_deliveries=2)


class Recorder:
    """A handler recording each call's entries (their ``n`` field); raises what ``fail`` says."""

    def __init__(self, fail: dict[str, BaseException] | None = None) -> None:
        self.calls: list[list[str]] = []
        self.fail = fail or {}

    async def __call__(self, entries: list[Entry]) -> None:
        self.calls.append([e.fields["n"] for e in entries])
        for entry in entries:
            error = self.fail.get(entry.fields["n"])
            if error is not None:
                raise error


class RunnerContract:
    """What ``StreamConsumer`` promises on any Redis. Subclasses provide ``client``."""

    @pytest.fixture
    def client(self) -> Any:
        raise NotImplementedError

    def consumer(
        self,
        client: Any,
        handler: Any,
        name: str,
        *,
        leased: bool = False,
        settings: ConsumerSettings = SETTINGS,
        **options: Any,
    ) -> StreamConsumer:
        return StreamConsumer(
            client,
            stream=STREAM,
            group=GROUP,
            handler=handler,
            dead_stream=DEAD,
            name=name,
            settings=settings,
            lease_key=LEASE if leased else None,
            **options,
        )

    async def publish(self, client: Any, *names: str) -> list[str]:
        return [await client.xadd(STREAM, {"n": n}) for n in names]

    async def retry(self, client: Any, *entry_ids: str) -> None:
        for _letter_id, letter in await client.xrange(DEAD):
            await client.xdel(DEAD, _letter_id)
            await client.hdel(INDEX, f"{STREAM}/{GROUP}/{letter['dead_entry_id']}")
        await client.sadd(RETRIES, *entry_ids)

    # ----------------------------------------------------------------- delivery and ack

    async def test_burst_delivers_in_log_order_in_batches_and_acknowledges(self, client: Any) -> None:
        handler = Recorder()
        consumer = self.consumer(client, handler, "a")
        await consumer.ensure_group()
        ids = await self.publish(client, "1", "2", "3", "4", "5")

        assert await consumer.burst() == 5

        assert handler.calls == [["1", "2"], ["3", "4"], ["5"]]
        assert await _pending(client) == 0
        assert await client.exists(TRIES, DEAD) == 0
        assert await consumer.burst() == 0  # nothing left: returns at once
        assert handler.calls == [["1", "2"], ["3", "4"], ["5"]]
        (group,) = await client.xinfo_groups(STREAM)
        assert (group["last-delivered-id"], group["pending"]) == (ids[-1], 0)

    # ----------------------------------------------------------------- failures

    async def test_a_failing_entry_is_tried_alone_counted_in_redis_and_dead_lettered_once(self, client: Any) -> None:
        handler = Recorder({"p": ValueError("no")})
        first = self.consumer(client, handler, "a")
        await first.ensure_group()
        ids = await self.publish(client, "1", "p")

        await first.step(block=False)  # the batch fails: each entry alone, counted; p fails (try 1)
        assert handler.calls == [["1", "p"], ["1"], ["p"]]
        assert await client.hgetall(TRIES) == {ids[1]: "1", f"{ids[1]}:error": "ValueError('no')"}

        # The count lives in Redis: another process claims the entry and goes on counting.
        await asyncio.sleep(SETTINGS.claim_idle_ms / 1000 + 0.05)
        second = self.consumer(client, handler, "b")
        await second.step(block=False)  # try 2
        assert handler.calls[3:] == [["p"]]
        assert await client.hgetall(TRIES) == {ids[1]: "2", f"{ids[1]}:error": "ValueError('no')"}
        before = now_ms()
        assert await second.burst() == 1  # 2 tries done: dead-lettered, not handled again
        after = now_ms()

        assert handler.calls == [["1", "p"], ["1"], ["p"], ["p"]]
        ((letter_id, letter),) = await client.xrange(DEAD)
        assert before <= int(letter.pop("dead_ts")) <= after
        assert letter == {
            "n": "p",
            "dead_code": "DELIVERY_LIMIT",
            "dead_reason": "failed deliveries: 2; last error: ValueError('no')",
            "dead_stream": STREAM,
            "dead_entry_id": ids[1],
            "dead_group": GROUP,
        }
        assert await client.hgetall(INDEX) == {f"{STREAM}/{GROUP}/{ids[1]}": letter_id}
        assert await _pending(client) == 0
        assert await client.exists(TRIES) == 0
        assert await second.burst() == 0
        assert await client.xlen(DEAD) == 1

    async def test_an_undeliverable_entry_is_dead_lettered_at_once_with_its_reason(self, client: Any) -> None:
        handler = Recorder({"u": Undeliverable("UNDECODABLE", "data is not JSON")})
        consumer = self.consumer(client, handler, "a")
        await consumer.ensure_group()
        ids = await self.publish(client, "u", "2")

        assert await consumer.burst() == 2

        assert handler.calls == [["u", "2"], ["u"], ["2"]]
        ((_id, letter),) = await client.xrange(DEAD)
        assert (letter["n"], letter["dead_code"], letter["dead_reason"], letter["dead_entry_id"]) == (
            "u",
            "UNDECODABLE",
            "data is not JSON",
            ids[0],
        )
        assert await _pending(client) == 0
        assert await client.exists(TRIES) == 0

    async def test_an_operator_retry_runs_the_entry_alone_with_fresh_tries(self, client: Any) -> None:
        handler = Recorder({"p": ValueError("no")})
        consumer = self.consumer(client, handler, "a")
        await consumer.ensure_group()
        (poison,) = await self.publish(client, "p")
        await consumer.burst()
        assert handler.calls == [["p"]] * 3  # the batch, then tries 1 and 2
        handler.fail.clear()  # the bug is fixed
        handler.calls.clear()
        # The operator's retry (``ledger dead retry``): the dead letter and its index field go,
        # the entry's id joins the retry set ("1-1": an id the stream no longer holds).
        await self.retry(client, poison, "1-1")

        assert await consumer.burst() == 1

        assert handler.calls == [["p"]]
        assert await client.exists(RETRIES, TRIES) == 0
        assert await client.xlen(DEAD) == 0
        assert await _pending(client) == 0

        # Failing again, it is counted from zero and dead-lettered again after max tries.
        handler.fail["p"] = ValueError("still")
        await self.retry(client, poison)
        for _ in range(SETTINGS.max_deliveries + 1):
            consumer._next_retry = 0.0  # the retry set is read every block_ms
            await consumer.step(block=False)
        assert handler.calls == [["p"], ["p"], ["p"]]
        assert await client.exists(RETRIES, TRIES) == 0
        assert [(f["dead_entry_id"], f["dead_reason"]) for _i, f in await client.xrange(DEAD)] == [
            (poison, "failed deliveries: 2; last error: ValueError('still')")
        ]

    async def test_a_server_outage_is_not_counted(self, client: Any) -> None:
        handler = Recorder({"1": ConnectionError("server down")})
        consumer = self.consumer(client, handler, "a")
        await consumer.ensure_group()
        (entry_id,) = await self.publish(client, "1")
        for _ in range(SETTINGS.max_deliveries * 2):
            with pytest.raises(ConnectionError):
                await consumer.step(block=False)
            assert await client.hgetall(TRIES) == {entry_id: "-1"}  # delivered, given back: not a try
        handler.fail.clear()

        assert await consumer.burst() == 1

        assert handler.calls == [["1"]] * 5
        assert await client.exists(DEAD, TRIES) == 0
        assert await _pending(client) == 0

    # ----------------------------------------------------------------- the lease

    async def test_only_the_lease_holder_reads_and_a_successor_adopts_its_pending_entries(self, client: Any) -> None:
        stuck = asyncio.Event()

        async def hang(entries: list[Entry]) -> None:
            stuck.set()
            await asyncio.Event().wait()

        holder = self.consumer(client, hang, "holder", leased=True)
        await holder.ensure_group()
        ids = await self.publish(client, "1", "2", "3")
        task = asyncio.create_task(holder.step(block=False))
        await asyncio.wait_for(stuck.wait(), 5)
        assert await client.get(LEASE) == "holder"
        assert 0 < await client.pttl(LEASE) <= SETTINGS.claim_idle_ms

        standby_handler = Recorder()
        standby = self.consumer(client, standby_handler, "standby", leased=True)
        assert await standby.burst() == 0  # the lease is held: it reads nothing
        assert standby_handler.calls == []
        task.cancel()  # the holder dies in the middle of its batch
        with contextlib.suppress(asyncio.CancelledError):
            await task
        assert {c["name"]: c["pending"] for c in await client.xinfo_consumers(STREAM, GROUP)}["holder"] == 2

        await asyncio.sleep(SETTINGS.claim_idle_ms / 1000 + 0.05)  # the lease lapses
        assert await standby.burst() == 3

        assert await client.get(LEASE) == "standby"
        # The two entries of the unfinished batch are handled alone (counted), then the rest.
        assert standby_handler.calls == [["1"], ["2"], ["3"]]
        assert await _pending(client) == 0
        assert await client.exists(TRIES) == 0
        assert [e["n"] for _i, e in await client.xrange(STREAM)] == ["1", "2", "3"]
        assert ids == [i for i, _e in await client.xrange(STREAM)]

    async def test_lease_lost_gives_the_delivery_back_to_the_new_holder(self, client: Any) -> None:
        async def fenced(entries: list[Entry]) -> None:
            # The handler's atomic step finds the lease taken (a pause outlived it): nothing written.
            await client.set(LEASE, "successor", px=200)
            raise LeaseLost(f"{LEASE} is held by 'successor', not by 'stale'")

        stale = self.consumer(client, fenced, "stale", leased=True)
        await stale.ensure_group()
        (entry,) = await self.publish(client, "1")

        with pytest.raises(LeaseLost):
            await stale.step(block=False)

        assert await client.hgetall(TRIES) == {entry: "-1"}  # given back: not counted
        assert await client.exists(DEAD) == 0
        assert await _pending(client) == 1
        assert await stale.step(block=False) == 0  # it stands by while the successor holds the lease

        await asyncio.sleep(0.25)  # the successor's lease lapses unused; a healthy consumer takes over
        handler = Recorder()
        heir = self.consumer(client, handler, "heir", leased=True)
        assert await heir.burst() == 1
        assert handler.calls == [["1"]]
        assert await _pending(client) == 0
        assert await client.exists(TRIES, DEAD) == 0
        assert entry == (await client.xrange(STREAM))[0][0]

    async def test_a_batch_larger_than_one_lua_call_takes_is_marked_and_acknowledged(self, client: Any) -> None:
        # A batch of 4,500 entries: 9,000 counter fields, past Lua's unpack (about 8,000 values).
        settings = ConsumerSettings(batch_size=5_000, max_deliveries=2, claim_idle_ms=100, block_ms=50)

        def consumer(name: str) -> StreamConsumer:
            return StreamConsumer(
                client, stream=STREAM, group=GROUP, handler=Recorder(), dead_stream=DEAD, name=name, settings=settings
            )

        first = consumer("a")
        await first.ensure_group()
        pipe = client.pipeline(transaction=False)
        for n in range(4_500):
            pipe.xadd(STREAM, {"n": str(n)})
        await pipe.execute()
        await first._read(block=False)  # taken, then the process dies: all 4,500 left pending

        await asyncio.sleep(0.15)
        heir = consumer("b")
        entries = await heir._claim_stale()
        assert len(entries) == 4_500
        before = await heir._mark_pending(entries)
        assert before == [0] * 4_500  # delivered once, never finished: a try to count
        assert await client.hlen(TRIES) == 4_500

        await heir._ack(entries)
        assert await _pending(client) == 0
        assert await client.exists(TRIES) == 0

    # ----------------------------------------------------------------- an idle consumer

    async def test_an_idle_consumer_keeps_its_place_at_the_end_without_reading(self, client: Any) -> None:
        crashed = Recorder({"1": ValueError("bug")})
        reader = self.consumer(client, crashed, "reader", leased=True)
        await reader.ensure_group()
        await self.publish(client, "1", "2")
        await reader.step(block=False)  # "1" fails: counted and left pending, "2" handled
        assert await _pending(client) == 1
        assert await client.hgetall(TRIES) == {
            (await client.xrange(STREAM))[0][0]: "1",
            f"{(await client.xrange(STREAM))[0][0]}:error": "ValueError('bug')",
        }
        await client.delete(LEASE)  # the reading process stopped

        idle_handler = Recorder()
        idle = self.consumer(client, idle_handler, "idle", leased=True, reads=False)
        _third, fourth = await self.publish(client, "3", "4")
        assert await idle.step(block=False) == 0

        assert idle_handler.calls == []
        assert await _pending(client) == 0
        assert await client.exists(TRIES, DEAD) == 0
        (group,) = await client.xinfo_groups(STREAM)
        assert (group["last-delivered-id"], group["pending"]) == (fourth, 0)

        # Switched to reading again, it sees only what is published from then on.
        await self.publish(client, "5")
        assert await idle.step(block=False) == 0  # still idle: skipped too
        await client.delete(LEASE)
        handler = Recorder()
        assert await self.consumer(client, handler, "reader-2", leased=True).burst() == 0
        await self.publish(client, "6")
        assert await self.consumer(client, handler, "reader-2", leased=True).burst() == 1
        assert handler.calls == [["6"]]

    async def test_an_idle_consumer_moves_nothing_while_another_holds_the_lease(self, client: Any) -> None:
        idle = self.consumer(client, Recorder(), "idle", leased=True, reads=False)
        await idle.ensure_group()
        await client.set(LEASE, "reader", px=10_000)
        await self.publish(client, "1")

        assert await idle.step(block=False) == 0

        (group,) = await client.xinfo_groups(STREAM)
        assert group["last-delivered-id"] == "0-0"

    async def test_an_unordered_leased_consumer_reads_and_stands_by_without_its_lease(self, client: Any) -> None:
        """Not ``ordered`` (one XREADGROUP, the lease read behind it): it takes new entries while
        it holds the lease; once a tool holds it, what its read takes reaches no handler until
        the lease is free again, then it is adopted and handled."""
        handler = Recorder()
        consumer = self.consumer(client, handler, "a", leased=True, ordered=False)
        await consumer.ensure_group()
        await self.publish(client, "1", "2")
        assert await consumer.step(block=False) == 2

        await client.set(LEASE, "ledger-repair:host:1", px=10_000)
        await self.publish(client, "3")
        assert await consumer.step(block=False) == 0
        assert handler.calls == [["1", "2"]]

        await client.delete(LEASE)
        assert await consumer.burst() == 1
        assert handler.calls == [["1", "2"], ["3"]]
        assert await _pending(client) == 0

    async def test_run_stands_by_after_lease_lost_and_stops_on_request(self, client: Any) -> None:
        handler = Recorder()
        calls = 0

        async def first_fenced(entries: list[Entry]) -> None:
            nonlocal calls
            calls += 1
            if calls == 1:
                await client.set(LEASE, "successor", px=150)
                raise LeaseLost("lease moved")
            await handler(entries)

        consumer = self.consumer(client, first_fenced, "a", leased=True)
        await self.publish(client, "1", "2")
        stop = asyncio.Event()
        task = asyncio.create_task(consumer.run(stop))

        async def done() -> bool:
            return handler.calls == [["1", "2"]] and await _pending(client) == 0

        for _ in range(200):
            if await done():
                break
            await asyncio.sleep(0.02)
        stop.set()
        await asyncio.wait_for(task, 5)

        assert handler.calls == [["1", "2"]]
        assert await client.get(LEASE) is None  # given up once stopped: a standby takes over at once
        assert await client.exists(TRIES, DEAD) == 0

    async def test_a_consumer_that_stops_gives_up_only_its_own_lease(self, client: Any) -> None:
        standby = self.consumer(client, Recorder(), "b", leased=True)
        holder = self.consumer(client, Recorder(), "a", leased=True)
        await self.publish(client, "1")
        assert await holder.burst() == 1
        await client.set(LEASE, "ledger-repair:host:1", px=60_000)  # a tool paused it meanwhile
        stop = asyncio.Event()
        stop.set()
        await holder.run(stop)
        assert await client.get(LEASE) == "ledger-repair:host:1"

        await client.delete(LEASE)
        assert await standby.burst() == 0  # takes the lease: nothing left
        assert await client.get(LEASE) == "b"
        await standby.run(stop)
        assert await client.get(LEASE) is None


async def _pending(client: Any) -> int:
    return int((await client.xpending(STREAM, GROUP))["pending"])


class TestRunnerOnRedis(RunnerContract):
    @pytest.fixture
    def client(self, redis: Any) -> Any:
        return redis

    async def test_a_leased_consumer_sends_the_read_that_takes_what_wakes_it_behind_the_wait(self, client: Any) -> None:
        """A leased consumer with nothing new blocks in XREAD with the ``_READ_NEW`` that takes
        what wakes it already sent behind the wait: it sits, not yet run, in the blocked
        client's query buffer, and runs once the wait ends (the server's count of XREADGROUP
        calls, script calls included, grows by that one), so the wake-up and the take are one
        round trip."""
        handler = Recorder()
        consumer = self.consumer(client, handler, "a", leased=True)
        await consumer.ensure_group()
        await self.publish(client, "1")
        assert await consumer.step() == 1
        assert await _pending(client) == 1  # "1" handled: acknowledged with the next read

        waiting = asyncio.create_task(consumer.step())
        blocked = await blocked_in(client, "xread")
        assert await _pending(client) == 0  # acknowledged before the wait blocked
        reads = await _xreadgroup_calls(client)
        assert int(blocked["qbuf"]) > 0  # the pipelined EVALSHA of _READ_NEW, not yet run
        await self.publish(client, "2")

        assert await asyncio.wait_for(waiting, 10) == 1
        assert await _xreadgroup_calls(client) == reads + 1
        assert handler.calls == [["1"], ["2"]]
        assert await consumer.burst() == 0  # nothing new; "2" acknowledged
        assert await client.xpending(STREAM, GROUP) == {"pending": 0, "min": None, "max": None, "consumers": []}

    async def test_a_leased_consumer_acknowledges_waits_and_takes_in_one_round_trip(self, client: Any) -> None:
        """After a batch, the next step is one round trip whether or not an entry is there yet:
        the acknowledgement, the wait (at once when an entry is there) and the take, two script
        calls and one XREAD by the server's own count (a take tried before the wait would be a
        third script call; the lease is renewed at most every 20 s and the wait lasts 10 s at
        most, so neither adds a call)."""
        handler = Recorder()
        consumer = self.consumer(client, handler, "a", leased=True, settings=WAITING)
        await consumer.ensure_group()
        await self.publish(client, "1")
        assert await consumer.step() == 1

        before = await _calls(client, "evalsha", "xread")
        waiting = asyncio.create_task(consumer.step())
        await blocked_in(client, "xread")
        await self.publish(client, "2")
        assert await asyncio.wait_for(waiting, 10) == 1
        assert await _calls(client, "evalsha", "xread") == [before[0] + 2, before[1] + 1]

        await self.publish(client, "3", "4")  # there already: the wait returns at once
        before = await _calls(client, "evalsha", "xread")
        assert await consumer.step() == 2
        assert await _calls(client, "evalsha", "xread") == [before[0] + 2, before[1] + 1]
        assert handler.calls == [["1"], ["2"], ["3", "4"]]

    async def test_a_lingering_consumer_gathers_what_comes_after_a_short_batch(self, client: Any) -> None:
        """``linger_ms``: after a batch smaller than ``batch_size`` the step waits before the next
        read, so entries published 50 and 100 ms later come in one batch (without it the next
        read would return the first alone); ``burst`` does not wait."""
        handler = Recorder()
        settings = dataclasses.replace(WAITING, batch_size=10, linger_ms=400)
        consumer = self.consumer(client, handler, "a", settings=settings)
        await consumer.ensure_group()
        await self.publish(client, "1")

        async def later() -> None:
            for n in ("2", "3"):
                await asyncio.sleep(0.05)
                await self.publish(client, n)

        publishing = asyncio.create_task(later())
        assert await consumer.step() == 1
        assert await consumer.step() == 2
        await publishing
        await self.publish(client, "4")
        assert await asyncio.wait_for(consumer.burst(), 0.3) == 1
        assert handler.calls == [["1"], ["2", "3"], ["4"]]

    async def test_an_unordered_leased_consumer_hands_nothing_over_once_the_lease_moved(self, client: Any) -> None:
        """Not ``ordered``: it waits in XREADGROUP itself (no script). A tool takes the lease while
        it waits: what the read then takes stays pending, neither its handler nor its idle work
        runs, and it stands by; once the lease is free it takes it again and handles what it had
        taken, and its idle work runs when a read finds nothing."""
        handler = Recorder()
        idle: list[int] = []

        async def idle_work() -> None:
            idle.append(len(handler.calls))

        consumer = self.consumer(client, handler, "a", leased=True, settings=WAITING, ordered=False, idle=idle_work)
        await consumer.ensure_group()
        await self.publish(client, "1")
        assert await consumer.step() == 1

        before = await _calls(client, "evalsha")
        waiting = asyncio.create_task(consumer.step())
        await blocked_in(client, "xreadgroup")
        await client.set(LEASE, "ledger-repair:host:1")
        await self.publish(client, "2")
        assert await asyncio.wait_for(waiting, 10) == 0
        assert await _calls(client, "evalsha") == [before[0] + 2]  # acknowledging "1", renewing refused
        assert (handler.calls, idle) == ([["1"]], [])
        assert await _pending(client) == 1  # "2", taken by the read

        await client.delete(LEASE)
        assert await consumer.burst() == 1
        assert (handler.calls, idle) == ([["1"], ["2"]], [2])
        assert await _pending(client) == 0

    async def test_a_leased_consumer_reads_on_after_the_server_lost_its_scripts(self, client: Any) -> None:
        """``SCRIPT FLUSH`` (what a restarted server's cache looks like) before a read, and while
        a read waits with ``_READ_NEW`` sent behind it: each script is loaded again as it is
        needed (the read's, then the acknowledgement's), nothing is lost or left pending."""
        handler = Recorder()
        consumer = self.consumer(client, handler, "a", leased=True)
        await consumer.ensure_group()
        assert await consumer.step(block=False) == 0  # takes the lease, its scripts loaded
        await client.script_flush()
        await self.publish(client, "1")
        assert await consumer.step(block=False) == 1

        waiting = asyncio.create_task(consumer.step())  # acknowledges "1" first: script loaded again
        await blocked_in(client, "xread")
        await client.script_flush()  # the _READ_NEW queued behind the wait is unknown now
        await self.publish(client, "2")
        assert await asyncio.wait_for(waiting, 10) == 1

        assert await consumer.burst() == 0
        assert handler.calls == [["1"], ["2"]]
        assert await _pending(client) == 0

    async def test_an_unleased_consumer_acknowledges_a_batch_before_its_next_read_blocks(self, client: Any) -> None:
        handler = Recorder()
        consumer = self.consumer(client, handler, "a")
        await consumer.ensure_group()
        await self.publish(client, "1", "2")
        assert await consumer.step() == 2
        assert await _pending(client) == 2  # handled: acknowledged with the next read

        waiting = asyncio.create_task(consumer.step())
        await blocked_in(client, "xreadgroup")
        assert await _pending(client) == 0
        await self.publish(client, "3")
        assert await asyncio.wait_for(waiting, 10) == 1

        stop = asyncio.Event()
        stop.set()
        await consumer.run(stop)  # a consumer that stops acknowledges what it handled
        assert handler.calls == [["1", "2"], ["3"]]
        assert await _pending(client) == 0


async def test_an_outage_while_waiting_keeps_the_batch_to_acknowledge_again(redis: Any) -> None:
    """The connection dies while the read behind the acknowledgement blocks: whether or not the
    acknowledgement ran, it is sent again with the next read; nothing is handled twice and no
    counter is left behind."""
    handler = Recorder()
    consumer = StreamConsumer(
        redis, stream=STREAM, group=GROUP, handler=handler, dead_stream=DEAD, name="a", settings=WAITING
    )
    await consumer.ensure_group()
    await redis.xadd(STREAM, {"n": "1"})
    assert await consumer.step() == 1

    waiting = asyncio.create_task(consumer.step())
    blocked = await blocked_in(redis, "xreadgroup")
    await redis.client_kill_filter(_id=blocked["id"])
    with pytest.raises(redis_errors.ConnectionError):
        await asyncio.wait_for(waiting, 10)

    await redis.xadd(STREAM, {"n": "2"})
    assert await consumer.burst() == 1
    assert handler.calls == [["1"], ["2"]]
    assert await _pending(redis) == 0
    assert await redis.exists(TRIES) == 0


async def test_a_consumer_stopping_while_the_server_does_not_answer_stops_all_the_same(
    redis: Any, redis_url: str
) -> None:
    """Its last batch stays pending (claimed later, handled again: handlers are idempotent) and
    its lease lapses by itself. The server holds writes (CLIENT PAUSE) past the consumer's
    socket timeout."""
    client = aioredis.Redis.from_url(redis_url, decode_responses=True, socket_timeout=0.3)
    consumer = StreamConsumer(
        client, stream=STREAM, group=GROUP, handler=Recorder(), dead_stream=DEAD, name="a", settings=SETTINGS
    )
    await consumer.ensure_group()
    await redis.xadd(STREAM, {"n": "1"})
    assert await consumer.step() == 1
    stop = asyncio.Event()
    stop.set()
    await redis.execute_command("CLIENT", "PAUSE", 3000, "WRITE")
    try:
        await asyncio.wait_for(consumer.run(stop), 10)
    finally:
        await redis.execute_command("CLIENT", "UNPAUSE")
        await client.aclose()
    assert await _pending(redis) == 1


async def _xreadgroup_calls(client: Any) -> int:
    (calls,) = await _calls(client, "xreadgroup")
    return calls


async def _calls(client: Any, *commands: str) -> list[int]:
    """How many times the server ran each of ``commands`` (script calls included)."""
    stats = await client.info("commandstats")
    return [int(stats.get(f"cmdstat_{command}", {}).get("calls", 0)) for command in commands]


class TestRunnerOnCluster(RunnerContract):
    @pytest.fixture
    def client(self, redis_cluster: Any) -> Any:
        return redis_cluster
