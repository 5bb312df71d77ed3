#!lua
-- The one script behind every read snapshot and every mutation of the Redis store.
--
-- It never does arithmetic on amounts: the Python side computes every new row with
-- runcycles_server.ledger (exact integers) and this script only checks that the rows it read
-- are unchanged (compare-and-set on a per-row version) and then writes the new rows.
--
-- KEYS[1..n]    rows the caller read: Redis hashes carrying a "_v" version field
-- KEYS[n+1]     the tenant's turn key (string: the token of the process whose turn it is)
-- KEYS[n+2]     the tenant's next-turn key (string: the token of the process waiting next)
-- KEYS[n+3..]   further keys the writes touch (new rows, index sorted sets)
-- ARGV[1]       n
-- ARGV[2..n+1]  the "_v" the caller saw for KEYS[1..n] ("0" = the row did not exist);
--               "?" as ARGV[2] makes the call a pure read (only KEYS[1..n] are passed)
-- ARGV[n+2]     the caller's token (one per store instance)
-- ARGV[n+3]     the turn length in ms
-- ARGV[n+4]     "1" if the caller has more work queued (keep the turn), else "0"
-- ARGV[n+5]     the writes, as one JSON array (one argument instead of hundreds keeps
--               client-side packing cheap); each write is an array whose first two items
--               are an opcode and a key index into KEYS:
--                 ["H", k, [f1, v1, ..., fc, vc]]   HSET the fields, then HINCRBY _v 1
--                 ["X", k, "ms"]                    PEXPIRE k ms
--                 ["Z", k, "score", "member"]       ZADD
--                 ["R", k, "member"]                ZREM
--                 ["T", k, j, "now", "limit"]       trim: take the (at most limit) members
--                                                   of zset k scored <= now and ZREM them
--                                                   from k and from zset KEYS[j]
--               Field values are strings (row JSON is carried as an opaque string: cjson
--               never sees, let alone rounds, an amount).
--
-- Returns {1} once every write is applied. Otherwise nothing is written and it returns
-- {code, time_s, time_us, wait_ms, HGETALL KEYS[1], ..., HGETALL KEYS[n]}: code 0 when a
-- version differs (or on "?"), code 2 when it is another process's turn (wait_ms: how long
-- that turn still lasts at most).
--
-- Turns (fairness under contention between processes): a process that writes while it still
-- has work queued takes the tenant for one turn (a few ms; it does not renew it); during a
-- turn every other process's write is refused with code 2 and the first refused one is
-- queued as next. When the turn ends, only the next process may write; it takes its turn even
-- when its (stale) write loses, so its re-planned write cannot lose again. A process that
-- loses a race while nobody has a turn takes one the same way. So no process can starve
-- another, processes that contend on one tenant alternate in whole batches instead of
-- conflicting on every write, and a lightly loaded tenant (nothing queued) never waits. A
-- crashed process delays others by at most a turn (two while queued next).
--
-- All keys carry the same hash tag, so the script is Redis Cluster compatible. The shebang
-- line (Redis >= 7) declares a script that may write and is *not* allow-oom, so Redis refuses
-- the whole call up front when it is out of memory instead of failing halfway through the
-- writes (Redis never rolls a script back).

local n = tonumber(ARGV[1])

local function snapshot(code, wait_ms)
  local t = redis.call('TIME')
  local out = {code, t[1], t[2], wait_ms}
  for i = 1, n do
    out[#out + 1] = redis.call('HGETALL', KEYS[i])
  end
  return out
end

if ARGV[2] == '?' then
  return snapshot(0, 0)
end
local turn, nextk, me = KEYS[n + 1], KEYS[n + 2], ARGV[n + 2]
local turn_ms, keep = tonumber(ARGV[n + 3]), ARGV[n + 4] == '1'
local holder = redis.call('GET', turn)
local queued = redis.call('GET', nextk)
if holder and holder ~= me then
  if not queued then
    redis.call('SET', nextk, me, 'PX', 2 * turn_ms)
  end
  return snapshot(2, math.max(redis.call('PTTL', turn), 1))
end
if not holder and queued and queued ~= me then
  return snapshot(2, math.max(redis.call('PTTL', nextk), 1))
end
for i = 1, n do
  local seen = redis.call('HGET', KEYS[i], '_v') or '0'
  if seen ~= ARGV[i + 1] then
    if not holder then  -- lost a race with nobody's turn running: take the next turn
      redis.call('SET', turn, me, 'PX', turn_ms)
      if queued then
        redis.call('DEL', nextk)
      end
    end
    return snapshot(0, 0)
  end
end
-- Validate every write before applying any, so a malformed call changes nothing.
local writes = cjson.decode(ARGV[n + 5])
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
  elseif op == 'T' then
    if KEYS[w[3]] == nil or tonumber(w[4]) == nil or tonumber(w[5]) == nil then
      return redis.error_reply('redis_cas: write ' .. i .. ' has a bad trim')
    end
  elseif op ~= 'R' then
    return redis.error_reply('redis_cas: unknown opcode ' .. tostring(op))
  end
end

if queued == me then
  redis.call('DEL', nextk)
end
if keep then
  if not holder then
    redis.call('SET', turn, me, 'PX', turn_ms)
  end
elseif holder then
  redis.call('DEL', turn)
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
  elseif op == 'T' then
    local gone = redis.call('ZRANGEBYSCORE', key, '-inf', w[4], 'LIMIT', 0, w[5])
    if #gone > 0 then
      redis.call('ZREM', KEYS[w[3]], unpack(gone))
      redis.call('ZREM', key, unpack(gone))
    end
  else
    redis.call('ZREM', key, w[3])
  end
end
return {1}
