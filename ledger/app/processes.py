"""``ledger serve`` in process mode (``LEDGER_PROCESSES=roles``, the default): a supervisor and
one child process per group of roles (``ledger.app.service.PROCESS_GROUPS``), so the roles' Python
work spreads over the machine's cores; and a child's own start.

``ledger serve`` starts the private servers and runs the startup checks once
(``service.prepare``), then becomes the supervisor (``ledger.app.supervisor``: how children are
started, restarted, stopped and taken down with it), which starts each group as ``python -m
ledger.app.processes ROLE...`` and hands it the settings, every server's URL resolved, through its
stdin.
"""

from __future__ import annotations

import asyncio
import os
import pickle
import signal
import sys
from collections.abc import Coroutine, Sequence
from typing import Any

import structlog
import uvloop

from consumers.together import RolesStuck
from ledger.app.logs import configure_logging
from ledger.app.service import (
    BACKGROUND_NICE,
    BACKGROUND_ROLES,
    PROCESS_GROUPS,
    prepare,
    run_roles,
    serve,
)
from ledger.app.supervisor import STOP_SIGNALS, Plan, hand_over, name, stop_on_signals
from ledger.config import ConfigError, Settings, known_url
from ledger.store.redis_conn import connect

log = structlog.get_logger("ledger.app.processes")


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
    """Prepare once, then become the supervisor of ``roles``' child processes (does not return
    unless stopped while preparing: 0)."""
    if not sys.platform.startswith("linux"):
        raise ConfigError("LEDGER_PROCESSES / --processes: roles needs Linux (prctl): use 1")
    stop = asyncio.Event()
    stop_on_signals(stop)
    redis, settings = await prepare(settings, roles)
    await redis.aclose()
    # From here on the stop signals wait for the supervisor: blocked in the one thread left (the
    # resolver's threads joined, so none can take a signal and lose it at the exec).
    await asyncio.get_running_loop().shutdown_default_executor()
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    if stop.is_set():
        return 0
    groups = tuple((group, niceness(group)) for group in process_groups(roles))
    hand_over(Plan(groups, pickle.dumps(settings), settings.log_format, settings.log_level))


# --------------------------------------------------------------------------- a child


def child_main(roles: Sequence[str]) -> int:
    """A child: the settings from stdin, the roles until SIGTERM."""
    settings = pickle.load(sys.stdin.buffer)
    configure_logging(settings.log_format, settings.log_level)
    structlog.contextvars.bind_contextvars(role=name(roles))
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


if __name__ == "__main__":
    sys.exit(child_main(sys.argv[1:]))
