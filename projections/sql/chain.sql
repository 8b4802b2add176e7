-- SQL of the hash chain check over the archive (projections/chain_check.py).

-- chain_page --
-- The archived events of a shard after an entry and up to another, in log order, with their
-- chain fields (keyset pages over the unique index ledger_events_entry_key).
SELECT entry_id, entry_ms, entry_seq, type, data_raw, chain_n, chain_hash
FROM ledger_events
WHERE shard = %(shard)s
  AND (entry_ms, entry_seq) > (%(after_ms)s, %(after_seq)s)
  AND (entry_ms, entry_seq) <= (%(upto_ms)s, %(upto_seq)s)
ORDER BY entry_ms, entry_seq
LIMIT %(limit)s

-- gap_entries --
-- The entries of a shard the projector recorded as missing from the archive (never archived).
SELECT entry_ms, entry_seq
FROM projector_gaps
WHERE shard = %(shard)s
