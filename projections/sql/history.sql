-- SQL of the history reads (projections/history.py). Optional filters are NULL when absent.

-- closed_positions --
-- A user's closed and liquidated positions, most recently closed first.
SELECT id::text AS id, user_id, exchange, symbol, side, size, entry_price, exit_price,
       leverage, realized_pnl, gross_pnl, unrealized_pnl, fees, status, close_reason, version,
       metadata, created_at, updated_at, closed_at
FROM positions
WHERE user_id = %(user_id)s
  AND status IN ('closed', 'liquidated')
  AND (%(exchange)s::text IS NULL OR exchange = %(exchange)s::text)
  AND (%(symbol)s::text IS NULL OR symbol = %(symbol)s::text)
ORDER BY closed_at DESC NULLS LAST, id
LIMIT %(limit)s

-- final_orders --
-- A user's orders in a final status (filled, cancelled, rejected, expired), latest first.
SELECT id::text AS id, user_id, exchange, symbol, side, order_type, quantity, price,
       trigger_price, filled_qty, avg_fill_price, status, exchange_order_id, client_order_id,
       position_id::text AS position_id, position_side, reduce_only, grid_level, reject_reason,
       version, metadata, created_at, updated_at
FROM orders
WHERE user_id = %(user_id)s
  AND status IN ('filled', 'cancelled', 'rejected', 'expired')
  AND (%(exchange)s::text IS NULL OR exchange = %(exchange)s::text)
  AND (%(status)s::text IS NULL OR status = %(status)s::text)
ORDER BY updated_at DESC, id
LIMIT %(limit)s
