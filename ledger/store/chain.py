"""The hash chain of a shard's event log: the pure part of tamper evidence.

The append script (``ledger/lua/append.lua``) gives every event entry two fields besides
``type`` and ``data`` (CONTRACT §5; readers ignore fields they do not know):

``n``
    the event's number in its shard's chain: 1, 2, 3 ..., gapless, in log order;
``hash``
    ``sha1hex(prev + "\\n" + n + "\\n" + type + "\\n" + data)``, over the exact bytes appended,
    where ``prev`` is the hash of event ``n - 1`` and, for event 1, the shard's genesis
    ``sha1hex("ledger:{s}:events")`` (the events key's name: a shard's chain cannot pass for
    another's).

The script keeps the chain's head in ``ledger:{s}:chain`` (``id``, ``n``, ``hash`` of the last
chained event), written in the same atomic step as the events. The PostgreSQL archive keeps
``n``, ``hash`` and the exact ``data`` text (``data_raw``) of every event it holds.

**SHA-1.** Redis 7.0's Lua offers no other hash (``redis.sha1hex``), and the hash must be taken
inside the append step, where the previous hash is known atomically. A SHA-256 in Lua would cost
more than the rest of the append. What tamper evidence needs is second-preimage resistance (an
edited event with the same hash as the original), which SHA-1 still has; its known attacks are
collisions, where the attacker chooses both messages beforehand, and every hashed message here
starts with the previous hash and carries a ledger-made event id and time that nobody knows in
advance. The chain proves order and content relative to a head written down elsewhere
(``ledger checkpoint``) or to the other tier: anyone can compute SHA-1, so someone who can
rewrite a whole suffix of one tier and its head can make that tier consistent again; the other
tier and the published heads catch it.

**Before the chain.** Events appended before the chain existed have no ``n`` and ``hash`` (and
archive rows from then no ``data_raw``): they form an unchained prefix that verification counts
and reports but cannot check. The chain starts at the first hashed event, numbered 1 from the
genesis. A hashless entry after that is an insertion.

``Walker`` checks one view of a shard's log, entry by entry in log order, and names the first
entry that breaks the chain: altered (its hash does not match its content and the previous
hash), deleted (numbers missing), inserted (an entry the chain does not need, or one past the
head), reordered (a number that comes before a smaller one).
"""

from __future__ import annotations

import hashlib
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ledger.domain.state import StateError
from ledger.domain.wire import entry_field
from ledger.store.keys import ShardKeys
from ledger.store.redis_conn import text

__all__ = [
    "LOOKAHEAD",
    "Finding",
    "Head",
    "Link",
    "Walker",
    "chain_fields",
    "genesis",
    "link_hash",
    "parse_expect",
]

LOOKAHEAD = 1000  # entries read past a break to tell an insertion, a deletion and a reordering apart

ALTERED, DELETED, INSERTED, REORDERED, DISAGREE, CHECKPOINT = (
    "altered",
    "deleted",
    "inserted",
    "reordered",
    "disagree",
    "checkpoint",
)


def genesis(shard: int) -> str:
    """The hash before a shard's event 1: SHA-1 of the shard's events key name."""
    return hashlib.sha1(ShardKeys(shard).events.encode()).hexdigest()


def link_hash(prev: str, n: int, type_name: str, data: str) -> str:
    """The hash of event ``n`` of a chain, as ``append.lua`` computes it."""
    return hashlib.sha1(f"{prev}\n{n}\n{type_name}\n{data}".encode()).hexdigest()


def chain_fields(fields: Mapping[Any, Any]) -> tuple[int | None, str | None]:
    """An event entry's ``n`` and ``hash`` (fields as Redis gives them, text or bytes); None
    for a field that is absent (an entry from before the chain) or, for ``n``, not a number."""

    number, hash_ = (text(entry_field(fields, name)) for name in ("n", "hash"))
    return (int(number) if number is not None and number.isascii() and number.isdigit() else None), hash_


@dataclass(frozen=True, slots=True)
class Link:
    """One event entry as a tier holds it. ``n`` and ``hash`` are None for an entry appended
    before the chain existed; ``data`` is None when the exact text is not kept (an archive row
    from before the chain)."""

    entry_id: str
    type: str
    data: str | None
    n: int | None
    hash: str | None
    tier: str  # "redis" or "archive": where this copy was read

    def same_as(self, other: Link) -> bool:
        """Whether two tiers' copies of one entry agree (text compared only where both keep it)."""
        data_known = self.data is not None and other.data is not None
        return (self.type, self.n, self.hash) == (other.type, other.n, other.hash) and (
            not data_known or self.data == other.data
        )


