"""Every Redis key the ledger reads or writes, built in one place (CONTRACT §2, §6).

Shard keys carry the hash tag ``{s}`` so that a Redis Cluster keeps a shard on one slot. The
legacy live-state keys carry no tag: they are written by the projection, never by a script.
Builders validate the identifiers they put into a key.

Internal keys of the consumers (not in the contract), on the hash tag of the stream they serve:

``<stream>:tries:<group>`` (hash, ``tries``)
    A consumer group's try counters: field ``<entry id>`` is how many times the entry was
    handled alone and failed or never finished (a crash), ``<entry id>:error`` its last error.
    Written before an entry is handled, deleted when it is acknowledged or dead-lettered, so it
    holds only entries pending in the group (``ledger:{s}:commands:tries:ledger-handler``,
    ``ledger:{s}:events:tries:ledger-projector``, ...).
``<dead stream>:index`` (hash, ``dead_index``)
    Every dead letter written to a dead stream, field ``<stream>/<group>/<entry id>`` -> dead
    entry id, so an entry is dead-lettered at most once however often it is delivered
    (``ledger:{s}:dead:index``). Kept as long as the dead stream: an operator's retry or drop
    removes the field with the dead letter.
``<stream>:retry:<group>`` (set, ``retries``)
    Entry ids of ``<stream>`` an operator asked the group to handle again (``ledger dead
    retry`` of a dead event; ``ledger.app.dead``), added in the step that removes their dead
    letter. The group's runner handles each alone, counting tries as for any entry, and removes
    it once it is acknowledged or dead-lettered again (``ledger:{s}:events:retry:ledger-projector``).

Internal keys of the operators' tools:

``ledger:ops`` (stream, ``OPERATIONS``)
    Every operator action on the ledger (``ledger dead retry``/``drop``, repair, trim, rebuild),
    one entry each: ``ts`` (epoch ms), ``actor`` (user@host), ``action``, ``target``,
    ``reason`` and ``detail`` (JSON: what was acted on and what came of it). Written by
    ``ledger.store.operations.record_operation`` after the action; never trimmed by the ledger.
``ledger:ops:retention`` (stream, ``RETENTION_OPS``)
    The passes of ``serve``'s retention role that removed or compacted something, one entry each
    with the fields of ``ledger:ops`` (action ``trim``, reason ``retention``): routine, so kept
    apart from the operators' actions and capped at the last ``defaults.RETENTION_OPS_KEEP``
    (a week of passes at the default interval), where an uncapped stream would grow by one entry
    a minute for good.
``ledger:reconcile:<exchange>:<user>`` (hash, ``reconcile_findings``)
    The findings of the user's last reconciliation on the exchange (``ledger.client.reconcile``):
    field ``<kind>|<market>|<subject>`` -> the SHA-1 of its evidence and the ``ledger:ops`` entry
    that recorded it. A finding is appended to ``ledger:ops`` when it is new or its evidence
    changed, not at every periodic round; one no longer found leaves the hash.

Internal keys of the command handler and of compaction (``projections.compact``):

``ledger:{s}:outcomes`` (hash, ``ShardKeys.outcomes``)
    Every command outcome not compacted yet, field ``user_id:command_id`` -> the reply JSON,
    written by the append step (deduplication, CONTRACT §3). Once the command is archived and
    older than the retention, compaction copies the reply to PostgreSQL (``ledger_outcomes``)
    and moves the outcome to the index below. (Before the index, compaction left a marker ``~`` +
    20 hex digits of the reply's SHA-1 here: one still found is read as such and moved by the
    next pass.)
``ledger:{s}:outcomes:archived`` (hash, ``ShardKeys.archived``) and ``…:archived:<n>`` (hashes)
    The index of compacted outcomes (``ledger.store.archived``): the meta hash holds the
    generation (``level``, ``split``) and ``count``; bucket ``n`` maps the fingerprint of an
    outcome field (16 bytes) to the digest of its reply (10 bytes).
``ledger:{s}:outcomes:eventless`` (sorted set, ``ShardKeys.eventless``)
    The outcomes without events (rejections), scored by when the append step recorded them (epoch
    ms, Redis's clock): their age, which no event id gives. A member leaves when compacted.
``ledger:{s}:outcomes:waiting`` (hash, ``ShardKeys.waiting``)
    Duplicates of compacted commands waiting for their first reply from PostgreSQL: field
    ``user_id:command_id`` -> the marker. Written by the append step (and a malformed duplicate's
    dead letter) instead of the reply; the handler's ``OutcomeReader`` answers each from
    ``ledger_outcomes`` and removes it in one step, retrying with back-off while PostgreSQL is away.
``ledger:{s}:orders``, ``ledger:{s}:positions`` (hashes, ``ShardKeys.orders`` / ``positions``)
    The snapshot (msgspec JSON of ``OrderState`` / ``PositionState``) of every aggregate in Redis,
    by id. A final order or closed position whose events are archived, processed by every
    consumer of the log and older than the retention leaves for the index below
    (``projections.compact``); its state is then in PostgreSQL only (``ledger_events``). A
    compact form (only what the decider reads, plus ``compacted``) written by an earlier version
    is read like the full state and leaves at the next pass.
``ledger:{s}:aggregates:archived`` (hash, ``ShardKeys.cold``) and ``…:archived:<n>`` (hashes)
    The index of those aggregates (``ledger.store.archived``, as the outcomes'): fingerprint of the
    id -> ``o`` or ``p``. The handler looks up the ids it does not find in the snapshots there.
``ledger:{s}:commands:cold`` (stream, ``ShardKeys.deferred``)
    Commands that name an archived aggregate, set aside by the handler in order (the entry's
    fields plus ``cold_entry``, its id in the command stream, and ``cold_ids``); the handler
    role's ``OutcomeReader`` folds those aggregates from ``ledger_events``, writes them back to
    the snapshots and publishes the commands again, in one step.
``ledger:{s}:orders:final``, ``ledger:{s}:positions:final`` (sorted sets, ``ShardKeys.final_orders``
/ ``final_positions``)
    The aggregates compaction has still to look at: each id the append step wrote a final (or
    closed) snapshot of, scored by its ``updated_at`` (epoch ms). Compaction reads those older than
    the retention and removes each it compacts or finds no longer final, so a pass costs what
    became final since, not every aggregate ever.
``ledger:{s}:compacted`` (hash, ``ShardKeys.compacted``)
    Compaction's counts: ``orders`` and ``positions`` compactions so far (one compacted again
    after a late fill counts again), and ``finals:orders`` /
    ``finals:positions`` = ``1`` once the sorted sets above hold every final aggregate (a pass
    finding one unset scans that hash once: aggregates made final before the sorted sets existed),
    and ``outcomes:through``, the log entry up to which compaction read the archive's events for
    outcomes to move (a pass finding it unset scans the outcomes hash once, then sets it).

Internal keys of the live projection (``projections.live``):

``ledger:{s}:projection`` (string, ``ShardKeys.checkpoint``)
    The last event-log entry the live projection applied on the shard; it only moves forward.
``ledger:{s}:projection:progress`` (stream, ``ShardKeys.progress``)
    The checkpoint told: each step that moves it adds an entry whose id is the new checkpoint
    (field ``applied``, the same id), in the same atomic step, capped at about
    ``projections.live.PROGRESS_KEEP`` entries. A reader waiting for entry ``E`` to be applied
    blocks with ``XREAD`` after the id just before ``E`` (``ledger.client.api``) instead of
    polling the checkpoint.
``ledger:{s}:projection:expiring`` (sorted set, ``ShardKeys.expiring``)
    What the projection forgets later, scored by when (epoch milliseconds): a final order's id
    leaves ``orders:user:…`` once its hash ``orders:{id}`` has expired, and the fence fields of
    final orders and closed positions (below) are dropped after the same retention. A member is
    ``o <order id> <user> <exchange> <symbol>`` or ``p <position id> <user> <exchange>``
    (``projections.live.Expiry``, which derives the keys from it; JSON members of older versions
    are still carried out).
``ledger:live:fence:{<live key>}`` (hash, ``fence``)
    The fence of one legacy live key, on that key's cluster slot (the key itself is the hash
    tag; legacy keys never contain braces): field ``""`` (the whole key: a position hash, a GRID
    level hash) or a member / hash field (a set member, a GRID level, a position id of
    ``ledger:live:position-keys``) -> the entry id of the last event written there. A write of an
    older event is refused, so a consumer that lost its lease mid-batch never moves a live key
    backwards; a deleted key keeps its fence (a tombstone). Order hashes need none: they are
    written only over the previous ``version`` of the same order.
"""

