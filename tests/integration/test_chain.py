"""The events' hash chain (issue 9, part 5): appended by the append script, archived with the
exact data text, checked by ``ledger verify --chain`` in both tiers, each kind of tampering
named by its entry; ``ledger checkpoint`` and ``--expect``.

The log is made by the real command handler (deterministic clock and ids) on a real Redis or
Redis Cluster and archived by the real projector into a real PostgreSQL. The expected hashes
are computed here from the contract of ``ledger.store.chain`` with ``hashlib``, never read back from
the code under test.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import psycopg
import psycopg_pool
import pytest

from consumers.command_handler import CommandHandler
from consumers.entries import Entry
from ledger.store.chain import Finding
from ledger.store.eventstore import EventStore
from ledger.store.redis_conn import ensure_shard_count
from projections.chain_check import ChainReport, verify_chain
from projections.projector import Projector, open_pool
from tests.audit_helpers import ledger_cli

EVENTS = "ledger:{0}:events"
CHAIN = "ledger:{0}:chain"
GENESIS = hashlib.sha1(b"ledger:{0}:events").hexdigest()
NOW = 1_767_225_600_000  # 2026-01-01T00:00:00Z


def sha1(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()


def commands(count: int) -> list[tuple[str, dict[str, Any]]]:
    """``count`` commands of user u1: limit orders, each filled once by the next command (an
    order, then a fill: OrderFilled + a position event), non-ASCII metadata included."""
    made: list[tuple[str, dict[str, Any]]] = []
    for i in range(count):
        if i % 2 == 0:
            data = {
                "exchange": "okx",
                "symbol": "BTC-USDT-SWAP",
                "side": "buy",
                "order_type": "limit",
                "quantity": "0.1",
                "price": "45000",
                "metadata": {"note": "café ✓ 東京", "i": i},
            }
            made.append(("place_order", data))
        else:
            made.append(("record_fill", {"fill_id": f"t{i}", "quantity": "0.1", "price": "45000"}))
    return made


class Rig:
    """The real handler of shard 0 with a fixed clock and ids derived from a counter."""

    def __init__(self, redis: Any) -> None:
        self.redis = redis
        self.ids = 0
        self.handler = CommandHandler(EventStore(redis, 0), 1, clock=lambda: NOW, new_id=self._new_id)
        self.last_order = ""

    def _new_id(self) -> str:
        self.ids += 1
        return str(uuid.uuid5(uuid.NAMESPACE_URL, f"chain-test-{self.ids}"))

    async def run(self, count: int, first: int = 0) -> None:
        await ensure_shard_count(self.redis, 1)
        for i, (type_name, data) in enumerate(commands(first + count)[first:], start=first):
            data = {"command_id": f"c{i}", "user_id": "u1", **data}
            if type_name == "record_fill":
                data["order_id"] = self.last_order
            await self.handler.handle([Entry(f"{i + 1}-0", {"type": type_name, "data": json.dumps(data)})])
            reply = json.loads(await self.redis.lindex(f"ledger:{{0}}:reply:u1:c{i}", 0))
            assert reply["status"] == "accepted", reply
            self.last_order = reply["order_id"] or self.last_order
            await asyncio.sleep(0.002)  # commands on distinct milliseconds: room between them


async def log(redis: Any) -> list[tuple[str, dict[str, str]]]:
    return [(str(i), dict(f)) for i, f in await redis.xrange(EVENTS)]


async def rebuild(redis: Any, entries: list[tuple[str, dict[str, str]]]) -> None:
    """Replace the stream by ``entries`` (XADD cannot edit an entry: a tampered copy)."""
    await redis.delete(EVENTS)
    for entry_id, fields in entries:
        await redis.xadd(EVENTS, fields, id=entry_id)


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[psycopg_pool.AsyncConnectionPool[Any]]:
    pool: psycopg_pool.AsyncConnectionPool[Any] = open_pool(database_url)
    await pool.open()
    try:
        yield pool
    finally:
        await pool.close()


async def archive(redis: Any, pool: Any) -> None:
    """The real projector archives every entry of the log."""
    await Projector(pool, redis, 0).project([Entry(i, f) for i, f in await log(redis)])


async def check(redis: Any, database_url: str, *expect: tuple[int, int, str]) -> ChainReport:
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        return await verify_chain(redis, conn, [0], expect)


@pytest.fixture
async def chained(redis: Any, pool: Any) -> list[tuple[str, dict[str, str]]]:
    """Six commands (nine events) appended and archived; the log as Redis holds it."""
    await Rig(redis).run(6)
    await archive(redis, pool)
    entries = await log(redis)
    assert len(entries) == 9
    return entries


def ids(entries: list[tuple[str, dict[str, str]]]) -> list[str]:
    return [entry_id for entry_id, _fields in entries]


def only(report: ChainReport) -> Finding:
    assert not report.ok
    (finding,) = report.findings
    return finding


# --------------------------------------------------------------------------- appending


async def test_every_event_is_chained_over_its_exact_bytes(redis: Any) -> None:
    await Rig(redis).run(4)
    prev = GENESIS
    entries = await log(redis)
    for n, (_entry_id, fields) in enumerate(entries, start=1):
        assert set(fields) == {"type", "data", "n", "hash"}
        assert fields["n"] == str(n)
        prev = sha1(f"{prev}\n{n}\n{fields['type']}\n{fields['data']}")
        assert fields["hash"] == prev
    assert "café ✓ 東京" in json.loads(entries[0][1]["data"])["metadata"]["note"]
    assert await redis.hgetall(CHAIN) == {"id": entries[-1][0], "n": str(len(entries)), "hash": prev}


async def test_chain_head_is_deterministic_given_the_data(redis: Any) -> None:
    heads = []
    for _round in range(2):
        await redis.flushall()
        await Rig(redis).run(10)
        head = await redis.hgetall(CHAIN)
        heads.append((head["n"], head["hash"]))
    assert heads[0] == heads[1]
    assert heads[0][0] == "15"  # 5 orders (1 event each) and 5 fills (2 events each)


async def test_rejections_and_duplicates_chain_nothing(redis: Any) -> None:
    rig = Rig(redis)
    await rig.run(2)
    head = await redis.hgetall(CHAIN)
    unknown = {"command_id": "x1", "user_id": "u1", "order_id": str(uuid.uuid4()), "fill_id": "z"}
    unknown.update(quantity="1", price="1")
    for entry_id in ("90-0", "91-0"):  # a rejection, then the same command again (a duplicate)
        await rig.handler.handle([Entry(entry_id, {"type": "record_fill", "data": json.dumps(unknown)})])
    assert json.loads(await redis.lindex("ledger:{0}:reply:u1:x1", 0))["status"] == "rejected"
    assert await redis.hgetall(CHAIN) == head
    assert await redis.xlen(EVENTS) == 3


async def test_archive_keeps_the_exact_text_number_and_hash(
    redis: Any, pg: psycopg.AsyncConnection[Any], chained: list[tuple[str, dict[str, str]]]
) -> None:
    cur = await pg.execute("SELECT entry_id, data_raw, chain_n, chain_hash FROM ledger_events ORDER BY chain_n")
    rows = await cur.fetchall()
    assert rows == [(i, f["data"], int(f["n"]), f["hash"]) for i, f in chained]


# --------------------------------------------------------------------------- verifying


async def test_intact_chain_verifies(redis: Any, database_url: str, chained: list[tuple[str, dict[str, str]]]) -> None:
    report = await check(redis, database_url)
    assert report.ok and report.findings == []
    (shard,) = report.shards
    assert (shard.chained, shard.unchained, shard.redis_entries, shard.archived) == (9, 0, 9, 9)
    assert shard.head is not None and (shard.head.entry_id, shard.head.n) == (chained[-1][0], 9)


async def test_redis_data_edited_is_named(
    redis: Any, database_url: str, chained: list[tuple[str, dict[str, str]]]
) -> None:
    tampered = [(i, dict(f)) for i, f in chained]
    tampered[2][1]["data"] = tampered[2][1]["data"].replace('"45000"', '"44000"', 1)
    assert tampered[2][1]["data"] != chained[2][1]["data"]
    await rebuild(redis, tampered)
    e = ids(chained)
    assert only(await check(redis, database_url)) == Finding(
        0,
        "redis",
        "altered",
        e[2],
        3,
        f"shard 0 redis: entry {e[2]} (#3) was altered: its hash does not match its type, data and the hash "
        f"of entry {e[1]} (#2)",
    )


async def test_redis_entry_deleted_is_named(
    redis: Any, database_url: str, chained: list[tuple[str, dict[str, str]]]
) -> None:
    e = ids(chained)
    await redis.xdel(EVENTS, e[3])
    assert only(await check(redis, database_url)) == Finding(
        0,
        "redis",
        "deleted",
        e[4],
        4,
        f"shard 0 redis: #4 missing between entry {e[2]} (#3) and entry {e[4]} (#5): deleted",
    )


async def test_redis_last_entry_deleted_is_named_by_the_head(
    redis: Any, database_url: str, chained: list[tuple[str, dict[str, str]]]
) -> None:
    e = ids(chained)
    await redis.xdel(EVENTS, e[8])
    assert only(await check(redis, database_url)) == Finding(
        0,
        "redis",
        "deleted",
        e[8],
        9,
        f"shard 0 redis: #9 missing after entry {e[7]} (#8): the chain head ledger:{{0}}:chain names #9 "
        f"(entry {e[8]}): deleted",
    )


async def test_redis_entry_inserted_is_named(
    redis: Any, database_url: str, chained: list[tuple[str, dict[str, str]]]
) -> None:
    e = ids(chained)
    ms = int(e[2].split("-")[0])
    assert int(e[3].split("-")[0]) > ms  # #3 ends a command, #4 starts the next one
    forged = f"{ms}-99"
    copy = dict(chained[1][1])
    del copy["n"], copy["hash"]
    await rebuild(redis, [*chained[:3], (forged, copy), *chained[3:]])
    assert only(await check(redis, database_url)) == Finding(
        0,
        "redis",
        "inserted",
        forged,
        None,
        f"shard 0 redis: entry {forged} has no chain hash and follows entry {e[2]} (#3): inserted",
    )


async def test_redis_forged_entry_with_a_valid_link_is_named(
    redis: Any, database_url: str, chained: list[tuple[str, dict[str, str]]]
) -> None:
    """Anyone can compute SHA-1: a forged #4 that follows #3 correctly is told apart from the real
    #4 because the chain goes on from the real one."""
    e = ids(chained)
    ms = int(e[2].split("-")[0])
    forged = f"{ms}-99"
    data = chained[3][1]["data"].replace('"0.1"', '"0.2"')
    fields = {"type": chained[3][1]["type"], "data": data, "n": "4"}
    fields["hash"] = sha1(f"{chained[2][1]['hash']}\n4\n{fields['type']}\n{data}")
    await rebuild(redis, [*chained[:3], (forged, fields), *chained[3:]])
    assert only(await check(redis, database_url)) == Finding(
        0,
        "redis",
        "inserted",
        forged,
        4,
        f"shard 0 redis: entry {forged} (#4) is not part of the chain (entry {e[3]} (#4) is #4): inserted",
    )


