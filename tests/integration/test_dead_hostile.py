"""``ledger dead list|show`` over hostile dead letters (issue 9, part 9): an event entry whose
fields are binary, control characters and huge, dead-lettered by the real live projection, and a
dead letter whose ``dead_ts`` is no time. ``list`` shows every one with its reason and exits 0,
``show`` prints it as JSON; both on a stdout that refuses what is not UTF-8 (as on a terminal of
a UTF-8 locale)."""

from __future__ import annotations

import json
from pathlib import Path

from consumers.entries import Entry
from ledger.app.dead import FIELD_WIDTH, printable
from ledger.store.keys import ShardKeys
from ledger.store.operations import iso_time
from ledger.store.redis_conn import connect, ensure_shard_count
from projections.live import GROUP as LIVE_GROUP
from projections.live import LiveProjection
from tests.audit_helpers import ledger_cli

KEYS = ShardKeys(0)
HUGE = b"y" * 100_000
DATA_REASON = (
    "data is not valid JSON: 'utf-8' codec can't encode character '\\udcc3' in position 0: surrogates not allowed"
)


def test_printable_escapes_and_cuts() -> None:
    assert printable("\udcff\udcfe\x1b[31mX\n\x00ok", 40) == "\\xff\\xfe\\x1b[31mX\\n\\x00ok"
    assert printable("a" * 41, 40) == "a" * 39 + "…"
    assert printable("a" * 40, 40) == "a" * 40
    assert printable("\n" * 30, 40) == "\\n" * 19 + "…"  # never cut inside an escape
    assert printable("", 40) == ""


async def test_list_and_show_survive_hostile_dead_letters(redis_url: str, tmp_path: Path) -> None:
    redis = await connect(redis_url)  # reads what is not UTF-8 as the CLI does (surrogateescape)
    await ensure_shard_count(redis, 1)
    raw = await connect(redis_url, decode_responses=False)
    try:
        entry_id = (
            await raw.xadd(
                KEYS.events,
                {b"type": b"OrderPlaced", b"data": b"\xc3(\x1b[2J", b"\xff\x00name": b"\x00\xfe", b"huge": HUGE},
            )
        ).decode()
    finally:
        await raw.aclose()
    await LiveProjection(redis, 0).handle([Entry(entry_id, {})])
    forged = await redis.xadd(
        KEYS.dead,
        {
            "type": "\x1b[31m" + "T" * 100,
            "dead_code": "X",
            "dead_reason": "line one\nline two",
            "dead_stream": KEYS.events,
            "dead_group": "g",
            "dead_entry_id": "1-0",
            "dead_ts": "garbage",
        },
    )
    (dead_id, letter), _forged = [(str(i), dict(f)) for i, f in await redis.xrange(KEYS.dead)]
    reason = f"OrderPlaced event entry {entry_id}: {DATA_REASON}"  # the reason names the entry
    strict = {"LEDGER_REDIS_URL": redis_url, "PYTHONIOENCODING": "utf-8:strict"}

    run = await ledger_cli(tmp_path, "dead", "list", **strict)
    assert (run.status, run.stderr) == (0, "")
    time = iso_time(int(letter["dead_ts"]))
    rows = [
        ["0", dead_id, time, "event", "OrderPlaced", "INVALID_JSON", reason[:59] + "…", KEYS.events, LIVE_GROUP,
         entry_id],
        ["0", forged, "", "event", "\\x1b[31m" + "T" * (FIELD_WIDTH - 9) + "…", "X", "line one\\nline two",
         KEYS.events, "g", "1-0"],
    ]  # fmt: skip
    header = ["shard", "id", "time", "kind", "type", "code", "reason", "stream", "group", "entry_id"]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    expected = ["  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in [header, *rows]]
    assert run.stdout.splitlines() == expected

    run = await ledger_cli(tmp_path, "dead", "list", "--json", **strict)
    assert (run.status, run.stderr) == (0, "")
    listed = json.loads(run.stdout)
    assert [(r["id"], r["ts"], r["time"], r["code"], r["reason"]) for r in listed] == [
        (dead_id, int(letter["dead_ts"]), time, "INVALID_JSON", reason),
        (forged, None, None, "X", "line one\nline two"),
    ]

    run = await ledger_cli(tmp_path, "dead", "show", dead_id, **strict)
    assert (run.status, run.stderr) == (0, "")
    assert run.stdout.isascii()
    assert json.loads(run.stdout) == {
        **listed[0],
        "fields": {
            "type": "OrderPlaced",
            "data": "\udcc3(\x1b[2J",
            "\udcff\x00name": "\x00\udcfe",
            "huge": HUGE.decode(),
        },
    }
    run = await ledger_cli(tmp_path, "dead", "show", forged, **strict)
    assert (run.status, run.stderr) == (0, "")
    assert json.loads(run.stdout)["fields"] == {"type": "\x1b[31m" + "T" * 100}
    await redis.aclose()
