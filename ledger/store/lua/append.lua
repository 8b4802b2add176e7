-- Append the outcomes of a batch of commands, each atomically and in order, on one shard's keys
-- only (Redis Cluster safe: every key, the reply lists too, is declared and on the shard's tag).
-- KEYS: 1 events stream, 2 order snapshots, 3 position snapshots, 4 open-position slots,
--       5 per-user tokens, 6 outcomes (dedupe), 7 chain head,
--       8 duplicates waiting for an archived outcome, 9 age of outcomes without events,
--       10 the archived outcomes' index (its meta hash, ledger/store/archived.py),
--       11 final orders, 12 final positions (what compaction has still to look at),
--       then 12 + i: the reply list of command i, and 12 + n + i: the index bucket of its
--       outcome field (n commands).
-- ARGV: 1 the batch, msgpack (ledger/store/eventstore.py packs it): an array with, per command,
--       {user_id, outcome field, expected token ('' = none yet), new token,
--        reply head (JSON up to and including "events":), {type, data, ...} of its events,
--        {id, json, final, ...} of its orders, {id, json, final, ...} of its positions (final:
--        the snapshot's updated_at when it is final or closed, else ''),
--        {field, value, ...} of its slots (value '' deletes the slot)};
--       2 reply TTL seconds; 3 the index generation the buckets were computed with; 4 the
--       fingerprints of the outcome fields, 16 bytes each, in command order.
--       ARGV[5], when given: the live projection's writes of each command's events, msgpack, as
--       live_writes.lua reads them with stamps numbering the events of their command (1, 2 ...),
--       or false where the step cannot make them (a GRID order's level holder is the
--       projection's to read); ARGV[6] how the names of the projection's consumers begin, ARGV[7]
--       how many entries its progress stream keeps, ARGV[8] its consumer group. KEYS[12 + 2n +
--       1..3] are then the projection's checkpoint, lease and progress stream, and the live keys
--       follow.
-- Returns, per command in order, {'ok'|'duplicate', reply}, {'archived', marker} or
-- {'conflict', current token}. A conflict writes nothing for that command; the user's later
-- commands in the batch expected its new token, so they conflict too. When the index's
-- generation is not ARGV[3], nothing is written and the answer is {{'stale', generation}}.
-- An outcome compacted by projections/compact.py is in the index (or, compacted before it, a
-- marker in KEYS[6]: '~' and a digest, never JSON, which starts with '{'): the full reply is in
-- PostgreSQL, so the duplicate is recorded in KEYS[8] with its marker for the handler's
-- OutcomeReader to answer, and nothing else is written.
-- An outcome without events gets its time (Redis's clock, epoch ms) in KEYS[9]: its age for
-- compaction, which no event entry id gives.
-- Every event is chained (ledger/store/chain.py): its entry gets fields n (its number in the
-- shard's chain, 1, 2, 3 ...) and hash = sha1hex(previous hash .. '\n' .. n .. '\n' .. type ..
-- '\n' .. data), the first previous hash being the genesis sha1hex(KEYS[1]); KEYS[7] holds the
-- head (id, n, hash), moved by each command's events (read once per batch).
-- The live projection's writes (ARGV[5]) are made here while the projection's lease names one of
-- its consumers (not a tool that paused it) and its checkpoint is the head (it applied every
-- entry): each command's events get their live writes with them, the checkpoint moves to the
-- last one and the progress stream tells it, as the projection's own step would, and the
-- projection's group moves past them (its last-delivered id), so that its consumer, blocked in
-- XREADGROUP, is not woken for entries applied already (``pcall``: a group deleted meanwhile only
-- means its next read finds them applied). From a command whose writes are false on, the
-- checkpoint stays behind and the projection applies the rest. Only on a plain Redis: the live
-- keys have no hash tag.
local batch = cmsgpack.unpack(ARGV[1])
local ttl = ARGV[2]
local head_n, head_hash
local now
local projection = 12 + 2 * #batch
local live, projecting, projected = nil, false, nil

local function answer(key, reply)
  redis.call('DEL', key)
  redis.call('RPUSH', key, reply)
  redis.call('EXPIRE', key, ttl)
end

local function write_snapshots(key, final_key, triples)
  for j = 1, #triples, 3 do
    redis.call('HSET', key, triples[j], triples[j + 1])
    if triples[j + 2] ~= '' then
      redis.call('ZADD', final_key, triples[j + 2], triples[j])
    end
  end
end

local function project(writes, ids)
  if writes == false then
    projecting = false
    return
  end
  live_writes(writes, function(stamp) return ids[tonumber(stamp)] end)
  projected = ids[#ids]
end

local function apply(c, reply_key, bucket, fingerprint, writes)
  local user, field, expected, new_token, reply_head = c[1], c[2], c[3], c[4], c[5]
  local events, orders, positions, slots = c[6], c[7], c[8], c[9]
  local earlier = redis.call('HGET', KEYS[6], field)
  if earlier and string.sub(earlier, 1, 1) ~= '~' then
    answer(reply_key, earlier)
    return {'duplicate', earlier}
  end
  local marker = earlier or archived_marker(bucket, fingerprint)
  if marker then
    redis.call('HSET', KEYS[8], field, marker)
    return {'archived', marker}
  end
  local token = redis.call('HGET', KEYS[5], user) or ''
  if token ~= expected then
    return {'conflict', token}
  end
  local refs, ids, id = {}, {}, nil
  if #events > 0 and not head_n then
    local head = redis.call('HMGET', KEYS[7], 'n', 'hash')
    head_n = tonumber(head[1] or '0')
    head_hash = head[2] or redis.sha1hex(KEYS[1])
  end
  for j = 1, #events, 2 do
    local event_type, data = events[j], events[j + 1]
    head_n = head_n + 1
    local number = string.format('%d', head_n)
    head_hash = redis.sha1hex(head_hash .. '\n' .. number .. '\n' .. event_type .. '\n' .. data)
    id = redis.call('XADD', KEYS[1], '*', 'type', event_type, 'data', data, 'n', number, 'hash', head_hash)
    refs[#refs + 1] = '{"type":"' .. event_type .. '","id":"' .. id .. '"}'
    ids[#ids + 1] = id
  end
  if #refs > 0 then
    redis.call('HSET', KEYS[7], 'id', id, 'n', string.format('%d', head_n), 'hash', head_hash)
    if projecting then
      project(writes, ids)
    end
  end
  write_snapshots(KEYS[2], KEYS[11], orders)
  write_snapshots(KEYS[3], KEYS[12], positions)
  for j = 1, #slots, 2 do
    if slots[j + 1] == '' then
      redis.call('HDEL', KEYS[4], slots[j])
    else
      redis.call('HSET', KEYS[4], slots[j], slots[j + 1])
    end
  end
  redis.call('HSET', KEYS[5], user, new_token)
  local reply = reply_head .. '[' .. table.concat(refs, ',') .. ']}'
  redis.call('HSET', KEYS[6], field, reply)
  if #refs == 0 then
    if not now then
      local time = redis.call('TIME')
      now = time[1] * 1000 + math.floor(time[2] / 1000)
    end
    redis.call('ZADD', KEYS[9], now, field)
  end
  answer(reply_key, reply)
  return {'ok', reply}
end

local stale = archived_stale(KEYS[10], ARGV[3])
if stale then
  return {{'stale', stale}}
end
if ARGV[5] then
  local holder = redis.call('GET', KEYS[projection + 2])
  local checkpoint = redis.call('GET', KEYS[projection + 1])
  projecting = holder ~= false and string.sub(holder, 1, #ARGV[6]) == ARGV[6]
    and checkpoint ~= false and checkpoint == redis.call('HGET', KEYS[7], 'id')
  live = projecting and cmsgpack.unpack(ARGV[5])
end
local results = {}
for i, c in ipairs(batch) do
  local writes = live and live[i]
  results[i] = apply(c, KEYS[12 + i], KEYS[12 + #batch + i], string.sub(ARGV[4], 16 * i - 15, 16 * i), writes)
end
if projected then
  redis.call('SET', KEYS[projection + 1], projected)
  redis.pcall('XADD', KEYS[projection + 3], 'MAXLEN', '~', ARGV[7], projected, 'applied', projected)
  redis.pcall('XGROUP', 'SETID', KEYS[1], ARGV[8], projected)
end
return results
