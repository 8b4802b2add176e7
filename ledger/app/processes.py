"""``ledger serve`` in process mode (``LEDGER_PROCESSES=roles``, the default): a supervisor and
one child process per group of roles (``ledger.app.service.PROCESS_GROUPS``), so the roles' Python
work spreads over the machine's cores.

The supervisor (the ``ledger serve`` process) starts the private servers and runs the startup
checks once (``service.prepare``), then starts each group as ``python -m ledger.app.processes
ROLE...`` and hands it the settings, every server's URL resolved, through its stdin. A child that
exits unexpectedly is started again after a back-off (``consumers.backoff.Backoff``: 0.1 s doubling
up to 5 s, from 0.1 s again after a child that ran for ``STEADY_S``). SIGTERM or SIGINT to the
supervisor sends SIGTERM to every child: each finishes its batch and exits, then the supervisor
exits, 0 when every child exited 0. Children ignore SIGINT (a terminal's Ctrl-C reaches the whole
process group: the supervisor stops them in order).

A supervisor killed outright (kill -9) takes its children with it: each child asks the kernel
for SIGKILL when its parent dies (Linux ``prctl(PR_SET_PDEATHSIG)``) between fork and exec, then
checks that its parent is still the supervisor (it may have died in between). SIGKILL rather than
SIGTERM, so that killing ``serve`` -9 stays what it is in the one-process mode, a crash of every
role: what a role had read and not finished is redelivered to the next ``serve`` and answered
exactly once. The kernel sends it even when a child's event loop is busy or stuck, or the child is
still importing, which a pipe whose end-of-file the child must read would not give. Before exec
(``preexec_fn``) rather than first thing in the child, since a child spends seconds importing the
ledger before its first line runs; the hook calls one C function loaded beforehand and takes no
lock (the supervisor's other threads only wait for children or for work). The death signal follows
the thread that forked: the supervisor forks from its event loop's thread, its main thread.

A child of roles off the order path only (``service.BACKGROUND_ROLES``: the PostgreSQL projector,
retention) runs at a lower CPU priority (``service.BACKGROUND_NICE``), set by the same hook
(``nice(2)``), so its start-up imports already yield to the order path.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import pickle
import signal
import sys
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

import structlog
import uvloop

from consumers.backoff import Backoff
from consumers.together import RolesStuck
from ledger.app.logs import configure_logging
from ledger.app.service import (
    BACKGROUND_NICE,
    BACKGROUND_ROLES,
    PROCESS_GROUPS,
    prepare,
    run_roles,
    serve,
    stop_on_signals,
)
from ledger.config import ConfigError, Settings, known_url
from ledger.store.redis_conn import connect

log = structlog.get_logger("ledger.app.processes")

CHILD_MODULE = "ledger.app.processes"
# A child still running this long after SIGTERM is killed (what it had read is redelivered).
STOP_TIMEOUT_S = 30.0
# A child that ran this long before it exited is restarted after the first back-off again.
STEADY_S = 60.0
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def process_groups(roles: Sequence[str]) -> list[tuple[str, ...]]:
    """The child processes for ``roles``: each group of ``PROCESS_GROUPS`` cut to the roles asked
    for, the empty ones left out."""
    groups = (tuple(role for role in group if role in roles) for group in PROCESS_GROUPS)
    return [group for group in groups if group]


def niceness(group: Sequence[str]) -> int:
    """How much lower than the supervisor's a child of ``group`` sets its CPU priority: by
    ``BACKGROUND_NICE`` when every role of it is off the order path, else not."""
    return BACKGROUND_NICE if set(group) <= BACKGROUND_ROLES else 0


def serve_command(settings: Settings, roles: list[str]) -> int:
    """``ledger serve``: the roles in one process or supervised in several, as
    ``settings.processes`` says; the exit status."""
    if settings.processes == "1":
        run_loop(serve(settings, roles))
        return 0
    return asyncio.run(supervise(settings, roles))


def run_loop(main: Coroutine[Any, Any, None]) -> None:
    """Run the roles' event loop: uvloop's (libuv), about 9 % more commands a second end to end
    than asyncio's own loop on the benchmark (medians of 3 alternating runs, 1,436 -> 1,561). The
    supervisor keeps asyncio's loop: it only waits for its children."""
    uvloop.run(_exit_if_stuck(main))


async def _exit_if_stuck(main: Coroutine[Any, Any, None]) -> None:
    """``main``, but a process with a stuck task (``RolesStuck``, alone or among other errors)
    exits at once with status 1: the loop's own shutdown would wait for that task for ever."""
    try:
        await main
    except* RolesStuck:
        log.exception("role process failed and a role did not stop: exiting now; the lines above say where")
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)


# --------------------------------------------------------------------------- the supervisor