async def test_redis_entry_appended_past_the_head_is_named(
    redis: Any, database_url: str, chained: list[tuple[str, dict[str, str]]]
) -> None:
    added = str(await redis.xadd(EVENTS, chained[0][1]))  # a copy of #1, fields and all
    e = ids(chained)
    assert only(await check(redis, database_url)) == Finding(
        0,
        "redis",
        "inserted",
        added,
        1,
        f"shard 0 redis: entry {added} lies past the chain head ledger:{{0}}:chain (#9, entry {e[8]}): inserted",
    )


async def test_redis_entries_reordered_are_named(
    redis: Any, database_url: str, chained: list[tuple[str, dict[str, str]]]
) -> None:
    e = ids(chained)
    swapped = [*chained[:3], (e[3], chained[4][1]), (e[4], chained[3][1]), *chained[5:]]
    await rebuild(redis, swapped)
    assert only(await check(redis, database_url)) == Finding(
        0,
        "redis",
        "reordered",
        e[3],
        5,
        f"shard 0 redis: entry {e[3]} (#5) comes before #4 (entry {e[4]} (#4)): reordered",
    )


async def test_archived_data_raw_edited_is_named(
    redis: Any, pg: psycopg.AsyncConnection[Any], database_url: str, chained: list[tuple[str, dict[str, str]]]
) -> None:
    e = ids(chained)
    await pg.execute(
        "UPDATE ledger_events SET data_raw = replace(data_raw, '45000', '46000') WHERE entry_id = %s", [e[5]]
    )
    assert only(await check(redis, database_url)) == Finding(
        0,
        "archive",
        "altered",
        e[5],
        6,
        f"shard 0 archive: entry {e[5]} (#6) was altered: its hash does not match its type, data and the hash "
        f"of entry {e[4]} (#5)",
    )


