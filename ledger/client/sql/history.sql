-- SQL of the history reads (projections/history.py). Optional filters are NULL when absent.
-- {select} is the table's column list, put in from its one declaration (ledger/mapping.py).

-- closed_positions --
-- A user's closed and liquidated positions, most recently closed first.
SELECT {select}
FROM positions
WHERE user_id = %(user_id)s
  AND status IN ('closed', 'liquidated')
  AND (%(exchange)s::text IS NULL OR exchange = %(exchange)s::text)
  AND (%(symbol)s::text IS NULL OR symbol = %(symbol)s::text)
ORDER BY closed_at DESC NULLS LAST, id
LIMIT %(limit)s

-- final_orders --
-- A user's orders in a final status (filled, cancelled, rejected, expired), latest first.
SELECT {select}
FROM orders
WHERE user_id = %(user_id)s
  AND status IN ('filled', 'cancelled', 'rejected', 'expired')
  AND (%(exchange)s::text IS NULL OR exchange = %(exchange)s::text)
  AND (%(status)s::text IS NULL OR status = %(status)s::text)
ORDER BY updated_at DESC, id
LIMIT %(limit)s