from __future__ import annotations

import zlib

from ledger.domain.enums import Exchange
from ledger.domain.values import check_identifier

META = "ledger:meta"
OPERATIONS = "ledger:ops"
RETENTION_OPS = "ledger:ops:retention"
MARKS_PREFIX = "marks:"


def execution_field(exchange: Exchange | str) -> str:
    """The ``ledger:meta`` field recording how ``exchange`` executes (``paper``, ``external`` or
    ``live``): ``execution:<exchange>``, the name from the ``Exchange`` enum (anything else is
    refused with ``ValueError``). Written by ``serve`` and ``ledger execution set``; read by the
    venues with each batch (``consumers.guard``)."""
    return f"execution:{Exchange(exchange).value}"


def shard_of(user_id: str, shards: int) -> int:
    """The shard of a user: zlib CRC-32 of the UTF-8 user id modulo the shard count."""
    return zlib.crc32(user_id.encode()) % shards


def shard_key(shard: int, name: str) -> str:
    """``ledger:{shard}:name``: a key of one shard, under its hash tag (one cluster slot)."""
    return f"ledger:{{{shard}}}:{name}"


class ShardKeys:
    """The keys of one shard."""

    __slots__ = (
        "shard",
        "commands",
        "events",
        "dead",
        "orders",
        "positions",
        "slots",
        "sequence",
        "outcomes",
        "eventless",
        "waiting",
        "archived",
        "final_orders",
        "final_positions",
        "compacted",
        "cold",
        "deferred",
        "checkpoint",
        "progress",
        "expiring",
        "chain",
    )

    def __init__(self, shard: int) -> None:
        tag = f"ledger:{{{shard}}}"
        self.shard = shard
        self.commands = f"{tag}:commands"
        self.events = f"{tag}:events"
        self.dead = f"{tag}:dead"
        # Aggregate snapshots (JSON per id), open-position slots and the per-user concurrency
        # token, all written by the append script with the events they come from.
        self.orders = f"{tag}:orders"
        self.positions = f"{tag}:positions"
        self.slots = f"{tag}:slots"
        self.sequence = f"{tag}:sequence"
        # Every command outcome ever given, by "user_id:command_id" (deduplication).
        self.outcomes = f"{tag}:outcomes"
        # The age of outcomes without events, and duplicates of compacted commands being answered.
        self.eventless = f"{tag}:outcomes:eventless"
        self.waiting = waiting(self.outcomes)
        # The index of compacted outcomes (``ledger.store.archived``): its meta hash; its
        # buckets are this key and ":<n>".
        self.archived = f"{tag}:outcomes:archived"
        # The final orders and positions compaction has still to look at, and its counts.
        self.final_orders = f"{tag}:orders:final"
        self.final_positions = f"{tag}:positions:final"
        self.compacted = f"{tag}:compacted"
        # The index of final orders and closed positions moved to PostgreSQL (fingerprint of the
        # id -> 'o' or 'p'), and the commands waiting for one of them to be read back.
        self.cold = f"{tag}:aggregates:archived"
        self.deferred = f"{tag}:commands:cold"
        # The live projection's position in the event log.
        self.checkpoint = f"{tag}:projection"
        # The same, told: one entry per step whose id is the new checkpoint (readers block on it).
        self.progress = f"{tag}:projection:progress"
        # What the live projection forgets later (expired final orders, old fence fields).
        self.expiring = f"{tag}:projection:expiring"
        # The head of the events' hash chain (``ledger.store.chain``): hash of ``id``, ``n``, ``hash``.
        self.chain = f"{tag}:chain"

    def lease(self, group: str) -> str:
        """The lease that makes one consumer of ``group`` the active one on this shard."""
        return shard_key(self.shard, f"lease:{group}")

    def reply(self, user_id: str, command_id: str) -> str:
        check_identifier("user_id", user_id)
        check_identifier("command_id", command_id)
        return f"ledger:{{{self.shard}}}:reply:{user_id}:{command_id}"


