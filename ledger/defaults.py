"""Every default of the ledger, declared once (the README's Configuration table lists the
settings among them). Settings (``ledger.config``), consumers, the store, the API and the
command line take them from here. Pure: imports nothing.
"""

from __future__ import annotations

from decimal import Decimal

# Settings (LEDGER_*)
SHARDS = 1
BATCH_SIZE = 256
CLAIM_IDLE_MS = 10_000
MAX_DELIVERIES = 5
REPLY_TTL_S = 120  # CONTRACT §4: 60 s or more; four times the API's wait (API_TIMEOUT_S)
PAPER_FEE_RATE = Decimal("0.0005")
PAPER_POLL_MS = 100
TRIM_INTERVAL_S = 60
RETENTION_OPS_KEEP = 7 * 24 * 60  # retention passes kept in ledger:ops:retention (a week at TRIM_INTERVAL_S)
RECONCILE_S = 0  # `serve`'s periodic reconciliation of the live venues, every N seconds; 0: off
FINAL_ORDER_TTL_S = 7 * 24 * 3600  # how long a final order's live hash orders:{id} stays readable
PROCESSES = "roles"  # `ledger serve`: a child process per group of roles (ledger.app.service.PROCESS_GROUPS)

# Redis clients. redis-py defaults socket_timeout to 5 s, which would break a blocking read of
# more than 5 s: every blocking read (XREADGROUP, XREAD, BLPOP) blocks BLOCK_MS at a time, well
# below SOCKET_TIMEOUT_S.
BLOCK_MS = 1000
SOCKET_TIMEOUT_S = 30.0
CONNECT_TIMEOUT_S = 5.0

# How long the API waits for an outcome (a reply, a projection, a fill), and the CLI for a reply.
API_TIMEOUT_S = 30.0
REPLY_WAIT_S = 10.0

# Every retry loop (consumers, the projector's schema step, the paper venue's watcher, the
# reader of compacted outcomes) waits BACKOFF_FIRST_S after a first failure, doubling up to
# BACKOFF_MAX_S (``consumers.backoff``).
BACKOFF_FIRST_S = 0.1
BACKOFF_MAX_S = 5.0
