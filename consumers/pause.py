"""Pausing a leased consumer while an operator's tool writes what it would write.

A leased consumer (``consumers.runner``: the live projection, the paper venue) is active only
while its lease key names it, and every write it makes is fenced by that lease. A tool that must
write the same state (``ledger verify --repair``, ``ledger rebuild``, the paper venue's
``rebuild``) takes the lease: the consumer stands by (a write it has in flight fails its fence),
so what it applied stands still; the tool does its work and gives the lease back, and the
consumer takes it again at its next step and goes on from where it stood. A tool that dies
holding a lease holds it ``PAUSE_MS`` at most.
"""

from __future__ import annotations

import secrets
import socket
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

from consumers.runner import release_lease

__all__ = ["PAUSE_MS", "paused"]

PAUSE_MS = 60_000  # how long a consumer waits for a tool that died holding its lease


@asynccontextmanager
async def paused(redis: Any, leases: Sequence[str], tool: str) -> AsyncIterator[str]:
    """Hold ``leases`` (as ``tool:host:random``) for the block; yield the holder's name.
    ``tool`` is never a consumer group's name (``consumers.runner.names_of``): a lease held by a
    tool is told from one held by a consumer by that."""
    holder = f"{tool}:{socket.gethostname()}:{secrets.token_hex(4)}"
    for lease in leases:
        await redis.set(lease, holder, px=PAUSE_MS)
    try:
        yield holder
    finally:
        for lease in leases:
            await release_lease(redis, lease, holder)