async def test_archived_row_deleted_is_named(
    redis: Any, pg: psycopg.AsyncConnection[Any], database_url: str, chained: list[tuple[str, dict[str, str]]]
) -> None:
    e = ids(chained)
    await pg.execute("DELETE FROM ledger_events WHERE entry_id = %s", [e[0]])
    assert only(await check(redis, database_url)) == Finding(
        0,
        "archive",
        "deleted",
        e[1],
        1,
        f"shard 0 archive: #1 missing between the genesis and entry {e[1]} (#2): deleted",
    )


async def test_archived_rows_reordered_are_named(
    redis: Any, pg: psycopg.AsyncConnection[Any], database_url: str, chained: list[tuple[str, dict[str, str]]]
) -> None:
    e = ids(chained)
    await pg.execute(
        """UPDATE ledger_events AS a
           SET type = b.type, data_raw = b.data_raw, chain_n = b.chain_n, chain_hash = b.chain_hash
           FROM ledger_events AS b
           WHERE (a.entry_id, b.entry_id) IN ((%(x)s, %(y)s), (%(y)s, %(x)s))""",
        {"x": e[6], "y": e[7]},
    )
    assert only(await check(redis, database_url)) == Finding(
        0,
        "archive",
        "reordered",
        e[6],
        8,
        f"shard 0 archive: entry {e[6]} (#8) comes before #7 (entry {e[7]} (#7)): reordered",
    )


