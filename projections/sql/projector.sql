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

-- insert_event --
-- Archive one event exactly as published (data is its JSON object, data_raw its exact text),
-- with its place in the shard's hash chain.
INSERT INTO ledger_events (
    event_id, shard, entry_id, entry_ms, entry_seq, type, aggregate_id, version,
    command_id, user_id, data, ts, data_raw, chain_n, chain_hash)
VALUES (
    %(event_id)s, %(shard)s, %(entry_id)s, %(entry_ms)s, %(entry_seq)s, %(type)s,
    %(aggregate_id)s, %(version)s, %(command_id)s, %(user_id)s, %(data)s::jsonb, %(ts)s,
    %(data_raw)s, %(chain_n)s, %(chain_hash)s)
ON CONFLICT DO NOTHING

-- insert_fill --
-- One fill (an OrderFilled event); a fill already stored is left as it is.
INSERT INTO fills (
    order_id, fill_id, event_id, user_id, exchange, symbol, side, position_id,
    quantity, price, fee, fee_currency, overfill, late, ts)
VALUES (
    %(order_id)s, %(fill_id)s, %(event_id)s, %(user_id)s, %(exchange)s, %(symbol)s, %(side)s,
    %(position_id)s, %(quantity)s, %(price)s, %(fee)s, %(fee_currency)s, %(overfill)s,
    %(late)s, %(ts)s)
ON CONFLICT DO NOTHING

-- upsert_position --
-- A closed or liquidated position, written whole; an older version never overwrites a newer.
-- {columns}, {values} and {updates} are put in from the position's one declaration
-- (ledger/mapping.py): every column of the table.
INSERT INTO positions AS p ({columns})
VALUES ({values})
ON CONFLICT (id) DO UPDATE SET
    {updates}
WHERE excluded.version >= p.version

-- upsert_order --
-- An order in a final status, written whole; an older version never overwrites a newer.
-- The column lists are put in from the order's one declaration (ledger/mapping.py).
INSERT INTO orders AS o ({columns})
VALUES ({values})
ON CONFLICT (id) DO UPDATE SET
    {updates}
WHERE excluded.version >= o.version

-- order_events --
-- The archived events of some orders, each order's in version order (this transaction's
-- own inserts included).
SELECT aggregate_id::text AS aggregate_id, type, data::text AS data
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
