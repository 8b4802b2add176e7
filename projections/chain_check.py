"""``ledger verify --chain`` and ``ledger checkpoint``: a shard's hash chain read from both tiers.

A shard's log is read once, in log order, from Redis (``ledger:{s}:events``, entries with
their ``n`` and ``hash`` fields) and from the PostgreSQL archive (``ledger_events`` rows with
``data_raw``, ``chain_n``, ``chain_hash``), merged by entry id, up to the chain head read first
(``ledger:{s}:chain``; appends made meanwhile are left for the next check). Two views of the
log are walked by ``ledger.store.chain.Walker``, each naming its first break:

* **redis**: every entry Redis holds, and from the archive only what Redis no longer holds
  because it was trimmed (entries before Redis's first one); an entry missing from the middle of
  the stream was deleted;
* **archive**: every archived row, and from Redis only what the archive legitimately lacks: the
  entries after the projector's checkpoint (not archived yet) and those it recorded as gaps
  (``projector_gaps``: dead-lettered, never archived); any other row missing was deleted.

An entry both tiers hold must be the same in both (type, number, hash, exact data text); the
first one that is not is reported, unless a view already named it. An entry after the head in
either tier (the head is written in the same atomic step as every append, so none can be there)
was inserted. Checkpoints (``SHARD:N:HASH`` from ``ledger checkpoint``) are checked on the way:
event N must still have that hash.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg
from redis.exceptions import ResponseError

from ledger.domain.wire import entry_fields
from ledger.sqlfiles import load_queries
from ledger.store.chain import DISAGREE, Finding, Head, Link, Walker, chain_fields
from ledger.store.keys import ShardKeys
from ledger.store.log import PAGE, SEQ_MAX
from ledger.store.redis_conn import EntryKey, entry_order, entry_text, text
from projections.projector import checkpoint

__all__ = ["PAGE", "ChainReport", "ShardChain", "read_head", "verify_chain"]

REDIS, ARCHIVE = "redis", "archive"

_SQL = load_queries("projections", "chain.sql")
_END = (SEQ_MAX, SEQ_MAX)  # after every entry id


async def read_head(redis: Any, shard: int) -> Head | None:
    """The head of a shard's chain (None: no event was chained on it yet)."""
    entry_id, n, hash_ = (text(v) for v in await redis.hmget(ShardKeys(shard).chain, ["id", "n", "hash"]))
    if entry_id is None or n is None or hash_ is None:
        return None
    return Head(shard, entry_id, int(n), hash_)


@dataclass(slots=True)
class ShardChain:
    """What the check of one shard found."""

    shard: int
    head: Head | None
    chained: int = 0  # events in the chain (as the redis view walked it)
    unchained: int = 0  # events appended before the chain existed
    redis_entries: int = 0
    archived: int = 0
    findings: list[Finding] = field(default_factory=list)

    @property
    def intact(self) -> bool:
        return not self.findings

    def as_dict(self) -> dict[str, Any]:
        return {
            "shard": self.shard,
            "intact": self.intact,
            "head": None if self.head is None else self.head.as_dict(),
            "chained": self.chained,
            "unchained": self.unchained,
            "redis_entries": self.redis_entries,
            "archived": self.archived,
            "findings": [f.as_dict() for f in self.findings],
        }

    def line(self) -> str:
        verdict = "chain intact" if self.intact else f"chain BROKEN ({len(self.findings)} findings)"
        head = (
            "no chained event yet"
            if self.head is None
            else f"head #{self.head.n} {self.head.entry_id} {self.head.hash}"
        )
        before = f", {self.unchained} events before the chain (not checked)" if self.unchained else ""
        return (
            f"shard {self.shard}: {verdict}: {self.chained} chained events{before}; {head}; "
            f"{self.redis_entries} entries read from Redis, {self.archived} from the archive"
        )


@dataclass(slots=True)
class ChainReport:
    shards: list[ShardChain]

    @property
    def ok(self) -> bool:
        return all(s.intact for s in self.shards)

    @property
    def findings(self) -> list[Finding]:
        return [f for s in self.shards for f in s.findings]

    def as_dict(self) -> dict[str, Any]:
        return {"intact": self.ok, "shards": [s.as_dict() for s in self.shards]}


async def verify_chain(
    redis: Any,
    conn: psycopg.AsyncConnection[Any],
    shards: Sequence[int],
    expect: Sequence[tuple[int, int, str]] = (),
    *,
    page: int = PAGE,
) -> ChainReport:
    """Check the hash chain of ``shards`` in both tiers (see the module doc). ``expect`` holds
    checkpoints (shard, n, hash) that must still hold."""
    report = ChainReport([])
    for shard in shards:
        wanted = {n: hash_ for s, n, hash_ in expect if s == shard}
        report.shards.append(await _ShardCheck(redis, conn, shard, wanted, page).run())
    return report


