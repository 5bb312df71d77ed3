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
-- ARGV[n+2..]   writes, each an opcode, a key index into KEYS and its operands:
--                 H k c f1 v1 .. fc vc   HSET c fields, then HINCRBY _v 1
--                 X k ms                 PEXPIRE k ms
--                 Z k score member       ZADD
--                 R k member             ZREM
--
-- Returns {1} once every write is applied, or, when any version differs (or on "?"),
-- {0, time_s, time_us, HGETALL KEYS[1], ..., HGETALL KEYS[n]} and writes nothing.
-- All keys carry the same hash tag, so the script is Redis Cluster compatible.

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

-- Parse and validate every write before applying any, so a malformed call changes nothing.
local ops = {}
local a = n + 2
while a <= #ARGV do
  local op = ARGV[a]
  local key = KEYS[tonumber(ARGV[a + 1])]
  if key == nil then
    return redis.error_reply('redis_cas: bad key index at ARGV[' .. (a + 1) .. ']')
  end
  if op == 'H' then
    local c = tonumber(ARGV[a + 2])
    local fields = {}
    for j = a + 3, a + 2 + 2 * c do
      fields[#fields + 1] = ARGV[j]
    end
    ops[#ops + 1] = {'H', key, fields}
    a = a + 3 + 2 * c
  elseif op == 'X' then
    ops[#ops + 1] = {'X', key, ARGV[a + 2]}
    a = a + 3
  elseif op == 'Z' then
    if tonumber(ARGV[a + 2]) == nil then
      return redis.error_reply('redis_cas: bad score at ARGV[' .. (a + 2) .. ']')
    end
    ops[#ops + 1] = {'Z', key, ARGV[a + 2], ARGV[a + 3]}
    a = a + 4
  elseif op == 'R' then
    ops[#ops + 1] = {'R', key, ARGV[a + 2]}
    a = a + 3
  else
    return redis.error_reply('redis_cas: unknown opcode ' .. tostring(op))
  end
end

for _, op in ipairs(ops) do
  local key = op[2]
  if op[1] == 'H' then
    redis.call('HSET', key, unpack(op[3]))
    redis.call('HINCRBY', key, '_v', 1)
  elseif op[1] == 'X' then
    redis.call('PEXPIRE', key, op[3])
  elseif op[1] == 'Z' then
    redis.call('ZADD', key, op[3], op[4])
  else
    redis.call('ZREM', key, op[3])
  end
end
return {1}
