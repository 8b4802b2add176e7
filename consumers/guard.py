"""Which exchanges a venue role acts on now: the guard against executing one exchange twice.

Each venue role (the paper venue, ``consumers.paper``; the live venue, ``consumers.venue``) is
configured by its own process's ``LEDGER_EXECUTION``, while the mode every ``serve`` must follow is
recorded in ``ledger:meta`` (field ``execution:<exchange>``: ``ledger.store.keys.execution_field``).
``serve`` refuses to start with other modes than the recorded ones
(``ledger.store.redis_conn.ensure_execution``); ``ledger execution set`` rewrites them while
processes run. So a venue reads the recorded modes of the exchanges it executes with each batch
that holds an order to execute (one HMGET in the pipeline of a read it does anyway; on a Redis
Cluster ``ledger:meta`` lives on another slot than the shard's keys, so it is its own command of
that pipeline, never part of a script) and acts only on the exchanges whose recorded mode is
still its own (or not recorded at all: no ``serve`` recorded one yet). For the others it steps
aside: their orders are skipped and acknowledged exactly as those of an exchange it does not
execute, and one error line per exchange, at most every ``LOG_EVERY_S``, says so and what to do.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

from ledger.config import DEFAULT_EXECUTION
from ledger.domain.enums import Exchange
from ledger.store.keys import META, execution_field
from ledger.store.redis_conn import text

# The shortest time between two error lines about one exchange (per role and process).
LOG_EVERY_S = 10.0


class ExecutionGuard:
    """The exchanges a venue executing in ``mode`` acts on, by ``execution`` (its process's
    ``LEDGER_EXECUTION``) and the modes recorded in ``ledger:meta``. One per role: the venues of
    every shard share it, so an exchange is reported once per ``LOG_EVERY_S``, not once per shard."""

    def __init__(self, mode: str, execution: Mapping[Exchange, str], log: Any, *, every_s: float = LOG_EVERY_S) -> None:
        self.mode = mode
        self.exchanges: tuple[Exchange, ...] = tuple(e for e in Exchange if execution.get(e, DEFAULT_EXECUTION) == mode)
        self.log = log
        self.every_s = every_s
        self._reported: dict[Exchange, float] = {}

    def read(self, pipe: Any) -> None:
        """Queue the read of the recorded modes on ``pipe`` (its answer goes to ``acting``); only
        for a venue that executes some exchange (an HMGET needs a field)."""
        pipe.hmget(META, [execution_field(exchange) for exchange in self.exchanges])

    async def current(self, redis: Any) -> frozenset[Exchange]:
        """The exchanges acted on now, read on their own (``read`` + ``acting``)."""
        if not self.exchanges:
            return frozenset()
        pipe = redis.pipeline(transaction=False)
        self.read(pipe)
        (values,) = await pipe.execute()
        return self.acting(values)

    def acting(self, values: Sequence[Any]) -> frozenset[Exchange]:
        """The exchanges this venue acts on, given the answer of ``read``: those whose recorded
        mode is its own or not recorded. Logs the error line of each other one (rate-limited)."""
        acting = set()
        for exchange, value in zip(self.exchanges, values, strict=True):
            recorded = None if value is None else text(value)
            if recorded is None or recorded == self.mode:
                acting.add(exchange)
            else:
                self._report(exchange, recorded)
        return frozenset(acting)

    def _report(self, exchange: Exchange, recorded: str) -> None:
        now = time.monotonic()
        last = self._reported.get(exchange)
        if last is not None and now - last < self.every_s:
            return
        self._reported[exchange] = now
        self.log.error(
            f"{exchange} is recorded as {recorded} but this serve executes it as {self.mode}: it no longer "
            f"executes {exchange}; stop this serve or restart it with LEDGER_EXECUTION={exchange}={recorded}",
            exchange=str(exchange),
            recorded=recorded,
            mode=self.mode,
        )


__all__ = ["LOG_EVERY_S", "ExecutionGuard"]
