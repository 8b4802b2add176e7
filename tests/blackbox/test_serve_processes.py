"""``ledger serve`` in process mode (the default, ``LEDGER_PROCESSES=roles``): a supervisor and a
child process per group of roles, as real processes (``ledger.app.processes``).

Commands are published with raw XADD and checked through the contract's keys (replies, the event
log, the outcomes hash, the live ``orders:{id}`` hash); the processes through ``/proc``.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any

from ledger.store.keys import order_key
from tests.pipeline_helpers import (
    ServeProcess,
    assert_gapless,
    commands_key,
    events_per_command,
    log_lines,
    outcomes_key,
    peek_reply,
    place_order_json,
    read_events,
    reply_key,
    role_processes,
    serve_processes_fixture,  # noqa: F401 - the fixture serve_processes
    start_serve,
    wait_for_roles,
    wait_until,
)


def _alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _compiled_packages(pid: int) -> set[str]:
    """The installed packages whose shared objects a process has mapped (``/proc/<pid>/maps``)."""
    found = set()
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        path = line.split()[-1]
        if "/site-packages/" in path and ".so" in path:
            found.add(path.split("/site-packages/", 1)[1].split("/", 1)[0])
    return found


async def _publish(redis: Any, commands: list[tuple[str, str]]) -> None:
    pipe = redis.pipeline(transaction=False)
    for user, cid in commands:
        pipe.xadd(commands_key(0), {"type": "place_order", "data": place_order_json(user, cid)})
    await pipe.execute()


async def _pending(redis: Any, stream: str) -> dict[str, int]:
    return {group["name"]: int(group["pending"]) for group in await redis.xinfo_groups(stream)}


async def test_serve_runs_each_role_group_in_its_own_process_and_sigterm_stops_them_all(
    redis: Any, redis_url: str, tmp_path: Path, serve_processes: list[ServeProcess]
) -> None:
    policy = (await redis.config_get("maxmemory-policy"))["maxmemory-policy"]
    await redis.config_set("maxmemory-policy", "allkeys-lru")  # warned about at start-up
    try:
        serve = start_serve(redis_url, tmp_path, roles=("handler", "projection"))
        serve_processes.append(serve)
        children = await wait_for_roles(serve, {"handler", "projection"})
    finally:
        await redis.config_set("maxmemory-policy", policy)
    assert serve.process.pid not in children.values()
    # Once prepared, serve became the supervisor (same pid): it loads none of the roles' compiled
    # code (Redis, PostgreSQL, pydantic: about 30 MB instead of 63), and ``ps`` still says serve.
    supervisor = Path(f"/proc/{serve.process.pid}/cmdline").read_bytes().rstrip(b"\0").split(b"\0")
    assert supervisor[1:3] == [b"-m", b"ledger.app.supervisor"] and supervisor[-2:] == [b"ledger", b"serve"]
    assert Path(f"/proc/{serve.process.pid}/comm").read_text() == "ledger\n"
    assert _compiled_packages(serve.process.pid) == set()

    commands = [(f"proc-{n % 10}", f"c{n}") for n in range(200)]
    await _publish(redis, commands)
    for user, cid in commands:
        reply = await peek_reply(redis, reply_key(0, user, cid), timeout=30)
        assert reply["status"] == "accepted", reply

        async def projected(order_id: str = reply["order_id"]) -> bool:
            return await redis.hget(order_key(order_id), "status") == "pending"

        await wait_until(projected, timeout=30, what=f"the live hash of {cid}")
        assert await redis.hmget(order_key(reply["order_id"]), "user_id", "quantity") == [user, "1"]
    assert {"hiredis", "psycopg_binary"} <= _compiled_packages(children["handler"])  # what it lacks
    assert _compiled_packages(serve.process.pid) == set()

    serve.process.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(serve.process.wait, 30) == 0, serve.output()[-3000:]
    assert not any(_alive(pid) for pid in children.values())
    stopped = {line["role"]: line["status"] for line in log_lines(serve, "role process stopped")}
    assert stopped == {"handler": "exit 0", "projection": "exit 0"}
    assert (
        log_lines(serve, "role process exited unexpectedly: restarting it in 0.1 s; its last log lines say why") == []
    )
    # Every child finished and acknowledged what it had read.
    assert await _pending(redis, commands_key(0)) == {"ledger-handler": 0}
    assert await _pending(redis, "ledger:{0}:events") == {"ledger-projection": 0}
    # Each child's log lines name its role.
    serving = {line["role"]: line["roles"] for line in log_lines(serve, "serving")}
    assert serving == {"handler": ["handler"], "projection": ["projection"]}
    # The start-up checks ran once, in the supervisor.
    (warning,) = [line for line in serve.output().splitlines() if "maxmemory_policy" in line]
    assert "role" not in json.loads(warning)


async def test_sigterm_as_serve_becomes_the_supervisor_stops_it_cleanly(
    redis_url: str, tmp_path: Path, serve_processes: list[ServeProcess]
) -> None:
    serve = start_serve(redis_url, tmp_path, roles=("handler",))
    serve_processes.append(serve)
    cmdline = Path(f"/proc/{serve.process.pid}/cmdline")
    deadline = time.monotonic() + 30
    while b"ledger.app.supervisor" not in cmdline.read_bytes():  # the exec, seen within a millisecond
        assert serve.process.poll() is None and time.monotonic() < deadline, serve.output()[-3000:]
        time.sleep(0.0005)
    # The new image is still starting (its imports take a tenth of a second): the signal waits for it.
    serve.process.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(serve.process.wait, 30) == 0, serve.output()[-3000:]
    assert [line["statuses"] for line in log_lines(serve, "stopped")] == [{}]
    assert log_lines(serve, "role process started") == []


async def test_a_killed_role_process_is_restarted_and_nothing_is_lost_or_doubled(
    redis: Any, redis_url: str, tmp_path: Path, serve_processes: list[ServeProcess]
) -> None:
    serve = start_serve(redis_url, tmp_path, roles=("handler",), LEDGER_CLAIM_IDLE_MS="1000")
    serve_processes.append(serve)
    first = (await wait_for_roles(serve, {"handler"}))["handler"]
    commands = [(f"k9c-{n % 20}", f"c{n}") for n in range(3000)]
    await _publish(redis, commands)

    async def some_done() -> bool:
        return await redis.hlen(outcomes_key(0)) >= 300

    await wait_until(some_done, timeout=30, interval=0.002, what="the handler to get going")
    os.kill(first, signal.SIGKILL)
    assert await redis.hlen(outcomes_key(0)) < len(commands), "the handler finished before it was killed"

    async def restarted() -> bool:
        return role_processes(serve.process.pid).get("handler", first) != first

    await wait_until(restarted, timeout=15, interval=0.05, what="a new handler process")
    assert serve.process.poll() is None
    (exited,) = log_lines(serve, "role process exited unexpectedly: restarting it in 0.1 s; its last log lines say why")
    assert (exited["role"], exited["pid"], exited["status"], exited["level"]) == (
        "handler",
        first,
        "killed by SIGKILL",
        "error",
    )

    async def all_done() -> bool:
        return await redis.hlen(outcomes_key(0)) >= len(commands)

    await wait_until(all_done, timeout=60, interval=0.05, what="the restarted handler to finish")
    assert serve.stop(timeout=30) == 0, serve.output()[-3000:]
    assert await redis.hlen(outcomes_key(0)) == len(commands)
    log = await read_events(redis, 0)
    assert events_per_command(log) == Counter({command: 1 for command in commands})
    assert_gapless(log)
    for user, cid in commands:
        assert (await peek_reply(redis, reply_key(0, user, cid)))["status"] == "accepted"


async def test_kill_9_of_serve_leaves_no_role_process_behind(
    redis_url: str, tmp_path: Path, serve_processes: list[ServeProcess]
) -> None:
    serve = start_serve(redis_url, tmp_path, roles=("handler", "projection", "paper"))
    serve_processes.append(serve)
    children = await wait_for_roles(serve, {"handler", "projection+paper"})
    serve.process.send_signal(signal.SIGKILL)
    assert serve.process.wait(timeout=10) == -signal.SIGKILL
    deadline = time.monotonic() + 5
    while (left := [pid for pid in children.values() if _alive(pid)]) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert left == []


async def test_processes_1_runs_every_role_in_the_serve_process(
    redis: Any, redis_url: str, tmp_path: Path, serve_processes: list[ServeProcess]
) -> None:
    serve = start_serve(redis_url, tmp_path, roles=("handler", "projection"), LEDGER_PROCESSES="1")
    serve_processes.append(serve)
    await _publish(redis, [("one-process", "c1")])
    reply = await peek_reply(redis, reply_key(0, "one-process", "c1"), timeout=30)
    assert reply["status"] == "accepted", reply
    assert role_processes(serve.process.pid) == {}
    serve.process.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(serve.process.wait, 30) == 0, serve.output()[-3000:]
    assert log_lines(serve, "supervising") == []
    assert [line["roles"] for line in log_lines(serve, "serving")] == [["handler", "projection"]]
