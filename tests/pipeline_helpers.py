"""Shared helpers of the command-pipeline tests (tests/test_pipeline*.py).

The publishing and checking side is black-box: it speaks CONTRACT §2-§5 with plain Redis calls
(raw XADD of hand-written JSON, BLPOP/LINDEX on reply keys, XRANGE on the event log) and
computes shards with ``zlib.crc32`` itself. Only the consuming side (the handler under test) is
project code: ``serve`` in a background task, ``StreamConsumer`` + ``CommandHandler``, or a
``ledger serve`` subprocess.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
import zlib
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
LEDGER_BIN = Path(sys.executable).parent / "ledger"
UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
# A time-ordered UUID (version 7, RFC 9562 variant), as the ledger makes them (``ledger.domain.ids``).
UUID7 = r"[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"
ENTRY_ID_RE = re.compile(r"^[0-9]+-[0-9]+$")
ENVELOPE = {"event_id", "stream", "version", "command_id", "user_id", "exchange", "symbol", "ts", "schema"}
SYMBOL = "BTC-USDT-SWAP"  # OKX linear swap


# --------------------------------------------------------------------------- keys (CONTRACT §2)


def shard_of(user_id: str, shards: int) -> int:
    return zlib.crc32(user_id.encode("utf-8")) % shards


def commands_key(shard: int) -> str:
    return f"ledger:{{{shard}}}:commands"


def events_key(shard: int) -> str:
    return f"ledger:{{{shard}}}:events"


def dead_key(shard: int) -> str:
    return f"ledger:{{{shard}}}:dead"


def outcomes_key(shard: int) -> str:
    return f"ledger:{{{shard}}}:outcomes"


def reply_key(shard: int, user_id: str, command_id: str) -> str:
    return f"ledger:{{{shard}}}:reply:{user_id}:{command_id}"


def users_on_shard(shard: int, shards: int, count: int, prefix: str = "u") -> list[str]:
    """``count`` user ids (``prefix-N``) that live on ``shard``."""
    found: list[str] = []
    n = 0
    while len(found) < count:
        user = f"{prefix}-{n}"
        if shard_of(user, shards) == shard:
            found.append(user)
        n += 1
    return found


# --------------------------------------------------------------------------- publishing


def place_order_json(user: str, command_id: str, *, quantity: str = "1", price: str = "100") -> str:
    """A place_order ``data`` written by hand, as a strategy in another language would."""
    return (
        f'{{"command_id": "{command_id}", "user_id": "{user}", "exchange": "okx", "symbol": "{SYMBOL}", '
        f'"side": "buy", "order_type": "limit", "quantity": "{quantity}", "price": "{price}"}}'
    )


def fill_json(user: str, command_id: str, order_id: str, fill_id: str, *, quantity: str, price: str = "100") -> str:
    return (
        f'{{"command_id": "{command_id}", "user_id": "{user}", "order_id": "{order_id}", "fill_id": "{fill_id}", '
        f'"quantity": "{quantity}", "price": "{price}", "fee": "0.01"}}'
    )


async def xadd(redis: Any, shard: int, fields: dict[str, str]) -> str:
    """Raw XADD of a command entry on a shard's command stream; returns the entry id."""
    return str(await redis.xadd(commands_key(shard), fields))


async def publish(redis: Any, shards: int, type_: str, data: dict[str, Any]) -> tuple[int, str]:
    """XADD ``{type, data}`` on the user's shard; returns (shard, entry id)."""
    shard = shard_of(str(data["user_id"]), shards)
    return shard, await xadd(redis, shard, {"type": type_, "data": json.dumps(data)})


async def blpop_reply(redis: Any, key: str, timeout: float = 10.0) -> tuple[str, dict[str, Any]]:
    """Wait for a reply with BLPOP; returns (raw JSON, parsed).

    BLPOP blocks in slices of 2 s: redis-py's default socket timeout is 5 s.
    """
    deadline = time.monotonic() + timeout
    while (answer := await redis.blpop([key], timeout=2)) is None:
        assert time.monotonic() < deadline, f"no reply on {key} within {timeout} s"
    assert answer[0] == key
    return answer[1], json.loads(answer[1])


