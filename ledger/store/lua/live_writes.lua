-- The writes of the legacy live keys (CONTRACT section 6), shared by the live projection's step
-- (projections/live.py) and the append step (append.lua), which makes a batch's live writes
-- itself while the projection is caught up. ``live_writes(writes, stamp)`` applies a list of
--   {'fenced', key, fence, stamp, fence field, op, operands...}: ``op`` on a live key, only if
--     the event is newer than the last one written there (its fence field: '' for the whole
--     key, else the set member or hash field written);
--   {'order', key, order id, version, expire-at epoch ms or '', field/value pairs...}: an order
--     hash (``orders:{id}``, or the GRID level hash the order holds), written only over version
--     n-1 of the same order (0: no order there);
--   {'later', key, score, member}: ZADD NX;
-- where key and fence are indexes into KEYS, and ``stamp(s)`` gives the entry id a write's
-- stamp names (the projection's stamps are entry ids; the append step's, the number of the
-- event among its command's events, the id being made by the same call).

local function after(a, b)
  local am, as = string.match(a, '^(%d+)-(%d+)$')
  local bm, bs = string.match(b, '^(%d+)-(%d+)$')
  am, as, bm, bs = tonumber(am), tonumber(as), tonumber(bm), tonumber(bs)
  return am > bm or (am == bm and as > bs)
end

-- ``write(key, op, member, args, first)`` applies ``op`` to ``key``; ``member`` is the set
-- member or hash field, ``args[first..]`` the operands (field/value pairs of 'put', the members
-- of 'sput', the value of 'hset'). The one writer of a live key (``ledger verify --repair`` too).
local function write(key, op, member, args, first)
  if op == 'put' then
    redis.call('DEL', key)
    redis.call('HSET', key, unpack(args, first))
  elseif op == 'del' then
    redis.call('DEL', key)
  elseif op == 'sput' then
    redis.call('DEL', key)
    for i = first, #args, 1000 do  -- unpack stops at about 8,000 values
      redis.call('SADD', key, unpack(args, i, math.min(i + 999, #args)))
    end
  elseif op == 'sadd' then
    redis.call('SADD', key, member)
  elseif op == 'srem' then
    redis.call('SREM', key, member)
  elseif op == 'hset' then
    redis.call('HSET', key, member, args[first])
  else
    redis.call('HDEL', key, member)
  end
end

local function fenced(key, fence, stamp, member, op, args, first)
  local last = redis.call('HGET', fence, member)
  if last and not after(stamp, last) then
    return
  end
  redis.call('HSET', fence, member, stamp)
  write(key, op, member, args, first)
end

local function order(key, id, version, expire, args, first)
  local stored = redis.call('HMGET', key, 'id', 'version')
  local previous = 0
  if stored[1] then
    if stored[1] ~= id then
      return
    end
    previous = tonumber(stored[2]) or 0
  end
  if previous ~= tonumber(version) - 1 then
    return
  end
  redis.call('HSET', key, unpack(args, first))
  if expire ~= '' then
    redis.call('PEXPIREAT', key, expire)
  end
end

local function live_writes(writes, stamp)
  for _, w in ipairs(writes) do
    if w[1] == 'fenced' then
      fenced(KEYS[w[2]], KEYS[w[3]], stamp(w[4]), w[5], w[6], w, 7)
    elseif w[1] == 'order' then
      order(KEYS[w[2]], w[3], w[4], w[5], w, 6)
    else
      redis.call('ZADD', KEYS[w[2]], 'NX', w[3], w[4])
    end
  end
end
