"""Trimming a shard's Redis streams safely (issue 9, part 2; CONTRACT §5).

An event-stream entry may leave Redis only once it is **archived** (at or before the PostgreSQL
projector's tracking record) **and processed by every consumer group** (at or before each group's
last-delivered id and before its oldest pending entry) and by the live projection (at or before
its checkpoint ``ledger:{s}:projection``, which it reads the log from). A command-stream entry may
leave once the handler group has processed it (its reply and outcome are written). With a
retention, entries younger than it stay too. The bound is computed, then ``XTRIM MINID`` removes
only entries strictly before the entry after it, so nothing past the bound is ever removed, even
if more is appended meanwhile.

``ledger trim`` runs it by hand; the ``retention`` role of ``serve`` (``Retention``) periodically,
only when ``LEDGER_RETENTION_MS`` is set (CONTRACT §11: ``serve`` trims nothing unless configured).

What stays in Redis per command after trimming (outcomes, order and position snapshots) is
compacted in the same pass, by ``ledger trim`` and by the role alike: ``projections.compact``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass
from typing import Any

import psycopg
import structlog

from consumers.runner import RETRYABLE
from ledger.config import Settings, known_url
from ledger.defaults import RETENTION_OPS_KEEP
from ledger.domain.values import now_ms
from ledger.store.keys import RETENTION_OPS, ShardKeys
from ledger.store.operations import record_operation
from ledger.store.redis_conn import CONNECT_TIMEOUT_S, EntryKey, entry_order, text
from projections.bounds import group_bounds
from projections.compact import Compaction, compact_shard
from projections.projector import checkpoint as archived_up_to

log = structlog.get_logger("ledger.retention")


@dataclass(frozen=True, slots=True)
class StreamTrim:
    """What trimming one stream of one shard did (or would do): entries up to ``bound`` may go."""

    shard: int
    stream: str
    bound: str | None  # the last entry that may be removed; None: nothing may be removed
    limited_by: str  # what set the bound (a group, the archive, the retention, ...)
    removed: int  # 0 on a dry run

    def as_dict(self) -> dict[str, Any]:
        return {
            "shard": self.shard,
            "stream": self.stream,
            "up_to": self.bound,
            "limited_by": self.limited_by,
            "removed": self.removed,
        }


async def trim_bounds(
    redis: Any, conn: psycopg.AsyncConnection[Any], shard: int, *, retention_ms: int = 0
) -> dict[str, tuple[EntryKey, str]]:
    """The last removable entry of the shard's event and command streams, and what limits it."""
    keys = ShardKeys(shard)
    retained: EntryKey = (now_ms() - retention_ms - 1, 2**64 - 1) if retention_ms else (2**64 - 1, 0)
    archived = await archived_up_to(conn, shard)
    live = text(await redis.get(keys.checkpoint))
    # On a tie the first named limit is reported: the archive, then the live checkpoint, then groups.
    event_limits = {
        "the PostgreSQL archive": entry_order(archived) if archived else (0, 0),
        "the live projection's checkpoint": entry_order(live) if live else (0, 0),
        **await group_bounds(redis, keys.events),
        "the retention": retained,
    }
    command_limits = {**await group_bounds(redis, keys.commands), "the retention": retained}
    if not any(name.startswith("group ") for name in command_limits):
        command_limits["no handler group yet"] = (0, 0)
    result: dict[str, tuple[EntryKey, str]] = {}
    for stream, limits in ((keys.events, event_limits), (keys.commands, command_limits)):
        limited_by = min(limits, key=lambda name: limits[name])
        result[stream] = (limits[limited_by], limited_by)
    return result


async def trim_shard(
    redis: Any, conn: psycopg.AsyncConnection[Any], shard: int, *, retention_ms: int = 0, dry_run: bool = False
) -> list[StreamTrim]:
    """Trim the shard's event and command streams up to their safe bounds."""
    done = []
    for stream, (bound, limited_by) in (await trim_bounds(redis, conn, shard, retention_ms=retention_ms)).items():
        if bound <= (0, 0):
            done.append(StreamTrim(shard, stream, None, limited_by, 0))
            continue
        ms, seq = bound
        removed = 0
        if not dry_run:
            minid = f"{ms}-{seq + 1}" if seq < 2**64 - 1 else f"{ms + 1}-0"
            removed = int(await redis.xtrim(stream, minid=minid, approximate=False))
        done.append(StreamTrim(shard, stream, f"{ms}-{seq}", limited_by, removed))
    return done


