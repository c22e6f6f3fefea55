-- Start-time fair queueing across tenants for one pool (issue 3; SFQ as in the Virtual
-- Token Counter paper). One script, two operations, the same dispatch step:
--   acquire: enqueue the caller's ticket, then dispatch while the pool has free capacity
--            (an idle pool grants the caller in this same round trip)
--   release: free the ticket's slot (or withdraw a waiting ticket), then dispatch
-- KEYS: 1 in-flight leases (zset), 2 waiting tickets (zset), 3 ticket start tags (hash),
--       4 virtual times (hash: "vt" and "t:<tenant>" last finish tags)
-- ARGV: 1 op, 2 now_ms, 3 capacity, 4 ticket id, 5 lease_ms, 6 grant key prefix,
--       acquire only: 7 tenant, 8 cost, 9 weight, 10 class, 11 max_waiting,
--       12 policy ("fair", or "fcfs": plain arrival order, the benchmarks' baseline)
-- acquire returns 1 granted now, 0 queued (BLPOP the grant key), -1 queue full;
-- release returns 1 if the ticket was still waiting (never granted), else 0.
local op, now_ms, capacity = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local ticket, lease_ms, grant_prefix = ARGV[4], tonumber(ARGV[5]), ARGV[6]
local CLASS_SPAN = 1e15

local result = 0
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now_ms)
local vt = tonumber(redis.call('HGET', KEYS[4], 'vt') or '0')

if op == 'acquire' then
  local tenant, cost, weight, class = ARGV[7], tonumber(ARGV[8]), tonumber(ARGV[9]), tonumber(ARGV[10])
  if redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[11]) then return -1 end
  local last_finish = tonumber(redis.call('HGET', KEYS[4], 't:' .. tenant) or '0')
  local start = math.max(vt, last_finish)
  redis.call('HSET', KEYS[4], 't:' .. tenant, start + cost / weight)
  if ARGV[12] == 'fcfs' then
    redis.call('ZADD', KEYS[2], now_ms, ticket)
  else
    redis.call('ZADD', KEYS[2], class * CLASS_SPAN + start, ticket)
  end
  redis.call('HSET', KEYS[3], ticket, start)
else
  result = redis.call('ZREM', KEYS[2], ticket)
  redis.call('HDEL', KEYS[3], ticket)
  redis.call('ZREM', KEYS[1], ticket)
end

-- Dispatch: grant the lowest-scored tickets while there is capacity. The pool's virtual
-- time follows the start tag of what was last dispatched.
while redis.call('ZCARD', KEYS[1]) < capacity do
  local head = redis.call('ZPOPMIN', KEYS[2])
  if #head == 0 then break end
  local id = head[1]
  local head_start = tonumber(redis.call('HGET', KEYS[3], id) or '0')
  redis.call('HDEL', KEYS[3], id)
  if head_start > vt then vt = head_start end
  redis.call('ZADD', KEYS[1], now_ms + lease_ms, id)
  if op == 'acquire' and id == ticket then
    result = 1
  else
    redis.call('RPUSH', grant_prefix .. id, 1)
    redis.call('EXPIRE', grant_prefix .. id, 300)
  end
end
redis.call('HSET', KEYS[4], 'vt', vt)
return result