async def peek_reply(redis: Any, key: str, timeout: float = 10.0) -> dict[str, Any]:
    """Wait for a reply by polling ``LINDEX key 0`` (leaves it in place)."""
    deadline = time.monotonic() + timeout
    while True:
        raw = await redis.lindex(key, 0)
        if raw is not None:
            return json.loads(raw)  # type: ignore[no-any-return]
        assert time.monotonic() < deadline, f"no reply on {key} within {timeout} s"
        await asyncio.sleep(0.01)


async def wait_until(
    check: Callable[[], Awaitable[bool]], timeout: float = 10.0, interval: float = 0.02, what: str = "condition"
) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        await asyncio.sleep(interval)


# --------------------------------------------------------------------------- reading the log


@dataclass(frozen=True)
class LoggedEvent:
    entry_id: str
    type: str
    data: dict[str, Any]
    raw_fields: dict[str, str]


async def read_events(redis: Any, shard: int) -> list[LoggedEvent]:
    entries = await redis.xrange(events_key(shard), "-", "+")
    return [LoggedEvent(i, f["type"], json.loads(f["data"]), dict(f)) for i, f in entries]


async def all_events(redis: Any, shards: int) -> list[LoggedEvent]:
    found: list[LoggedEvent] = []
    for shard in range(shards):
        found += await read_events(redis, shard)
    return found


def versions_by_aggregate(events: Iterable[LoggedEvent]) -> dict[str, list[int]]:
    versions: dict[str, list[int]] = defaultdict(list)
    for event in events:
        versions[event.data["stream"]].append(event.data["version"])
    return versions


def assert_gapless(events: Iterable[LoggedEvent]) -> dict[str, int]:
    """Every aggregate's versions are exactly 1..n in log order; returns n per aggregate."""
    counts: dict[str, int] = {}
    for stream, versions in versions_by_aggregate(events).items():
        assert versions == list(range(1, len(versions) + 1)), f"aggregate {stream}: versions {versions}"
        counts[stream] = len(versions)
    return counts


def assert_no_duplicates(events: list[LoggedEvent]) -> None:
    ids = Counter(e.data["event_id"] for e in events)
    twice = [i for i, n in ids.items() if n > 1]
    assert twice == [], f"event ids logged more than once: {twice[:5]}"
    keys = Counter((e.data["stream"], e.data["version"]) for e in events)
    twice = [k for k, n in keys.items() if n > 1]
    assert twice == [], f"(aggregate, version) logged more than once: {twice[:5]}"


def events_per_command(events: Iterable[LoggedEvent]) -> Counter[tuple[str, str]]:
    return Counter((e.data["user_id"], e.data["command_id"]) for e in events)


def check_envelope(event: LoggedEvent, *, command_id: str, user_id: str, version: int) -> None:
    """CONTRACT §5: fields type/data (plus the hash chain's n and hash, an addition readers
    ignore: ledger.store.chain); data carries the full envelope."""
    assert set(event.raw_fields) == {"type", "data", "n", "hash"}
    data = event.data
    assert ENVELOPE <= set(data), f"missing envelope fields: {ENVELOPE - set(data)}"
    assert UUID_RE.fullmatch(data["event_id"])
    assert isinstance(data["stream"], str) and UUID_RE.fullmatch(data["stream"])
    assert data["version"] == version and type(data["version"]) is int
    assert data["command_id"] == command_id
    assert data["user_id"] == user_id
    assert data["exchange"] == "okx"
    assert data["symbol"] == SYMBOL
    assert type(data["ts"]) is int and abs(data["ts"] - time.time() * 1000) < 60_000
    assert type(data["schema"]) is int and data["schema"] >= 1