async def test_a_rewritten_suffix_is_caught_by_the_other_tier_and_the_checkpoint(
    redis: Any, database_url: str, chained: list[tuple[str, dict[str, str]]]
) -> None:
    """Someone who rewrites Redis from #7 on with valid hashes and moves the head makes Redis
    consistent again; the archive and a checkpoint written down before both disagree."""
    before = await redis.hgetall(CHAIN)
    prev = chained[5][1]["hash"]
    rewritten = [(i, dict(f)) for i, f in chained]
    for entry_id, fields in rewritten[6:]:
        fields["data"] = fields["data"].replace("45000", "41000")
        prev = fields["hash"] = sha1(f"{prev}\n{fields['n']}\n{fields['type']}\n{fields['data']}")
        last = entry_id
    await rebuild(redis, rewritten)
    await redis.hset(CHAIN, mapping={"id": last, "n": "9", "hash": prev})
    e = ids(chained)

    archive_says = (
        f"shard 0 archive: entry {e[8]} (#9) has hash {before['hash']}, the chain head ledger:{{0}}:chain names "
        f"entry {e[8]} with hash {prev}: the log or its head was rewritten"
    )
    disagree = f"shard 0: Redis and the archive disagree on entry {e[6]} (data, hash)"
    report = await check(redis, database_url)
    assert [(f.tier, f.kind, f.entry_id, f.message) for f in report.findings] == [
        ("archive", "altered", e[8], archive_says),
        ("both", "disagree", e[6], disagree),
    ]

    report = await check(redis, database_url, (0, 9, before["hash"]))
    redis_says = (
        f"shard 0 redis: entry {e[8]} (#9) has hash {prev}, the checkpoint says {before['hash']}: "
        "the log was rewritten since"
    )
    assert [f.message for f in report.findings] == [redis_says, archive_says, disagree]


async def test_checkpoint_past_the_end_and_a_good_one(
    redis: Any, database_url: str, chained: list[tuple[str, dict[str, str]]]
) -> None:
    e = ids(chained)
    assert (await check(redis, database_url, (0, 4, chained[3][1]["hash"]))).ok
    await redis.xdel(EVENTS, e[8])
    await redis.hset(CHAIN, mapping={"id": e[7], "n": "8", "hash": chained[7][1]["hash"]})
    report = await check(redis, database_url, (0, 9, chained[8][1]["hash"]))
    assert [f.message for f in report.findings] == [
        "shard 0 redis: the log ends at #8, before the checkpoint's #9: deleted",
        f"shard 0 archive: entry {e[8]} lies past the chain head ledger:{{0}}:chain (#8, entry {e[7]}): inserted",
    ]


