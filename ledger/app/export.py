"""``ledger export``: the event log of every shard, both tiers, streamed (CONTRACT §11).

Shard by shard, each in log order, through ``ledger.store.log.read_log`` (the archive for what
Redis no longer holds, Redis for the rest): one event at a time is read and written, so memory
stays constant however long the log. Each event's ``data`` is its JSON object as appended (from
the archive, the decoded event encoded again: the same bytes, the keys in their wire order).

* ``jsonl``: one object per line, ``{"shard", "entry_id", "type", "data"}``;
* ``csv``: a header, then the envelope columns (``ENVELOPE``) and ``data`` (the JSON object).

``--since`` / ``--until`` select events by ``ts`` (the ledger's time of append; ``--until`` as
``ledger replay`` reads it: the log up to the moment), ``--user`` one user's events (read from
that user's shard only). A progress bar (``ledger.progress``) is drawn on stderr when stderr is
a terminal, never when it is piped or redirected. ``--output FILE`` is written as ``FILE.part``
and renamed when complete, so a failed export never leaves a file that looks whole.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

import msgspec
import psycopg

from ledger.app.console import shard_count
from ledger.domain import wire
from ledger.progress import progress_bar
from ledger.store.eventstore import StoredEvent
from ledger.store.keys import shard_of
from ledger.store.log import log_size, read_log

FORMATS = ("jsonl", "csv")
ENVELOPE = (
    "shard",
    "entry_id",
    "type",
    "event_id",
    "stream",
    "version",
    "command_id",
    "user_id",
    "exchange",
    "symbol",
    "ts",
    "schema",
)

_json = msgspec.json.Encoder()


def _jsonl(out: TextIO) -> Callable[[int, StoredEvent], None]:
    def write(shard: int, stored: StoredEvent) -> None:
        line = {
            "shard": shard,
            "entry_id": stored.entry_id,
            "type": stored.event.type,
            "data": msgspec.Raw(wire.encode(stored.event)),
        }
        out.write(_json.encode(line).decode())
        out.write("\n")

    return write


def _csv(out: TextIO) -> Callable[[int, StoredEvent], None]:
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([*ENVELOPE, "data"])

    def write(shard: int, stored: StoredEvent) -> None:
        event = stored.event
        envelope = {"shard": shard, "entry_id": stored.entry_id, "type": event.type}
        row = [envelope[name] if name in envelope else getattr(event, name) for name in ENVELOPE]
        writer.writerow([*row, wire.encode(event).decode()])

    return write


async def export(
    redis: Any,
    conn: psycopg.AsyncConnection[Any] | None,
    out: TextIO,
    *,
    fmt: str,
    since: int | None = None,
    until: int | None = None,
    user: str | None = None,
    no_archive: str = "no database URL given",
    progress_stream: TextIO | None = None,
) -> int:
    """Write the selected events to ``out``; return how many were written."""
    count = await shard_count(redis)
    shards = [shard_of(user, count)] if user is not None else list(range(count))
    write = _jsonl(out) if fmt == "jsonl" else _csv(out)
    total = 0 if progress_stream is None else sum([await log_size(redis, shard) for shard in shards])
    written = 0
    with progress_bar(progress_stream, "export", total) as tick:
        for shard in shards:
            async for stored in read_log(redis, shard, conn=conn, until=until, no_archive=no_archive):
                tick()
                event = stored.event
                if (since is None or event.ts >= since) and (user is None or event.user_id == user):
                    write(shard, stored)
                    written += 1
    return written


async def export_to(path: Path | None, stdout: TextIO, **options: Any) -> int:
    """``export`` to ``path`` (written whole or not at all) or to ``stdout``."""
    if path is None:
        return await export(out=stdout, **options)
    part = path.with_name(path.name + ".part")
    try:
        with part.open("w", encoding="utf-8", newline="") as out:
            written = await export(out=out, **options)
        os.replace(part, path)
    finally:
        part.unlink(missing_ok=True)
    return written
