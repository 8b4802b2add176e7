-- SQL of reconciliation (ledger/client/reconcile.py).

-- fill_fees --
-- The fee the ledger recorded for each (order, fill) asked: the fills the projector wrote, the
-- record of a fill whose event the Redis log no longer holds. The pairs come as two arrays.
SELECT f.order_id::text AS order_id, f.fill_id, f.fee, f.fee_currency
FROM fills f
JOIN unnest(%(orders)s::uuid[], %(fills)s::text[]) AS asked (order_id, fill_id)
  ON f.order_id = asked.order_id AND f.fill_id = asked.fill_id