async def test_trimmed_redis_reads_the_archive(
    redis: Any, database_url: str, chained: list[tuple[str, dict[str, str]]]
) -> None:
    await redis.xtrim(EVENTS, minid=chained[5][0], approximate=False)
    report = await check(redis, database_url)
    assert report.ok, report.findings
    (shard,) = report.shards
    assert (shard.chained, shard.redis_entries, shard.archived) == (9, 4, 9)


async def test_unarchived_tail_and_projector_gaps_are_read_from_redis(
    redis: Any, pg: psycopg.AsyncConnection[Any], pool: Any, database_url: str
) -> None:
    await Rig(redis).run(4)
    entries = await log(redis)
    await Projector(pool, redis, 0).project([Entry(i, f) for i, f in entries[:3]])
    e = ids(entries)
    ms, seq = (int(x) for x in e[1].split("-"))
    await pg.execute("DELETE FROM ledger_events WHERE entry_id = %s", [e[1]])
    await pg.execute(
        "INSERT INTO projector_gaps (shard, entry_id, entry_ms, entry_seq, type, code, reason)"
        " VALUES (0, %s, %s, %s, 'OrderFilled', 'INVALID_FIELD', 'refused')",
        [e[1], ms, seq],
    )
    report = await check(redis, database_url)
    assert report.ok, report.findings
    assert (report.shards[0].chained, report.shards[0].archived) == (6, 2)


async def test_events_before_the_chain_are_counted_not_checked(redis: Any, database_url: str, pool: Any) -> None:
    """A log from before the chain (entries without n and hash, no head), then an upgrade."""
    rig = Rig(redis)
    await rig.run(2)
    await rebuild(redis, [(i, {"type": f["type"], "data": f["data"]}) for i, f in await log(redis)])
    await redis.delete(CHAIN)
    await rig.run(2, first=2)
    await archive(redis, pool)
    report = await check(redis, database_url)
    assert report.ok, report.findings
    (shard,) = report.shards
    assert (shard.unchained, shard.chained) == (3, 3)
    assert "3 events before the chain (not checked)" in shard.line()
    fields = (await log(redis))[3][1]
    assert fields["n"] == "1" and fields["hash"] == sha1(f"{GENESIS}\n1\n{fields['type']}\n{fields['data']}")


async def test_cluster_chain_verifies_and_names_a_deletion(redis_cluster: Any, database_url: str, pool: Any) -> None:
    await Rig(redis_cluster).run(4)
    await archive(redis_cluster, pool)
    assert (await check(redis_cluster, database_url)).ok
    entries = await log(redis_cluster)
    e = ids(entries)
    await redis_cluster.xdel(EVENTS, e[2])
    assert only(await check(redis_cluster, database_url)).message == (
        f"shard 0 redis: #3 missing between entry {e[1]} (#2) and entry {e[3]} (#4): deleted"
    )


# --------------------------------------------------------------------------- the command line


async def test_cli_checkpoint_and_verify_chain(
    tmp_path: Path, redis: Any, redis_url: str, database_url: str, chained: list[tuple[str, dict[str, str]]]
) -> None:
    urls = ("--redis-url", redis_url)
    (head,) = (await ledger_cli(tmp_path, "checkpoint", *urls, "--json")).json()
    token = f"0:9:{chained[8][1]['hash']}"
    assert head == {"shard": 0, "entry_id": chained[8][0], "n": 9, "hash": chained[8][1]["hash"], "checkpoint": token}

    verify = ("verify", "--chain", *urls, "--database-url", database_url)
    run = await ledger_cli(tmp_path, *verify, "--expect", token)
    assert run.status == 0, run.stderr
    assert run.stdout.startswith("shard 0: chain intact: 9 chained events; head #9 ")

    await redis.xdel(EVENTS, chained[3][0])
    run = await ledger_cli(tmp_path, *verify, "--json")
    assert run.status == 1
    report = json.loads(run.stdout)
    assert report["intact"] is False
    assert [f["kind"] for f in report["shards"][0]["findings"]] == ["deleted"]

    bad = await ledger_cli(tmp_path, *verify, "--expect", "0:9:xyz")
    assert bad.status == 2 and "must be SHARD:N:HASH" in bad.stderr
    alone = await ledger_cli(tmp_path, "verify", *urls, "--database-url", database_url, "--expect", token)
    assert (alone.status, alone.stderr) == (
        2,
        "ledger: --expect: checkpoints are checked by `verify --chain`: add --chain\n",
    )
