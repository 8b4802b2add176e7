-- SQL of the PostgreSQL projector (projections/projector.py).
-- Every statement runs inside the projector's one transaction per batch.

-- checkpoint_init --
-- Create the tracking record of a projector on a shard (nothing applied yet).
INSERT INTO projector_checkpoints (projector, shard, entry_ms, entry_seq)
VALUES (%(projector)s, %(shard)s, 0, 0)
ON CONFLICT (projector, shard) DO NOTHING

-- checkpoint_lock --
-- Read and lock the tracking record: the last stream entry whose effects are committed.
SELECT entry_ms, entry_seq
FROM projector_checkpoints
WHERE projector = %(projector)s AND shard = %(shard)s
FOR UPDATE

-- checkpoint_advance --
-- Move the tracking record forward (never backward) to the batch's last entry.
UPDATE projector_checkpoints
SET entry_ms = %(entry_ms)s, entry_seq = %(entry_seq)s, updated_at = now()
WHERE projector = %(projector)s AND shard = %(shard)s
  AND (entry_ms, entry_seq) < (%(entry_ms)s, %(entry_seq)s)

-- checkpoint_get --
-- The tracking record, for status and verification (no lock).
SELECT entry_ms, entry_seq, updated_at
FROM projector_checkpoints
WHERE projector = %(projector)s AND shard = %(shard)s

-- archived_entries --
-- Which stream entries of a range are already in the archive.
SELECT entry_ms, entry_seq
FROM ledger_events
WHERE shard = %(shard)s
  AND (entry_ms, entry_seq) >= (%(first_ms)s, %(first_seq)s)
  AND (entry_ms, entry_seq) <= (%(last_ms)s, %(last_seq)s)

-- insert_events --
-- Archive a batch of events exactly as published, with their places in the shard's hash chain:
-- %(rows)s is a JSON array of rows keyed by column; data is the JSON object of data_raw, the
-- exact text. An event already archived is left as it is.
INSERT INTO ledger_events (
    event_id, shard, entry_id, entry_ms, entry_seq, type, aggregate_id, version,
    command_id, user_id, data, ts, data_raw, chain_n, chain_hash)
SELECT
    event_id, shard, entry_id, entry_ms, entry_seq, type, aggregate_id, version,
    command_id, user_id, data_raw::jsonb, ts, data_raw, chain_n, chain_hash
FROM json_populate_recordset(NULL::ledger_events, %(rows)s)
ON CONFLICT DO NOTHING

-- insert_fills --
-- A batch of fills (OrderFilled events; %(rows)s a JSON array of rows keyed by column); a fill
-- already stored is left as it is.
INSERT INTO fills (
    order_id, fill_id, event_id, user_id, exchange, symbol, side, position_id,
    quantity, price, fee, fee_currency, overfill, late, ts)
SELECT
    order_id, fill_id, event_id, user_id, exchange, symbol, side, position_id,
    quantity, price, fee, fee_currency, overfill, late, ts
FROM json_populate_recordset(NULL::fills, %(rows)s)
ON CONFLICT DO NOTHING

-- upsert_positions --
-- Closed or liquidated positions (%(rows)s a JSON array of rows keyed by column, one per
-- position), written whole; an older version never overwrites a newer.
-- {columns} and {updates} are put in from the position's one declaration
-- (ledger/domain/mapping.py): every column of the table.
INSERT INTO positions AS p ({columns})
SELECT {columns}
FROM json_populate_recordset(NULL::positions, %(rows)s)
ON CONFLICT (id) DO UPDATE SET
    {updates}
WHERE excluded.version >= p.version

-- upsert_orders --
-- Orders in a final status (%(rows)s a JSON array of rows keyed by column, one per order),
-- written whole; an older version never overwrites a newer.
-- The column lists are put in from the order's one declaration (ledger/domain/mapping.py).
INSERT INTO orders AS o ({columns})
SELECT {columns}
FROM json_populate_recordset(NULL::orders, %(rows)s)
ON CONFLICT (id) DO UPDATE SET
    {updates}
WHERE excluded.version >= o.version

-- order_events --
-- The archived events of some orders, each order's in version order (this transaction's
-- own inserts included); their exact text (data_raw) where it was archived.
SELECT aggregate_id::text AS aggregate_id, type, coalesce(data_raw, data::text) AS data
FROM ledger_events
WHERE aggregate_id = ANY(%(ids)s::uuid[])
ORDER BY aggregate_id, version

-- venue_id_holders --
-- The orders that hold some (exchange, exchange_order_id) pairs.
SELECT o.exchange, o.exchange_order_id, o.id::text AS id
FROM orders AS o
JOIN unnest(%(exchanges)s::text[], %(venue_ids)s::text[]) AS wanted (exchange, venue_id)
  ON o.exchange = wanted.exchange AND o.exchange_order_id = wanted.venue_id

-- insert_gap --
-- An entry whose effects are missing from history (dead-lettered, or an order that could not
-- be rebuilt); recorded once, and filled at once when its order or position is already in
-- history at that version or a later one.
INSERT INTO projector_gaps (
    shard, entry_id, entry_ms, entry_seq, type, event_id, aggregate_id, code, reason, filled_at)
SELECT
    %(shard)s, %(entry_id)s, %(entry_ms)s, %(entry_seq)s, %(type)s, %(event_id)s::uuid,
    %(aggregate_id)s::uuid, %(code)s, %(reason)s,
    CASE WHEN EXISTS (
        SELECT 1 FROM orders WHERE id = %(aggregate_id)s::uuid AND version >= %(version)s::int
        UNION ALL
        SELECT 1 FROM positions WHERE id = %(aggregate_id)s::uuid AND version >= %(version)s::int
    ) THEN now() END
ON CONFLICT DO NOTHING

-- fill_gaps --
-- Orders and positions just written to history: their gaps are filled.
UPDATE projector_gaps
SET filled_at = now()
WHERE aggregate_id = ANY(%(ids)s::uuid[]) AND filled_at IS NULL

-- open_gaps --
-- The gaps not filled yet, per shard (for `ledger status`).
SELECT shard, count(*) AS gaps, (array_agg(entry_id ORDER BY entry_ms, entry_seq))[1] AS first_entry_id
FROM projector_gaps
WHERE filled_at IS NULL
GROUP BY shard
ORDER BY shard