def tries(stream: str, group: str) -> str:
    """The try counters of a consumer group on a stream (same hash tag as the stream)."""
    return f"{stream}:tries:{group}"


def dead_index(dead_stream: str) -> str:
    """The index of the dead letters written to a dead stream (same hash tag)."""
    return f"{dead_stream}:index"


def retries(stream: str, group: str) -> str:
    """The entries of ``stream`` an operator asked ``group`` to handle again (same hash tag)."""
    return f"{stream}:retry:{group}"


def waiting(outcomes: str) -> str:
    """The duplicates waiting for a compacted outcome of an outcomes hash (same hash tag)."""
    return f"{outcomes}:waiting"


def outcome_field(user_id: str, command_id: str) -> str:
    return f"{user_id}:{command_id}"


def outcome_ids(field: str) -> tuple[str, str]:
    """The user and command ids of an outcome field (a user id has no ``:``, a command id may)."""
    user_id, _sep, command_id = field.partition(":")
    check_identifier("user_id", user_id)
    check_identifier("command_id", command_id)
    return user_id, command_id


def marks(exchange: str) -> str:
    return f"{MARKS_PREFIX}{exchange}"


def reconcile_findings(exchange: str, user_id: str) -> str:
    return f"ledger:reconcile:{Exchange(exchange)}:{check_identifier('user_id', user_id)}"