class _ShardCheck:
    def __init__(
        self, redis: Any, conn: psycopg.AsyncConnection[Any], shard: int, expect: dict[int, str], page: int
    ) -> None:
        self.redis, self.conn, self.shard, self.page = redis, conn, shard, page
        self.key = ShardKeys(shard).events
        self.views = {tier: Walker(shard, tier, dict(expect)) for tier in (REDIS, ARCHIVE)}
        self.disagreement: Finding | None = None
        self.redis_first: EntryKey = (0, 0)

    async def run(self) -> ShardChain:
        head = await read_head(self.redis, self.shard)
        upto = _END if head is None else entry_order(head.entry_id)
        result = ShardChain(self.shard, head)
        self.redis_first = await self._redis_first()
        projected = await checkpoint(self.conn, self.shard)
        archived_upto = (0, 0) if projected is None else entry_order(projected)
        cur = await self.conn.execute(_SQL["gap_entries"], {"shard": self.shard})
        gaps = {(int(ms), int(seq)) for ms, seq in await cur.fetchall()}
        redis_links = self._redis_links(upto)
        archive_links = self._archive_links(upto)
        async for key, held, archived in _merged(redis_links, archive_links):
            result.redis_entries += held is not None
            result.archived += archived is not None
            if held is not None and archived is not None and not held.same_as(archived):
                self._disagree(held, archived)
            in_redis = held or (archived if archived is not None and await self._trimmed(key) else None)
            in_archive = archived or (held if key > archived_upto or key in gaps else None)
            for tier, link in ((REDIS, in_redis), (ARCHIVE, in_archive)):
                if link is not None:
                    self.views[tier].feed(link)
        if head is not None:
            await self._past_head(head)
        for walker in self.views.values():
            walker.finish(head)
        result.chained, result.unchained = self.views[REDIS].n, self.views[REDIS].unchained
        result.findings = [w.finding for w in self.views.values() if w.finding is not None]
        named = {f.entry_id for f in result.findings}
        if self.disagreement is not None and self.disagreement.entry_id not in named:
            result.findings.append(self.disagreement)
        return result

    # ----------------------------------------------------------------- reading

    async def _redis_first(self) -> EntryKey:
        """The first entry Redis holds: entries before it were trimmed (read from the archive)."""
        try:
            info = await self.redis.xinfo_stream(self.key)
        except ResponseError:  # no such key: nothing was ever appended
            return (0, 0)
        first = info.get("first-entry")
        return entry_order(text(first[0])) if first else _END

    async def _trimmed(self, key: EntryKey) -> bool:
        """Whether Redis lacks an entry because it was trimmed (read again: a trim may run now)."""
        if key < self.redis_first:
            return True
        self.redis_first = await self._redis_first()
        return key < self.redis_first

    async def _redis_links(self, upto: EntryKey, after: EntryKey = (0, 0)) -> AsyncIterator[Link]:
        while entries := await self.redis.xrange(self.key, f"({entry_text(after)}", entry_text(upto), count=self.page):
            for entry_id, fields in entries:
                yield _redis_link(text(entry_id), fields)
            after = entry_order(text(entries[-1][0]))

    async def _archive_links(self, upto: EntryKey, after: EntryKey = (0, 0)) -> AsyncIterator[Link]:
        while rows := await self._archive_page(after, upto, self.page):
            for entry_id, _ms, _seq, type_name, data_raw, chain_n, chain_hash in rows:
                yield Link(entry_id, type_name, data_raw, chain_n, chain_hash, ARCHIVE)
            after = (int(rows[-1][1]), int(rows[-1][2]))

    async def _archive_page(self, after: EntryKey, upto: EntryKey, limit: int) -> list[tuple[Any, ...]]:
        params = {
            "shard": self.shard,
            "after_ms": after[0],
            "after_seq": after[1],
            "upto_ms": upto[0],
            "upto_seq": upto[1],
            "limit": limit,
        }
        return await (await self.conn.execute(_SQL["chain_page"], params)).fetchall()

    # ----------------------------------------------------------------- checks

    def _disagree(self, held: Link, archived: Link) -> None:
        if self.disagreement is not None:
            return
        names = ("type", "data", "n", "hash")
        differ = [name for name in names if getattr(held, name) != getattr(archived, name)]
        self.disagreement = Finding(
            self.shard,
            "both",
            DISAGREE,
            held.entry_id,
            held.n,
            f"shard {self.shard}: Redis and the archive disagree on entry {held.entry_id} ({', '.join(differ)})",
        )

    async def _past_head(self, head: Head) -> None:
        """An entry after the head read first is an insertion, unless the head has moved past it
        since (an append made during the check)."""
        beyond: dict[str, Link] = {}
        if after := await self.redis.xrange(self.key, f"({head.entry_id}", "+", count=1):
            beyond[REDIS] = _redis_link(text(after[0][0]), after[0][1])
        if rows := await self._archive_page(entry_order(head.entry_id), _END, 1):
            entry_id, _ms, _seq, type_name, data_raw, chain_n, chain_hash = rows[0]
            beyond[ARCHIVE] = Link(entry_id, type_name, data_raw, chain_n, chain_hash, ARCHIVE)
        if not beyond:
            return
        now = await read_head(self.redis, self.shard)
        for tier, link in beyond.items():
            if now is None or entry_order(link.entry_id) > entry_order(now.entry_id):
                self.views[tier].past_head(link, head)


def _redis_link(entry_id: str, fields: dict[Any, Any]) -> Link:
    n, hash_ = chain_fields(fields)
    type_name, data = entry_fields(fields)
    return Link(entry_id, type_name, text(data), n, hash_, REDIS)


async def _merged(
    first: AsyncIterator[Link], second: AsyncIterator[Link]
) -> AsyncIterator[tuple[EntryKey, Link | None, Link | None]]:
    """Two log-ordered streams of links merged by entry id: (key, first's, second's)."""
    a, b = await anext(first, None), await anext(second, None)
    while a is not None or b is not None:
        ka = entry_order(a.entry_id) if a is not None else _END
        kb = entry_order(b.entry_id) if b is not None else _END
        key = min(ka, kb)
        yield key, a if ka == key else None, b if kb == key else None
        if ka == key:
            a = await anext(first, None)
        if kb == key:
            b = await anext(second, None)
