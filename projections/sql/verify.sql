-- SQL of `ledger verify` (projections/verify.py): the PostgreSQL history as it stands, read in
-- one REPEATABLE READ transaction with the projector's checkpoints, so rows and checkpoints agree.

-- positions --
SELECT * FROM positions

-- orders --
SELECT * FROM orders

-- fills --
SELECT * FROM fills

-- archive --
-- The archived events of some shards (data as JSON text, decoded by the verifier).
SELECT event_id, shard, entry_id, entry_ms, entry_seq, type, aggregate_id, version, command_id,
       user_id, data::text AS data, ts
FROM ledger_events
WHERE shard = ANY(%(shards)s::int[])
