#!lua
-- The one script behind every read snapshot and every mutation of the Redis store.
--
-- It never does arithmetic on amounts: the Python side computes every new row with
-- runcycles_server.ledger (exact integers) and this script only checks that the rows it read
-- are unchanged (compare-and-set on a per-row version) and then writes the new rows.
--
-- KEYS[1..n]    rows the caller read: Redis hashes carrying a "_v" version field
-- KEYS[n+1]     the tenant's fairness lease (a string key; see below)
-- KEYS[n+2..]   further keys the writes touch (new rows, index sorted sets)
-- ARGV[1]       n
-- ARGV[2..n+1]  the "_v" the caller saw for KEYS[1..n] ("0" = the row did not exist);
--               "?" as ARGV[2] makes the call a pure read (only KEYS[1..n] are passed)
-- ARGV[n+2]     the caller's token (one per store instance)
-- ARGV[n+3]     the lease time in ms to claim if this write loses ("0": do not claim)
-- ARGV[n+4]     the writes, as one JSON array (one argument instead of hundreds keeps
--               client-side packing cheap); each write is an array whose first two items
--               are an opcode and a key index into KEYS:
--                 ["H", k, [f1, v1, ..., fc, vc]]   HSET the fields, then HINCRBY _v 1
--                 ["X", k, "ms"]                    PEXPIRE k ms
--                 ["Z", k, "score", "member"]       ZADD
--                 ["R", k, "member"]                ZREM
--               Field values are strings (row JSON is carried as an opaque string: cjson
--               never sees, let alone rounds, an amount).
--
-- Returns {1} once every write is applied. Otherwise nothing is written and it returns
-- {code, time_s, time_us, HGETALL KEYS[1], ..., HGETALL KEYS[n]}: code 0 when a version
-- differs (or on "?"), code 2 when another caller holds the lease.
--
-- Fairness lease: a caller whose compare-and-set fails may claim the lease (if free) for a
-- few milliseconds, during which every *other* caller's write is refused with code 2. So the
-- loser of a race is guaranteed the next turn (its re-planned write cannot lose again), and
-- a process can never be starved by a faster one. A crashed holder only delays others until
-- the lease expires; the winner's successful write releases it.
--
-- All keys carry the same hash tag, so the script is Redis Cluster compatible. The shebang
-- line (Redis >= 7) declares a script that may write and is *not* allow-oom, so Redis refuses
-- the whole call up front when it is out of memory instead of failing halfway through the
-- writes (Redis never rolls a script back).

local n = tonumber(ARGV[1])

local function snapshot(code)
  local t = redis.call('TIME')
  local out = {code, t[1], t[2]}
  for i = 1, n do
    out[#out + 1] = redis.call('HGETALL', KEYS[i])
  end
  return out
end

if ARGV[2] == '?' then
  return snapshot(0)
end
local lease, me = KEYS[n + 1], ARGV[n + 2]
local holder = redis.call('GET', lease)
if holder and holder ~= me then
  return snapshot(2)
end
for i = 1, n do
  local seen = redis.call('HGET', KEYS[i], '_v') or '0'
  if seen ~= ARGV[i + 1] then
    if not holder and ARGV[n + 3] ~= '0' then
      redis.call('SET', lease, me, 'PX', ARGV[n + 3])
    end
    return snapshot(0)
  end
end
-- Validate every write before applying any, so a malformed call changes nothing.
local writes = cjson.decode(ARGV[n + 4])
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

if holder then
  redis.call('DEL', lease)
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
