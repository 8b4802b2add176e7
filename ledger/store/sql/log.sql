-- SQL of the reader over both tiers of a shard's event log (ledger/store/log.py).

-- archived_page --
-- The archived events of a shard after an entry and up to another, in log order (keyset pages
-- over the unique index ledger_events_entry_key); the exact text as published where the archive
-- holds it (data_raw), else the JSONB rewritten as text.
SELECT entry_id, entry_ms, entry_seq, type, coalesce(data_raw, data::text) AS data
FROM ledger_events
WHERE shard = %(shard)s
  AND (entry_ms, entry_seq) > (%(after_ms)s, %(after_seq)s)
  AND (entry_ms, entry_seq) <= (%(upto_ms)s, %(upto_seq)s)
ORDER BY entry_ms, entry_seq
LIMIT %(limit)s

-- archived_count --
-- How many entries of a shard up to an entry the archive holds.
SELECT count(*)
FROM ledger_events
WHERE shard = %(shard)s
  AND (entry_ms, entry_seq) <= (%(upto_ms)s, %(upto_seq)s)

-- archived_among --
-- How many of the given entries of a shard the archive holds.
SELECT count(*)
FROM ledger_events
JOIN unnest(%(ms)s::bigint[], %(seq)s::bigint[]) AS held (entry_ms, entry_seq) USING (entry_ms, entry_seq)
WHERE shard = %(shard)s

-- aggregate_events --
-- The archived events of some aggregates, each aggregate's in version order: folded by
-- read_aggregates (the command handler reads back archived orders and positions with it).
SELECT aggregate_id::text, type, coalesce(data_raw, data::text)
  FROM ledger_events
 WHERE aggregate_id = ANY(%(ids)s::uuid[])
 ORDER BY aggregate_id, version
