-- Compaction of what Redis keeps per command (projections/compact.py) and the command handler's
-- reads of compacted outcomes (consumers/command_handler.py OutcomeReader).

-- outcome_insert --
-- The first replies of some commands (%(rows)s a JSON array of rows keyed by column), byte for
-- byte; a row already there is the same reply (an outcome never changes), left as it is. One
-- statement for the page: psycopg's per-row parameters cost the retention role about 20 us of
-- Python an outcome, the JSON array about 3.
INSERT INTO ledger_outcomes (shard, user_id, command_id, reply)
SELECT shard, user_id, command_id, reply
FROM json_populate_recordset(NULL::ledger_outcomes, %(rows)s)
ON CONFLICT (shard, user_id, command_id) DO NOTHING

-- outcome_get --
-- The replies of some commands of a shard.
SELECT o.user_id, o.command_id, o.reply
  FROM ledger_outcomes o
  JOIN unnest(%(users)s::text[], %(commands)s::text[]) AS w(user_id, command_id)
    ON o.user_id = w.user_id AND o.command_id = w.command_id
 WHERE o.shard = %(shard)s

-- archived_versions --
-- Per aggregate, how many of its events the archive holds, its last version, and the log entry
-- of that last event: all of them are archived when both equal the version of its snapshot.
SELECT aggregate_id::text, count(*), max(version),
       (array_agg(entry_ms ORDER BY version DESC))[1], (array_agg(entry_seq ORDER BY version DESC))[1]
  FROM ledger_events
 WHERE aggregate_id = ANY(%(ids)s::uuid[])
 GROUP BY aggregate_id

-- archived_commands --
-- The events a stretch of one shard's log holds in the archive, in log order, a page at a time:
-- the entries after (after_ms, after_seq) up to (upto_ms, upto_seq), each with the command that
-- appended it (the ledger_events_entry_key index reads the stretch).
SELECT entry_ms, entry_seq, user_id, command_id
  FROM ledger_events
 WHERE shard = %(shard)s
   AND (entry_ms, entry_seq) > (%(after_ms)s, %(after_seq)s)
   AND (entry_ms, entry_seq) <= (%(upto_ms)s, %(upto_seq)s)
   AND command_id IS NOT NULL
 ORDER BY entry_ms, entry_seq
 LIMIT %(page)s