@dataclass(frozen=True, slots=True)
class Head:
    """The last chained event: what ``ledger checkpoint`` prints and an auditor writes down."""

    shard: int
    entry_id: str
    n: int
    hash: str

    @property
    def token(self) -> str:
        """``SHARD:N:HASH``, the form ``verify --chain --expect`` takes back."""
        return f"{self.shard}:{self.n}:{self.hash}"

    def as_dict(self) -> dict[str, object]:
        return {
            "shard": self.shard,
            "entry_id": self.entry_id,
            "n": self.n,
            "hash": self.hash,
            "checkpoint": self.token,
        }


def parse_expect(value: str) -> tuple[int, int, str]:
    """``SHARD:N:HASH`` (from ``ledger checkpoint``) as (shard, n, hash); ValueError says the form."""
    parts = value.strip().split(":")
    ok = (
        len(parts) == 3
        and all(p.isascii() and p.isdigit() for p in parts[:2])
        and int(parts[1]) >= 1
        and len(parts[2]) == 40
        and all(c in "0123456789abcdef" for c in parts[2])
    )
    if not ok:
        raise ValueError(
            f"must be SHARD:N:HASH as `ledger checkpoint` prints it, e.g. 0:42:<40 hex digits> (got {value!r})"
        )
    return int(parts[0]), int(parts[1]), parts[2]


@dataclass(frozen=True, slots=True)
class Finding:
    """A break of the chain (or a disagreement of the tiers), named by its entry."""

    shard: int
    tier: str  # "redis", "archive" or "both"
    kind: str
    entry_id: str | None
    n: int | None
    message: str

    def as_dict(self) -> dict[str, object]:
        return {
            "shard": self.shard,
            "tier": self.tier,
            "kind": self.kind,
            "entry_id": self.entry_id,
            "n": self.n,
            "message": self.message,
        }


def _numbers(first: int, last: int) -> str:
    return f"#{first}" if first == last else f"#{first}..#{last}"


def _name(link: Link) -> str:
    return f"entry {link.entry_id}" + (f" (#{link.n})" if link.n is not None else "")


