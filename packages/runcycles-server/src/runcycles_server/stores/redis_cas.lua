#!lua
-- The one script behind every read snapshot and every mutation of the Redis store.
--
-- It never does arithmetic on amounts: the Python side computes every new row with
-- runcycles_server.ledger (exact integers) and this script only checks that the rows it read
-- are unchanged (compare-and-set on a per-row version) and then writes the new rows.
--
-- KEYS[1..n]    rows the caller read: Redis hashes carrying a "_v" version field
-- KEYS[n+1..]   further keys the writes touch (new rows, index sorted sets)
-- ARGV[1]       n
-- ARGV[2..n+1]  the "_v" the caller saw for KEYS[1..n] ("0" = the row did not exist);
--               "?" as ARGV[2] forces a pure read
-- ARGV[n+2]     (optional) the writes, as one JSON array (one argument instead of hundreds
--               keeps client-side packing cheap); each write is an array whose first two
--               items are an opcode and a key index into KEYS:
--                 ["H", k, [f1, v1, ..., fc, vc]]   HSET the fields, then HINCRBY _v 1
--                 ["X", k, "ms"]                    PEXPIRE k ms
--                 ["Z", k, "score", "member"]       ZADD
--                 ["R", k, "member"]                ZREM
--               Field values are strings (row JSON is carried as an opaque string: cjson
--               never sees, let alone rounds, an amount).
--
-- Returns {1} once every write is applied, or, when any version differs (or on "?"),
-- {0, time_s, time_us, HGETALL KEYS[1], ..., HGETALL KEYS[n]} and writes nothing.
-- All keys carry the same hash tag, so the script is Redis Cluster compatible.
--
-- The shebang line (Redis >= 7) declares a script that may write and is *not* allow-oom, so
-- Redis refuses the whole call up front when it is out of memory instead of failing halfway
-- through the writes (Redis never rolls a script back).

local n = tonumber(ARGV[1])

local function snapshot()
  local t = redis.call('TIME')
  local out = {0, t[1], t[2]}
  for i = 1, n do
    out[#out + 1] = redis.call('HGETALL', KEYS[i])
  end
  return out
end

if ARGV[2] == '?' then
  return snapshot()
end
for i = 1, n do
  local seen = redis.call('HGET', KEYS[i], '_v') or '0'
  if seen ~= ARGV[i + 1] then
    return snapshot()
  end
end

-- Validate every write before applying any, so a malformed call changes nothing.
local writes = {}
if ARGV[n + 2] ~= nil then
  writes = cjson.decode(ARGV[n + 2])
end
for i, w in ipairs(writes) do
  local op = w[1]
  if KEYS[w[2]] == nil then
    return redis.error_reply('redis_cas: write ' .. i .. ' has a bad key index')
  end
  if op == 'H' then
    if type(w[3]) ~= 'table' or #w[3] == 0 or #w[3] % 2 ~= 0 then
      return redis.error_reply('redis_cas: write ' .. i .. ' has bad fields')
    end
  elseif op == 'Z' then
    if tonumber(w[3]) == nil or type(w[4]) ~= 'string' then
      return redis.error_reply('redis_cas: write ' .. i .. ' has a bad score or member')
    end
  elseif op == 'X' then
    if tonumber(w[3]) == nil then
      return redis.error_reply('redis_cas: write ' .. i .. ' has a bad ttl')
    end
  elseif op ~= 'R' then
    return redis.error_reply('redis_cas: unknown opcode ' .. tostring(op))
  end
end

for _, w in ipairs(writes) do
  local op, key = w[1], KEYS[w[2]]
  if op == 'H' then
    redis.call('HSET', key, unpack(w[3]))
    redis.call('HINCRBY', key, '_v', 1)
  elseif op == 'X' then
    redis.call('PEXPIRE', key, w[3])
  elseif op == 'Z' then
    redis.call('ZADD', key, w[3], w[4])
  else
    redis.call('ZREM', key, w[3])
  end
end
return {1}
