-- Start-time fair queueing across tenants for one pool (issue 3; SFQ as in the
-- Virtual Token Counter paper). Enqueue the caller's ticket and dispatch while the
-- pool has free capacity; an idle pool grants the caller in this same round trip.
-- KEYS: 1 in-flight leases (zset), 2 waiting tickets (zset), 3 ticket info (hash),
--       4 virtual times (hash: "vt" and one field per tenant)
-- ARGV: 1 now_ms, 2 capacity, 3 ticket id, 4 tenant, 5 cost, 6 weight, 7 class,
--       8 lease_ms, 9 grant key prefix, 10 max_waiting, 11 policy ("fair" or "fcfs":
--       plain arrival order, the baseline the fairness benchmark compares against)
-- Returns 1 granted now, 0 queued (BLPOP the grant key), -1 queue full.
local now_ms, capacity = tonumber(ARGV[1]), tonumber(ARGV[2])
local ticket, tenant = ARGV[3], ARGV[4]
local cost, weight, class = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local lease_ms, grant_prefix = tonumber(ARGV[8]), ARGV[9]
local CLASS_SPAN = 1e15

redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now_ms)
if redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[10]) then return -1 end

local vt = tonumber(redis.call('HGET', KEYS[4], 'vt') or '0')
local last_finish = tonumber(redis.call('HGET', KEYS[4], 't:' .. tenant) or '0')
local start = math.max(vt, last_finish)
redis.call('HSET', KEYS[4], 't:' .. tenant, start + cost / weight)
if ARGV[11] == 'fcfs' then
  redis.call('ZADD', KEYS[2], now_ms, ticket)
else
  redis.call('ZADD', KEYS[2], class * CLASS_SPAN + start, ticket)
end
redis.call('HSET', KEYS[3], ticket, start)

local granted_self = 0
while redis.call('ZCARD', KEYS[1]) < capacity do
  local head = redis.call('ZPOPMIN', KEYS[2])
  if #head == 0 then break end
  local id = head[1]
  local head_start = tonumber(redis.call('HGET', KEYS[3], id) or '0')
  redis.call('HDEL', KEYS[3], id)
  if head_start > vt then vt = head_start end
  redis.call('ZADD', KEYS[1], now_ms + lease_ms, id)
  if id == ticket then
    granted_self = 1
  else
    redis.call('RPUSH', grant_prefix .. id, 1)
    redis.call('EXPIRE', grant_prefix .. id, 300)
  end
end
redis.call('HSET', KEYS[4], 'vt', vt)
return granted_self