@dataclass(slots=True)
class Walker:
    """Checks one view of a shard's log (one tier, with what it legitimately lacks taken from
    the other) fed in log order; ``finding`` is the first break, then the walker stops.

    ``expect`` maps event numbers to the hashes a checkpoint recorded for them.
    """

    shard: int
    tier: str
    expect: dict[int, str] = field(default_factory=dict)
    n: int = 0
    hash: str = ""
    entry_id: str | None = None
    before: str = ""  # the hash before the last event walked
    unchained: int = 0
    finding: Finding | None = None
    _window: list[Link] | None = None
    _recent: deque[tuple[int, str]] = field(default_factory=lambda: deque(maxlen=LOOKAHEAD))

    def __post_init__(self) -> None:
        self.hash = genesis(self.shard)

    @property
    def done(self) -> bool:
        return self.finding is not None

    def feed(self, link: Link) -> None:
        if self.finding is not None:
            return
        if self._window is not None:
            self._window.append(link)
            if len(self._window) > LOOKAHEAD:
                self._classify()
            return
        if link.n is None and self.n == 0:
            self.unchained += 1
            return
        if self._follows(link):
            self._advance(link)
        else:
            self._window = [link]

    def finish(self, head: Head | None) -> None:
        """The view is over: classify a pending break, then hold the end against the head read
        from Redis (None: there is none) and against the expected checkpoints."""
        if self._window is not None:
            self._classify()
        if self.finding is not None:
            return
        where = f"ledger:{{{self.shard}}}:chain"
        if head is None:
            if self.n:
                self._found(DELETED, None, None, f"the chain head {where} is missing while the log holds #1..#{self.n}")
        elif head.n > self.n:
            after = f"after entry {self.entry_id} (#{self.n})" if self.entry_id else "from the start"
            self._found(
                DELETED,
                head.entry_id,
                head.n,
                f"{_numbers(self.n + 1, head.n)} missing {after}: the chain head {where} names #{head.n} "
                f"(entry {head.entry_id}): deleted",
            )
        elif head.n < self.n:
            past = dict(self._recent).get(head.n + 1, "?")
            self._found(
                INSERTED,
                past,
                head.n + 1,
                f"entry {past} (#{head.n + 1}) lies past the chain head {where} (#{head.n}, entry "
                f"{head.entry_id}): inserted",
            )
        elif head.hash != self.hash or head.entry_id != self.entry_id:
            self._found(
                ALTERED,
                self.entry_id,
                self.n,
                f"entry {self.entry_id} (#{self.n}) has hash {self.hash}, the chain head {where} names entry "
                f"{head.entry_id} with hash {head.hash}: the log or its head was rewritten",
            )
        if self.finding is None and self.expect and max(self.expect) > self.n:
            wanted = max(self.expect)
            self._found(DELETED, None, wanted, f"the log ends at #{self.n}, before the checkpoint's #{wanted}: deleted")

    def past_head(self, link: Link, head: Head) -> None:
        """``link`` lies after the head in this view's tier: an insertion (unless a break came first)."""
        if self._window is not None:
            self._classify()
        if self.finding is None:
            where = f"ledger:{{{self.shard}}}:chain (#{head.n}, entry {head.entry_id})"
            self._found(
                INSERTED, link.entry_id, link.n, f"entry {link.entry_id} lies past the chain head {where}: inserted"
            )

    # ----------------------------------------------------------------- steps

    def _follows(self, link: Link, n: int | None = None, prev: str | None = None) -> bool:
        n = self.n if n is None else n
        prev = self.hash if prev is None else prev
        return link.n == n + 1 and link.data is not None and link.hash == link_hash(prev, n + 1, link.type, link.data)

    def _advance(self, link: Link) -> None:
        if link.n is None or link.hash is None:
            raise StateError(f"entry {link.entry_id}: a chain link without its number or hash")
        self.n, self.before, self.hash, self.entry_id = link.n, self.hash, link.hash, link.entry_id
        self._recent.append((link.n, link.entry_id))
        wanted = self.expect.get(link.n)
        if wanted is not None and wanted != link.hash:
            self._found(
                CHECKPOINT,
                link.entry_id,
                link.n,
                f"{_name(link)} has hash {link.hash}, the checkpoint says {wanted}: the log was rewritten since",
            )

    def _classify(self) -> None:
        """Name the break at the window's first entry, the rest of the window being what follows."""
        window, self._window = self._window or [], None
        c, rest = window[0], window[1:]
        previous = f"entry {self.entry_id} (#{self.n})" if self.entry_id else "the genesis"
        moved = next((w for w in rest if w.n == self.n + 1), None)
        continues = bool(rest) and self._follows(rest[0])  # the chain goes on as if c were not there
        if c.n is None or c.hash is None:
            message = f"entry {c.entry_id} has no chain hash and follows {previous}: inserted"
            self._found(INSERTED, c.entry_id, None, message)
        elif moved is not None and c.n > self.n + 1 and (self._linked(c, rest) or not continues):
            self._found(
                REORDERED, c.entry_id, c.n, f"{_name(c)} comes before #{self.n + 1} ({_name(moved)}): reordered"
            )
        elif continues:
            message = f"{_name(c)} is not part of the chain (it follows {previous}): inserted"
            self._found(INSERTED, c.entry_id, c.n, message)
        elif c.n == self.n + 1:
            message = f"{_name(c)} was altered: its hash does not match its type, data and the hash of {previous}"
            self._found(ALTERED, c.entry_id, c.n, message)
        elif c.n == self.n and self._follows(c, self.n - 1, self.before) and (not rest or self._linked(rest[0], [c])):
            # a fork: the event walked last and c both follow #n-1, and the chain goes on from c
            message = f"entry {self.entry_id} (#{self.n}) is not part of the chain ({_name(c)} is #{self.n}): inserted"
            self._found(INSERTED, self.entry_id, self.n, message)
        elif c.n <= self.n:
            message = f"{_name(c)} repeats a number the chain already passed ({previous}): inserted"
            self._found(INSERTED, c.entry_id, c.n, message)
        else:
            message = f"{_numbers(self.n + 1, c.n - 1)} missing between {previous} and {_name(c)}: deleted"
            self._found(DELETED, c.entry_id, self.n + 1, message)

    def _linked(self, link: Link, window: list[Link]) -> bool:
        """Whether ``link`` follows its predecessor somewhere in ``window`` (a genuine event out
        of place rather than a forged one)."""
        return any(w.n is not None and w.hash is not None and self._follows(link, w.n, w.hash) for w in window)

    def _found(self, kind: str, entry_id: str | None, n: int | None, message: str) -> None:
        self.finding = Finding(self.shard, self.tier, kind, entry_id, n, f"shard {self.shard} {self.tier}: {message}")
