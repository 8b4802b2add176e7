-- Append one command's outcome atomically, on one shard's keys only (Redis Cluster safe).
-- KEYS: 1 events stream, 2 order snapshots, 3 position snapshots, 4 open-position slots,
--       5 per-user tokens, 6 outcomes (dedupe), 7 reply list, 8 chain head,
--       9 duplicates waiting for an archived outcome, 10 age of outcomes without events
-- ARGV: 1 user_id, 2 outcome field, 3 expected token ('' = none yet), 4 new token,
--       5 reply head (JSON up to and including "events":), 6 reply TTL seconds,
--       7 event count, then type/data pairs, then order count and id/json pairs,
--       then position count and id/json pairs, then slot count and field/value pairs
--       (value '' deletes the slot).
-- Returns {'ok'|'duplicate', reply}, {'archived', marker} or {'conflict', current token}.
-- An outcome compacted by projections/compact.py is a marker ('~' and a digest, never JSON,
-- which starts with '{'): the full reply is in PostgreSQL, so the duplicate is recorded in
-- KEYS[9] for the handler's OutcomeReader to answer, and nothing else is written.
-- An outcome without events gets its time (Redis's clock, epoch ms) in KEYS[10]: its age for
-- compaction, which no event entry id gives.
-- Every event is chained (ledger/chain.py): its entry gets fields n (its number in the shard's
-- chain, 1, 2, 3 ...) and hash = sha1hex(previous hash .. '\n' .. n .. '\n' .. type .. '\n' .. data),
-- the first previous hash being the genesis sha1hex(KEYS[1]); KEYS[8] holds the head (id, n, hash).
local function answer(reply)
  redis.call('DEL', KEYS[7])
  redis.call('RPUSH', KEYS[7], reply)
  redis.call('EXPIRE', KEYS[7], ARGV[6])
end

local earlier = redis.call('HGET', KEYS[6], ARGV[2])
if earlier then
  if string.sub(earlier, 1, 1) == '~' then
    redis.call('HSET', KEYS[9], ARGV[2], earlier)
    return {'archived', earlier}
  end
  answer(earlier)
  return {'duplicate', earlier}
end
local token = redis.call('HGET', KEYS[5], ARGV[1]) or ''
if token ~= ARGV[3] then
  return {'conflict', token}
end

local i = 7
local refs = {}
if tonumber(ARGV[i]) > 0 then
  local head = redis.call('HMGET', KEYS[8], 'n', 'hash')
  local n = tonumber(head[1] or '0')
  local hash = head[2] or redis.sha1hex(KEYS[1])
  local id
  for _ = 1, tonumber(ARGV[i]) do
    n = n + 1
    local number = string.format('%d', n)
    hash = redis.sha1hex(hash .. '\n' .. number .. '\n' .. ARGV[i + 1] .. '\n' .. ARGV[i + 2])
    id = redis.call('XADD', KEYS[1], '*', 'type', ARGV[i + 1], 'data', ARGV[i + 2], 'n', number, 'hash', hash)
    refs[#refs + 1] = '{"type":"' .. ARGV[i + 1] .. '","id":"' .. id .. '"}'
    i = i + 2
  end
  redis.call('HSET', KEYS[8], 'id', id, 'n', string.format('%d', n), 'hash', hash)
end
for key = 2, 3 do
  i = i + 1
  for _ = 1, tonumber(ARGV[i]) do
    redis.call('HSET', KEYS[key], ARGV[i + 1], ARGV[i + 2])
    i = i + 2
  end
end
i = i + 1
for _ = 1, tonumber(ARGV[i]) do
  if ARGV[i + 2] == '' then
    redis.call('HDEL', KEYS[4], ARGV[i + 1])
  else
    redis.call('HSET', KEYS[4], ARGV[i + 1], ARGV[i + 2])
  end
  i = i + 2
end
redis.call('HSET', KEYS[5], ARGV[1], ARGV[4])
local reply = ARGV[5] .. '[' .. table.concat(refs, ',') .. ']}'
redis.call('HSET', KEYS[6], ARGV[2], reply)
if #refs == 0 then
  local now = redis.call('TIME')
  redis.call('ZADD', KEYS[10], now[1] * 1000 + math.floor(now[2] / 1000), ARGV[2])
end
answer(reply)
return {'ok', reply}
