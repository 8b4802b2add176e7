-- SQL of `ledger rebuild --projection postgres` (projections/rebuild.py). Table and schema names
-- are composed in Python with psycopg.sql.Identifier; these statements only take values.

-- table_schema --
-- The schema that holds a history table as the session resolves its name (NULL: no such table).
SELECT n.nspname
FROM pg_class AS c
JOIN pg_namespace AS n ON n.oid = c.relnamespace
WHERE c.oid = to_regclass(%(table)s)

-- indexes --
-- A table's indexes (constraint indexes included): name and definition.
SELECT c.relname, pg_get_indexdef(i.indexrelid)
FROM pg_index AS i
JOIN pg_class AS c ON c.oid = i.indexrelid
WHERE i.indrelid = %(table)s::regclass
ORDER BY c.relname

-- grants --
-- A table's owner and its explicit privileges (grantee NULL: PUBLIC).
SELECT pg_get_userbyid(c.relowner) AS owner,
       CASE WHEN a.grantee = 0 THEN NULL ELSE pg_get_userbyid(a.grantee) END AS grantee,
       a.privilege_type,
       a.is_grantable
FROM pg_class AS c
LEFT JOIN LATERAL aclexplode(c.relacl) AS a ON true
WHERE c.oid = %(table)s::regclass

-- try_lock --
-- One postgres rebuild at a time (a session-level advisory lock).
SELECT pg_try_advisory_lock(hashtext('ledger rebuild --projection postgres'))

-- unlock --
SELECT pg_advisory_unlock(hashtext('ledger rebuild --projection postgres'))

-- refill_gaps --
-- After the swap: a gap is filled exactly when its order or position is in history (as the
-- projector's fill_gaps and insert_gap decide), open again when it is not.
UPDATE projector_gaps AS g
SET filled_at = CASE
    WHEN EXISTS (
        SELECT 1 FROM orders WHERE id = g.aggregate_id
        UNION ALL
        SELECT 1 FROM positions WHERE id = g.aggregate_id
    ) THEN coalesce(g.filled_at, now())
    END
WHERE g.aggregate_id IS NOT NULL
