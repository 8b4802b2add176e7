"""``ledger serve``: the roles of the ledger composed into one process (or run apart).

Each role is a set of runnables with a ``run(stop)`` coroutine, built by a factory that lives
with the role's code: ``handler`` (consumers.command_handler), ``projection``
(projections.live), ``projector`` (projections.projector), ``paper`` (consumers.paper),
``venue`` (consumers.venue, for ``live`` exchanges), ``retention`` (projections.trim),
``reconcile`` (consumers.reconciling, periodic reconciliation of the live venues). Any subset
runs in one process (:func:`serve`), or each group of :data:`PROCESS_GROUPS` in its own child
process under a supervisor (``ledger.app.processes``), so Python work spreads over cores.
"""

from __future__ import annotations

import asyncio
import functools
import importlib
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

import structlog
from redis.asyncio.cluster import RedisCluster

from consumers.together import run_all
from ledger.app import servers
from ledger.app.supervisor import stop_on_signals
from ledger.config import SERVER_SETTINGS, Settings, known_url
from ledger.store.redis_conn import connect, ensure_execution, ensure_shard_count, record_final_order_ttl
from ledger.venues.accounts import live_configs
from projections.live import inline_projection
from projections.projector import redact

log = structlog.get_logger("ledger.app.service")


class Runnable(Protocol):
    async def run(self, stop: asyncio.Event) -> None: ...


RoleFactory = Callable[[Any, Settings], Awaitable[Sequence[Runnable]]]


# Role -> the module of its factory, ``<role>_role``. Imported when the role runs, so a process
# loads only its own roles' code (the venue's ccxt alone is about 75 MB).
ROLES: dict[str, str] = {
    "handler": "consumers.command_handler",
    "projection": "projections.live",
    "projector": "projections.projector",
    "paper": "consumers.paper",
    "venue": "consumers.venue",
    "retention": "projections.trim",
    "reconcile": "consumers.reconciling",
}
# The child processes of ``ledger serve`` in process mode: one per group, each role in exactly
# one. The two steps of the order path each in a process of its own, so that a reply and the live
# keys it leads to are worked on in parallel and neither waits for the other's event loop: the
# handler (and its OutcomeReader); the live projection with the venues (idle unless orders execute
# on them) and their periodic reconciliation (off unless LEDGER_RECONCILE_S is set: it shares the
# venue's ccxt). The work off the order path, the PostgreSQL projector and the periodic retention,
# in a third process at a lower CPU priority (``BACKGROUND_ROLES``). Measured on the two-core
# benchmark machine against two processes (handler + projector + retention | projection + venues),
# medians of three alternating runs each: ``create_order`` p50 6.1 -> 5.1 ms, ``open_position`` p50
# 16.0 -> 14.6 ms, command -> reply p50 at 1,000 commands/s 24.8 -> 16.9 ms, end to end unchanged
# (1,783 -> 1,828 commands/s); a process costs about 57 MB (peak RSS summed 198 -> 221 MB, with the
# supervisor's own image cut: ``ledger.app.supervisor``).
PROCESS_GROUPS: tuple[tuple[str, ...], ...] = (
    ("handler",),
    ("projection", "paper", "venue", "reconcile"),
    ("projector", "retention"),
)
# The roles off the order path: a child running only these lowers its CPU priority by
# ``BACKGROUND_NICE`` (``os.nice``), so that when the cores are busy the handler and the live
# projection run first and the history catches up in the time they leave (a process at nice 10
# still runs when they do, with a CFS weight of 110 against their 1,024 each, so it never stops).
# The third process without the lower priority, two runs against the same base then: create_order
# 6.2 -> 5.7 ms, open_position 18.0 -> 15.3 ms, reply p50 19.8 -> 19.6 ms.
BACKGROUND_ROLES = frozenset({"projector", "retention"})
BACKGROUND_NICE = 10
# The roles that need the PostgreSQL history: ``serve`` starts the private one for them when no
# LEDGER_DATABASE_URL is set (the others find it, if any, when they need it).
DATABASE_ROLES = frozenset({"projector", "retention"})
# The roles whose work follows LEDGER_EXECUTION (the venues execute orders, the periodic
# reconciliation records what the live venues did): a ``serve`` running any of them records the
# execution mode of every exchange in ledger:meta and refuses to start with other modes than the
# recorded ones (``ledger.store.redis_conn.ensure_execution``; ``ledger execution set`` switches).
EXECUTION_ROLES = frozenset({"paper", "venue", "reconcile"})


_PRIVATE = {
    "redis": (servers.ensure_private_redis, "redis-server with AOF on"),
    "postgres": (servers.ensure_private_postgres, "PostgreSQL"),
}