# --------------------------------------------------------------------------- running the handler


@contextlib.asynccontextmanager
async def serving(url: str, shards: int, home: Path, **overrides: Any) -> AsyncIterator[asyncio.Task[None]]:
    """``serve`` with the handler role in a background task of this event loop."""
    from ledger.app.service import serve
    from ledger.config import Settings

    settings = Settings(redis_url=url, shards=shards, home=home, **overrides)
    stop = asyncio.Event()
    task = asyncio.create_task(serve(settings, ["handler"], stop))
    try:
        yield task
        assert not task.done() or task.exception() is None, f"serve failed: {task.exception()!r}"
    finally:
        stop.set()
        task.cancel()  # the consumers may sit in a 1 s XREADGROUP BLOCK: no need to wait for it
        with contextlib.suppress(asyncio.CancelledError):
            await task
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


# --------------------------------------------------------------------------- `ledger` subprocesses


def ledger_env(redis_url: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LEDGER_")}
    env.update(LEDGER_REDIS_URL=redis_url, LEDGER_LOG_FORMAT="json", PYTHONUNBUFFERED="1", **extra)
    return env


@dataclass
class ServeProcess:
    process: subprocess.Popen[bytes]
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        return self.process.wait(timeout=timeout)


def start_serve(
    redis_url: str, workdir: Path, name: str = "serve", *, roles: Iterable[str] = ("handler",), **env: str
) -> ServeProcess:
    """``ledger serve --role ROLE...`` as a subprocess in its default mode, logging to
    ``workdir/<name>.log``."""
    workdir.mkdir(parents=True, exist_ok=True)
    log = workdir / f"{name}.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [str(LEDGER_BIN), "serve", *(arg for role in roles for arg in ("--role", role))],
            cwd=workdir,
            env=ledger_env(redis_url, **env),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    return ServeProcess(process, log)


def run_ledger(redis_url: str, *args: str, timeout: float = 30.0, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(LEDGER_BIN), *args],
        env=ledger_env(redis_url, **env),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


@pytest.fixture(name="serve_processes")
def serve_processes_fixture() -> Iterable[list[ServeProcess]]:
    """Register ``ledger serve`` subprocesses here: any still alive is killed at teardown."""
    started: list[ServeProcess] = []
    yield started
    for serve in started:
        if serve.process.poll() is None:
            serve.process.kill()
            serve.process.wait(timeout=10)


def new_id(prefix: str = "c") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


# --------------------------------------------------------------------------- serve's processes

CHILD = b"ledger.app.processes"


def role_processes(parent: int) -> dict[str, int]:
    """The live role processes ``parent`` started: their roles (``projector+retention``) -> pid."""
    found: dict[str, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            argv = (entry / "cmdline").read_bytes().rstrip(b"\0").split(b"\0")
        except OSError:
            continue
        state, ppid = stat.rsplit(")", 1)[1].split()[:2]
        if int(ppid) == parent and state != "Z" and CHILD in argv:
            roles = argv[argv.index(CHILD) + 1 :]
            found["+".join(role.decode() for role in roles)] = int(entry.name)
    return found


async def wait_for_roles(serve: ServeProcess, roles: set[str], timeout: float = 30.0) -> dict[str, int]:
    async def started() -> bool:
        if serve.process.poll() is not None:
            raise AssertionError(f"serve exited with {serve.process.returncode}: {serve.output()[-2000:]}")
        return set(role_processes(serve.process.pid)) == roles

    await wait_until(started, timeout=timeout, interval=0.05, what=f"role processes {sorted(roles)}")
    return role_processes(serve.process.pid)


def log_lines(serve: ServeProcess, name: str) -> list[dict[str, Any]]:
    """The supervisor's and children's JSON log lines whose event is ``name``."""
    lines = [json.loads(line) for line in serve.output().splitlines() if line.startswith("{")]
    return [line for line in lines if line["event"] == name]