async def supervise(settings: Settings, roles: Sequence[str]) -> int:
    """Run ``roles`` in child processes until SIGTERM/SIGINT; 0 when every child stopped cleanly."""
    if not sys.platform.startswith("linux"):
        raise ConfigError("LEDGER_PROCESSES / --processes: roles needs Linux (prctl): use 1")
    stop = asyncio.Event()
    stop_on_signals(stop)
    redis, settings = await prepare(settings, roles)
    await redis.aclose()
    groups = process_groups(roles)
    log.info("supervising", groups=[_name(group) for group in groups], pid=os.getpid())
    supervisor = os.getpid()
    async with asyncio.TaskGroup() as tasks:
        children = [
            tasks.create_task(_keep_running(group, settings, stop, _in_child(supervisor, niceness(group))))
            for group in groups
        ]
    statuses = {_name(group): child.result() for group, child in zip(groups, children, strict=True)}
    log.info("stopped", statuses=statuses)
    return 0 if not any(statuses.values()) else 1


async def _keep_running(
    group: tuple[str, ...], settings: Settings, stop: asyncio.Event, in_child: Callable[[], None]
) -> int:
    """Run ``group``'s child, again after a back-off each time it exits, until ``stop``; the
    exit status of its last run."""
    role = _name(group)
    backoff = Backoff()
    while True:
        started = time.monotonic()
        child = await _start(group, settings, in_child)
        log.info("role process started", role=role, pid=child.pid, nice=niceness(group))
        exited = asyncio.ensure_future(child.wait())
        stopping = asyncio.ensure_future(stop.wait())
        await asyncio.wait((exited, stopping), return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        if stop.is_set():
            return await _stop(child, role)
        status = await exited
        if time.monotonic() - started >= STEADY_S:
            backoff.succeeded()
        delay = backoff.failed()
        log.error(
            f"role process exited unexpectedly: restarting it in {delay:g} s; its last log lines say why",
            role=role,
            pid=child.pid,
            status=_status(status),
        )
        try:
            await asyncio.wait_for(stop.wait(), delay)
        except TimeoutError:
            continue
        return status


async def _start(
    group: tuple[str, ...], settings: Settings, in_child: Callable[[], None]
) -> asyncio.subprocess.Process:
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-m", CHILD_MODULE, *group, stdin=asyncio.subprocess.PIPE, preexec_fn=in_child
    )
    if child.stdin is None:
        raise RuntimeError("the child's stdin is not a pipe")
    child.stdin.write(pickle.dumps(settings))
    await child.stdin.drain()
    child.stdin.close()
    return child


async def _stop(child: asyncio.subprocess.Process, role: str) -> int:
    """SIGTERM ``child`` (it finishes its batch) and wait; SIGKILL after ``STOP_TIMEOUT_S``."""
    if child.returncode is None:
        child.terminate()
        try:
            await asyncio.wait_for(child.wait(), STOP_TIMEOUT_S)
        except TimeoutError:
            log.warning(
                f"role process still running {STOP_TIMEOUT_S:g} s after SIGTERM: killed it; "
                "what it had read is redelivered to the next serve",
                role=role,
                pid=child.pid,
            )
            child.kill()
    status = await child.wait()
    log.info("role process stopped", role=role, pid=child.pid, status=_status(status))
    return status


def _name(group: Sequence[str]) -> str:
    return "+".join(group)


def _status(returncode: int) -> str:
    """``exit 1`` or ``killed by SIGKILL`` (asyncio gives a signal as a negative return code)."""
    if returncode < 0:
        return f"killed by {signal.Signals(-returncode).name}"
    return f"exit {returncode}"


# --------------------------------------------------------------------------- a child


def child_main(roles: Sequence[str]) -> int:
    """A child: the settings from stdin, the roles until SIGTERM."""
    settings = pickle.load(sys.stdin.buffer)
    configure_logging(settings.log_format, settings.log_level)
    structlog.contextvars.bind_contextvars(role=_name(roles))
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        run_loop(_run_child(settings, roles))
    except Exception:
        log.exception("role process failed: the supervisor restarts it; the error above says what to fix")
        return 1
    return 0


async def _run_child(settings: Settings, roles: Sequence[str]) -> None:
    stop = asyncio.Event()
    stop_on_signals(stop, (signal.SIGTERM,))
    redis = await connect(known_url(settings, "redis"))
    try:
        await run_roles(redis, settings, roles, stop)
    finally:
        await redis.aclose()


def _in_child(parent: int, nice: int) -> Callable[[], None]:
    """The hook a child runs between fork and exec: SIGKILL when ``parent`` dies, exit now if it
    already has, and its CPU priority lowered by ``nice`` (in force from its first instruction)."""
    prctl = ctypes.CDLL(None, use_errno=True).prctl

    def in_child() -> None:
        if prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            error = ctypes.get_errno()
            raise OSError(error, f"prctl(PR_SET_PDEATHSIG): {os.strerror(error)}")
        if os.getppid() != parent:
            os._exit(1)
        if nice:
            os.nice(nice)

    return in_child


if __name__ == "__main__":
    sys.exit(child_main(sys.argv[1:]))
