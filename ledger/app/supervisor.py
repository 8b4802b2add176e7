"""The supervisor of ``ledger serve`` in process mode (``LEDGER_PROCESSES=roles``, the default):
one child process per group of roles, kept running until SIGTERM or SIGINT.

``ledger serve`` (``ledger.app.processes.supervise``) starts the private servers and runs the
start-up checks, which need most of the ledger's code, then replaces itself (``exec``: the same
pid, a fresh memory image) with ``python -m ledger.app.supervisor FD ledger serve``, handing over
its ``Plan`` in an anonymous memory file: the groups, each with its CPU priority, the settings
already pickled for the children, and how to log. This module imports only what supervising
needs (no Redis, PostgreSQL, pydantic or domain code), so the process that only waits holds about
30 MB instead of the 63 the checks left it with (peak RSS, summed over ``serve``'s processes, is
what the benchmark's target counts). The trailing ``ledger serve`` is for ``ps`` and ``pgrep -f
'ledger serve'``, and the process keeps its name, ``ledger``. SIGTERM and SIGINT are blocked from
just before the exec until the new image handles them: one sent in between stays pending and
stops ``serve`` cleanly before any child starts.

Each group runs as ``python -m ledger.app.processes ROLE...``, which reads the settings from its
stdin. A child that exits unexpectedly is started again after a back-off
(``consumers.backoff.Backoff``: 0.1 s doubling up to 5 s, from 0.1 s again after a child that ran
for ``STEADY_S``). SIGTERM or SIGINT to the supervisor sends SIGTERM to every child: each finishes
its batch and exits, then the supervisor exits, 0 when every child exited 0. Children ignore
SIGINT (a terminal's Ctrl-C reaches the whole process group: the supervisor stops them in order).

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
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import NoReturn

import structlog

from consumers.backoff import Backoff
from ledger.app.logs import configure_logging

log = structlog.get_logger("ledger.app.processes")

CHILD_MODULE = "ledger.app.processes"
# What the supervisor's command line ends with, after the memory file's descriptor.
SHOWN_AS = ("ledger", "serve")
# A child still running this long after SIGTERM is killed (what it had read is redelivered).
STOP_TIMEOUT_S = 30.0
# A child that ran this long before it exited is restarted after the first back-off again.
STEADY_S = 60.0
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
PR_SET_NAME = 15
# The signals that stop serve. Blocked from just before the exec until the supervisor handles
# them: one sent in between stays pending across the exec and stops serve cleanly (status 0).
STOP_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT})


@dataclass(frozen=True)
class Plan:
    """What the supervisor runs: each group of roles with the niceness its child adds to its own,
    the settings (pickled once, handed to each child as they are) and the log's format and level."""

    groups: tuple[tuple[tuple[str, ...], int], ...]
    settings: bytes
    log_format: str
    log_level: str


def stop_on_signals(stop: asyncio.Event, signals: Iterable[int] = STOP_SIGNALS) -> None:
    """Set ``stop`` on any of ``signals`` (the running loop's handlers)."""
    loop = asyncio.get_running_loop()
    for sig in signals:
        loop.add_signal_handler(sig, stop.set)


def hand_over(plan: Plan) -> NoReturn:
    """Replace this process by the supervisor of ``plan`` (same pid, fresh memory image); the
    caller has blocked ``STOP_SIGNALS``."""
    fd = os.memfd_create("ledger-serve-plan", 0)  # no close-on-exec: the new image reads it
    os.write(fd, pickle.dumps(plan))
    os.lseek(fd, 0, os.SEEK_SET)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, "-m", __name__, str(fd), *SHOWN_AS])


def main(argv: Sequence[str]) -> int:
    with os.fdopen(int(argv[0]), "rb") as plan_file:  # closed before any child is started
        plan: Plan = pickle.load(plan_file)
    # The process's name as ``ledger serve`` had it (``top``, ``pgrep ledger``), not python's.
    ctypes.CDLL(None).prctl(PR_SET_NAME, b"ledger", 0, 0, 0)
    configure_logging(plan.log_format, plan.log_level)
    return asyncio.run(supervise(plan))


async def supervise(plan: Plan) -> int:
    """Run ``plan``'s groups until SIGTERM/SIGINT; 0 when every child stopped cleanly."""
    stop = asyncio.Event()
    stop_on_signals(stop)
    sent = signal.sigpending() & STOP_SIGNALS  # since the exec, blocked: stop before starting anything
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    if sent:
        log.info("stopped", statuses={})
        return 0
    supervisor = os.getpid()
    log.info("supervising", groups=[name(group) for group, _nice in plan.groups], pid=supervisor)
    async with asyncio.TaskGroup() as tasks:
        children = [
            tasks.create_task(_keep_running(group, nice, plan.settings, stop, _in_child(supervisor, nice)))
            for group, nice in plan.groups
        ]
    statuses = {name(group): child.result() for (group, _nice), child in zip(plan.groups, children, strict=True)}
    log.info("stopped", statuses=statuses)
    return 0 if not any(statuses.values()) else 1


async def _keep_running(
    group: tuple[str, ...], nice: int, settings: bytes, stop: asyncio.Event, in_child: Callable[[], None]
) -> int:
    """Run ``group``'s child, again after a back-off each time it exits, until ``stop``; the
    exit status of its last run."""
    role = name(group)
    backoff = Backoff()
    while True:
        started = time.monotonic()
        child = await _start(group, settings, in_child)
        log.info("role process started", role=role, pid=child.pid, nice=nice)
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


async def _start(group: tuple[str, ...], settings: bytes, in_child: Callable[[], None]) -> asyncio.subprocess.Process:
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-m", CHILD_MODULE, *group, stdin=asyncio.subprocess.PIPE, preexec_fn=in_child
    )
    if child.stdin is None:
        raise RuntimeError("the child's stdin is not a pipe")
    child.stdin.write(settings)
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


def name(group: Sequence[str]) -> str:
    """A group's name in the log lines and the supervisor's statuses: ``projector+retention``."""
    return "+".join(group)


def _status(returncode: int) -> str:
    """``exit 1`` or ``killed by SIGKILL`` (asyncio gives a signal as a negative return code)."""
    if returncode < 0:
        return f"killed by {signal.Signals(-returncode).name}"
    return f"exit {returncode}"


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
    sys.exit(main(sys.argv[1:]))
