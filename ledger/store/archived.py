"""The index of archived outcomes: what Redis keeps, per shard, of a command whose outcome
compaction moved to PostgreSQL (``projections.compact``), so that a duplicate of it, however
late, is recognised without asking PostgreSQL about every new command (CONTRACT §3).

Per outcome it keeps a **fingerprint** of its field (the first 16 bytes of the SHA-1 of
``user_id:command_id``: no two of the 10^9 outcomes of a shard collide while the odds stay
below 10^-20) and the **digest** of its reply (the first 10 bytes of the reply's SHA-1, which
the reply read back from PostgreSQL must match: ``eventstore.outcome_marker``). About 30 bytes
an outcome, against about 97 for a marker in the outcomes hash, where the field itself took
most of it.

The pairs live in small hashes, the **buckets** ``ledger:{s}:outcomes:archived:<n>``, which
Redis keeps in its compact listpack encoding while they hold at most 128 fields (its default
``hash-max-listpack-entries``). The number of buckets grows with the index by **linear
hashing**: the meta hash ``ledger:{s}:outcomes:archived`` holds the generation (``level`` L,
``split`` S) and ``count``; a fingerprint whose first four bytes read as the integer h is in
bucket h mod 2^L, or h mod 2^(L+1) when that is below S. Once ``count`` exceeds ``LOAD`` times
the buckets, bucket S is split (its fields with h mod 2^(L+1) = S + 2^L move to that new
bucket) and S moves on; when S reaches 2^L, L grows by one and S starts again at 0. A bucket
not yet split in a round holds between one and two times ``LOAD`` fields on average, so
``LOAD = 40`` keeps every bucket well under 128.

Every key is on the shard's hash tag and declared to the scripts (Redis Cluster): a caller
computes the bucket from the generation it last read and passes it with that generation; a
script that finds another generation writes nothing and answers ``stale`` with the current one,
and the caller retries with it. Only compaction inserts and splits, so a handler's generation
goes stale once per compaction pass at most.
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from importlib import resources
from typing import Any

from ledger.store.redis_conn import text

FINGERPRINT_BYTES = 16
DIGEST_BYTES = 10
LOAD = 40
# How many buckets one script call splits at most (its keys: two per split).
SPLITS_PER_CALL = 64
# How many times an operation retries with a newer generation before it gives up (each retry
# follows a compaction pass that split buckets in between: more than a few in a row means the
# index is being split faster than it can be read, which no pass does).
STALE_RETRIES = 20

ARCHIVED_LUA = resources.files("ledger.store").joinpath("lua/archived.lua").read_text()

# KEYS[1] meta, then pairs: bucket S + i, bucket S + i + 2^L. ARGV[1] the generation read.
# Splits the buckets S .. S + #pairs - 1 of level L (all of one round: S + #pairs <= 2^L).
_SPLIT_LUA = (
    ARCHIVED_LUA
    + """
local stale = archived_stale(KEYS[1], ARGV[1])
if stale then
  return {'stale', stale}
end
local level = tonumber(redis.call('HGET', KEYS[1], 'level') or '0')
local split = tonumber(redis.call('HGET', KEYS[1], 'split') or '0')
local round = 2 ^ level
local modulus = round * 2
for k = 2, #KEYS, 2 do
  local fields = redis.call('HGETALL', KEYS[k])
  for i = 1, #fields, 2 do
    local a, b, c, d = string.byte(fields[i], 1, 4)
    if (((a * 256 + b) * 256 + c) * 256 + d) % modulus ~= split then
      redis.call('HSET', KEYS[k + 1], fields[i], fields[i + 1])
      redis.call('HDEL', KEYS[k], fields[i])
    end
  end
  split = split + 1
end
if split == round then
  level = level + 1
  split = 0
end
redis.call('HSET', KEYS[1], 'level', string.format('%d', level), 'split', string.format('%d', split))
return {'ok', string.format('%d:%d', level, split)}
"""
)


def fingerprint(field: str) -> bytes:
    """The fingerprint of an outcome field (``user_id:command_id``)."""
    return hashlib.sha1(field.encode(), usedforsecurity=False).digest()[:FINGERPRINT_BYTES]


def digest(reply: bytes) -> bytes:
    """The digest of a reply: the bytes whose hex digits follow ``~`` in its marker."""
    return hashlib.sha1(reply, usedforsecurity=False).digest()[:DIGEST_BYTES]


@dataclass(frozen=True, slots=True)
class Generation:
    level: int = 0
    split: int = 0

    @classmethod
    def of(cls, level: Any, split: Any) -> Generation:
        """From the meta hash's ``level`` and ``split`` as read (None when absent: 0)."""
        return cls(int(level or 0), int(split or 0))

    @classmethod
    def parse(cls, value: Any) -> Generation:
        level, _sep, split = (text(value) or "0:0").partition(":")
        return cls(int(level), int(split))

    def __str__(self) -> str:
        return f"{self.level}:{self.split}"

    @property
    def buckets(self) -> int:
        return (1 << self.level) + self.split

    def bucket(self, fp: bytes) -> int:
        h = int.from_bytes(fp[:4], "big")
        n = h % (1 << self.level)
        return h % (1 << (self.level + 1)) if n < self.split else n


class ArchivedIndex:
    """One shard's index (``meta`` is ``ShardKeys.archived``), with the generation this client
    last read; ``bucket`` gives the key of a fingerprint's bucket in that generation."""

    def __init__(self, meta: str) -> None:
        self.meta = meta
        self.generation = Generation()

    def bucket(self, fp: bytes) -> str:
        return f"{self.meta}:{self.generation.bucket(fp)}"

    def bucket_at(self, n: int) -> str:
        return f"{self.meta}:{n}"

    def saw(self, value: Any) -> None:
        """Take the generation a script answered ``stale`` with."""
        self.generation = Generation.parse(value)

    async def read(self, redis: Any) -> int:
        """Read the generation; return ``count``."""
        level, split, count = await redis.hmget(self.meta, ["level", "split", "count"])
        self.generation = Generation.of(level, split)
        return int(count or 0)

    async def current(self, call: Callable[[], Awaitable[Any]], stale: Callable[[Any], Any | None]) -> Any:
        """The result of ``call`` (a script given this client's generation) once it was not
        stale: ``stale(result)`` is the index's generation when the script found another."""
        for _attempt in range(STALE_RETRIES):
            result = await call()
            newer = stale(result)
            if newer is None:
                return result
            self.saw(newer)
        raise RuntimeError(
            f"{self.meta}: its generation changed {STALE_RETRIES} times in a row while it was used; "
            "another process is splitting it: run one retention pass at a time"
        )

    async def grow(self, redis: Any, extra: int = 0, load: int = LOAD) -> int:
        """Split buckets until the index, with ``extra`` fields more, holds at most ``load``
        fields per bucket on average; return how many were split. Compaction grows the index
        before it inserts, so that no bucket ever passes Redis's listpack limit (a hash that
        passes it is converted for good)."""
        count = await self.read(redis)
        done = 0
        while count + extra > load * self.generation.buckets:
            g = self.generation
            wanted = -(-(count + extra - load * g.buckets) // load)
            pairs = min(wanted, (1 << g.level) - g.split, SPLITS_PER_CALL)
            keys = [self.meta]
            for n in range(g.split, g.split + pairs):
                keys += [self.bucket_at(n), self.bucket_at(n + (1 << g.level))]
            status, value = await redis.eval(_SPLIT_LUA, len(keys), *keys, str(g))
            if text(status) == "stale":
                count = await self.read(redis)
                continue
            self.saw(value)
            done += pairs
        return done