@dataclass(frozen=True, slots=True)
class RetentionPass:
    """What one pass of trimming and compacting did, over the shards it covered."""

    trims: list[StreamTrim]
    compactions: list[Compaction]

    @property
    def changed(self) -> bool:
        return any(t.removed for t in self.trims) or any(c.compacted for c in self.compactions)

    def detail(self) -> dict[str, Any]:
        """The operation's detail in ``ledger:ops``: every stream trimmed and hash compacted."""
        return {
            "streams": [t.as_dict() for t in self.trims],
            "compacted": [c.as_dict() for c in self.compactions],
        }


async def retention_pass(
    redis: Any, conn: psycopg.AsyncConnection[Any], shards: list[int], *, retention_ms: int = 0, dry_run: bool = False
) -> RetentionPass:
    """Trim every shard's streams, then compact what it keeps per command (``projections.compact``)."""
    trims: list[StreamTrim] = []
    compactions: list[Compaction] = []
    for shard in shards:
        trims += await trim_shard(redis, conn, shard, retention_ms=retention_ms, dry_run=dry_run)
        compactions += await compact_shard(redis, conn, shard, retention_ms=retention_ms, dry_run=dry_run)
    return RetentionPass(trims, compactions)


class Retention:
    """``serve``'s periodic trim and compaction (role ``retention``, off unless
    ``LEDGER_RETENTION_MS`` is set): every ``trim_interval_s``, every shard's streams down to their
    safe bounds and what it keeps per command compacted, sparing what is younger than
    ``retention_ms``. A server that is away only postpones the next pass; a pass that fails
    otherwise is logged with its error and tried again by the next one."""

    def __init__(self, redis: Any, database_url: str, settings: Settings) -> None:
        if settings.retention_ms is None:
            raise ValueError("LEDGER_RETENTION_MS is not set: the retention role is off")
        self.redis = redis
        self.database_url = database_url
        self.shards = settings.shards
        self.retention_ms = settings.retention_ms
        self.interval_s = settings.trim_interval_s

    async def run(self, stop: asyncio.Event) -> None:
        log.info("retention on", retention_ms=self.retention_ms, interval_s=self.interval_s)
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=self.interval_s)
            if stop.is_set():
                return
            try:
                await self.pass_once()
            except (psycopg.OperationalError, *RETRYABLE) as exc:
                log.warning("retention pass postponed: a server is away", error=str(exc))
            except Exception:  # noqa: BLE001 - a maintenance pass's bug must not take the order path down
                # The handler and projector share this role's process: failing it would restart
                # them with every pass. What retention leaves in Redis only waits.
                log.exception(
                    f"retention pass failed: the next pass, in {self.interval_s:g} s, tries again; "
                    "the error says what to fix"
                )

    async def pass_once(self) -> RetentionPass:
        """One pass over every shard; a pass that removed or compacted something is recorded in
        ``ledger:ops:retention`` (capped: routine, not an operator's action)."""
        started = time.perf_counter()
        async with await psycopg.AsyncConnection.connect(
            self.database_url, autocommit=True, connect_timeout=int(CONNECT_TIMEOUT_S)
        ) as conn:
            done = await retention_pass(self.redis, conn, list(range(self.shards)), retention_ms=self.retention_ms)
        if done.changed:
            await record_operation(
                self.redis,
                "trim",
                "all shards",
                "retention",
                done.detail(),
                stream=RETENTION_OPS,
                keep=RETENTION_OPS_KEEP,
            )
            log.info(
                "retention pass",
                removed=sum(t.removed for t in done.trims),
                compacted=sum(c.compacted for c in done.compactions),
                ms=round((time.perf_counter() - started) * 1000, 1),
            )
        return done


async def retention_role(redis: Any, settings: Settings) -> list[Retention]:
    """``ledger serve --role retention``: nothing unless a retention is configured."""
    if settings.retention_ms is None:
        return []
    url = known_url(settings, "postgres")
    return [Retention(redis, url, settings)]
