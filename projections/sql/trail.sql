-- SQL of the audit trail of one order or position (ledger/audit_trail.py).

-- aggregate_events --
-- Every archived event of one aggregate, in version order (index ledger_events_aggregate_version_key).
SELECT shard, entry_id, type, coalesce(data_raw, data::text) AS data
FROM ledger_events
WHERE aggregate_id = %(aggregate_id)s::uuid
ORDER BY version