# --------------------------------------------------------------------------- legacy live state
# CONTRACT §6: the key layout the HYPERRSI and GRID readers already use (no hash tags).

ACTIVE_POSITIONS = "positions:active"
# Our own lookup, position id -> its live hash key (the legacy keys are named by market, not id).
POSITION_KEYS = "ledger:live:position-keys"
FENCE_PREFIX = "ledger:live:fence:"


def fence(live_key: str) -> str:
    """The fence of a legacy live key: a hash on the same cluster slot (the key is its hash tag)."""
    return f"{FENCE_PREFIX}{{{live_key}}}"


def position_key(user_id: str, exchange: str, symbol: str, side: str) -> str:
    check_identifier("user_id", user_id)
    check_identifier("symbol", symbol)
    return f"positions:{user_id}:{exchange}:{symbol}:{side}"


def position_index(user_id: str, exchange: str) -> str:
    check_identifier("user_id", user_id)
    return f"positions:index:{user_id}:{exchange}"


def order_key(order_id: str) -> str:
    check_identifier("uuid", order_id, "order_id")
    return f"orders:{order_id}"


def user_orders(user_id: str, exchange: str) -> str:
    check_identifier("user_id", user_id)
    return f"orders:user:{user_id}:{exchange}"


def open_orders(exchange: str, symbol: str) -> str:
    check_identifier("symbol", symbol)
    return f"orders:open:{exchange}:{symbol}"


def grid_active(exchange: str, user_id: str, symbol: str, level: int) -> str:
    check_identifier("user_id", user_id)
    check_identifier("symbol", symbol)
    return f"{exchange}:user:{user_id}:symbol:{symbol}:active_grid:{int(level)}"


def grid_orders(exchange: str, user_id: str, symbol: str) -> str:
    check_identifier("user_id", user_id)
    check_identifier("symbol", symbol)
    return f"orders:{exchange}:user:{user_id}:symbol:{symbol}:orders"


def grid_placed_index(exchange: str, user_id: str, symbol: str) -> str:
    check_identifier("user_id", user_id)
    check_identifier("symbol", symbol)
    return f"orders:{exchange}:user:{user_id}:symbol:{symbol}:order_placed_index"