# Redis settings under which the ledger can lose keys: INFO field -> (the safe value, the warning).
# noeviction is the only maxmemory-policy that never evicts a ledger key: the volatile-* policies
# evict keys with a TTL, replies (a waiting caller times out) and final order hashes (readers lose
# them before their 7 days); the allkeys-* policies evict anything, the event log included.
REDIS_RISKS = {
    "maxmemory_policy": (
        "noeviction",
        "redis may evict ledger keys: set maxmemory-policy noeviction (CONFIG SET maxmemory-policy noeviction, "
        "and in redis.conf) and give Redis enough memory",
    ),
    "aof_enabled": (
        "1",
        "redis keeps no append-only file, so a restart loses the ledger: set appendonly yes (CONFIG SET "
        "appendonly yes, and in redis.conf)",
    ),
}


def _server_url(kind: str, configured: str | None, settings: Settings, *, start: bool) -> str:
    """The configured server, else the private one under ``settings.home`` (started if asked)."""
    ensure, what = _PRIVATE[kind]
    if configured or not start:
        return known_url(settings, kind)
    url = ensure(settings.home, settings.durability)
    log.info(
        f"no {SERVER_SETTINGS[kind][1]}: using a private {what}",
        url=redact(url),
        home=str(settings.home),
        durability=str(settings.durability),
    )
    return url


def redis_url(settings: Settings, *, start: bool) -> str:
    return _server_url("redis", settings.redis_url, settings, start=start)


def database_url(settings: Settings, *, start: bool) -> str:
    return _server_url("postgres", settings.database_url, settings, start=start)


async def warn_about_redis(redis: Any) -> dict[str, str]:
    """Log one warning (that says what to do) per Redis setting that can lose ledger keys, read
    from every node of a cluster; return the unsafe values found (INFO field -> value)."""
    if isinstance(redis, RedisCluster):
        nodes = list((await redis.info(target_nodes=RedisCluster.ALL_NODES)).values())
    else:
        nodes = [await redis.info()]
    unsafe: dict[str, str] = {}
    for name, (safe, warning) in REDIS_RISKS.items():
        values = [str(node.get(name, safe)) for node in nodes]
        value = next((v for v in values if v != safe), safe)
        if value != safe:
            log.warning(warning, **{name: value})
            unsafe[name] = value
    return unsafe


def role_factory(role: str) -> RoleFactory:
    """The factory of ``role`` (a key of :data:`ROLES`), its module imported now."""
    factory = getattr(importlib.import_module(ROLES[role]), f"{role}_role")
    if role == "handler":  # its appends make the live projection's writes while that is caught up
        factory = functools.partial(factory, live=inline_projection)
    typed: RoleFactory = factory
    return typed


async def prepare(settings: Settings, roles: Sequence[str]) -> tuple[Any, Settings]:
    """Once per ``serve``, before any role runs: the private servers started where none is
    configured, Redis's settings checked, the shard count and (for the ``EXECUTION_ROLES``) the
    execution modes recorded. Returns a Redis client and
    the settings with every server's URL resolved (what role processes are given)."""
    # Live exchanges need their accounts and markets (the venue role, and the periodic
    # reconciliation when it is on): refuse before starting anything.
    if "venue" in roles or ("reconcile" in roles and settings.reconcile_s):
        live_configs(settings.execution, settings.credentials)
    url = redis_url(settings, start=True)
    settings = settings.with_overrides(redis_url=url)
    redis = await connect(url)
    try:
        await warn_about_redis(redis)
        await ensure_shard_count(redis, settings.shards)
        if EXECUTION_ROLES.intersection(roles):
            await ensure_execution(redis, settings.execution)
        if "projection" in roles:
            await record_final_order_ttl(redis, settings.final_order_ttl_s)
        if settings.database_url is None and DATABASE_ROLES.intersection(roles):
            settings = settings.with_overrides(database_url=await asyncio.to_thread(database_url, settings, start=True))
    except BaseException:
        await redis.aclose()
        raise
    return redis, settings


async def run_roles(redis: Any, settings: Settings, roles: Sequence[str], stop: asyncio.Event) -> None:
    """Run the given roles on this event loop until ``stop``; each finishes its batch first."""
    runnables: list[Runnable] = []
    for role in roles:
        runnables += await role_factory(role)(redis, settings)
    log.info("serving", roles=list(roles), shards=settings.shards, consumers=len(runnables))
    try:
        await run_all([runnable.run for runnable in runnables], stop)
    finally:
        log.info("stopped")


async def serve(settings: Settings, roles: list[str], stop: asyncio.Event | None = None) -> None:
    """Run the given roles in this process until SIGTERM/SIGINT (or ``stop``); each finishes its
    batch first.

    With a ``stop`` event the caller owns shutdown (tests, embedding): no signal handler is
    installed, so the host's own SIGINT/SIGTERM handling is left alone.
    """
    if stop is None:
        stop = asyncio.Event()
        stop_on_signals(stop)
    redis, settings = await prepare(settings, roles)
    try:
        await run_roles(redis, settings, roles, stop)
    finally:
        await redis.aclose()
