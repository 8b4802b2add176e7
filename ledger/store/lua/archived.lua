-- The index of archived outcomes (ledger/store/archived.py), prepended to the scripts that read
-- it. Its meta hash (ledger:{s}:outcomes:archived) holds the generation, fields level and split
-- (both 0 when absent); a caller computes the bucket of a fingerprint from the generation it last
-- saw and passes it as a key, and the script checks that generation before using the bucket.

local function archived_generation(meta)
  local g = redis.call('HMGET', meta, 'level', 'split')
  return (g[1] or '0') .. ':' .. (g[2] or '0')
end

-- The index's generation when it is not the one the caller computed its buckets with, else nil.
local function archived_stale(meta, expected)
  local current = archived_generation(meta)
  if current ~= expected then
    return current
  end
  return nil
end

-- The marker of an archived outcome ('~' and the hex digits of its digest), or nil.
local function archived_marker(bucket, fingerprint)
  local digest = redis.call('HGET', bucket, fingerprint)
  if not digest then
    return nil
  end
  return '~' .. (string.gsub(digest, '.', function(c) return string.format('%02x', string.byte(c)) end))
end
