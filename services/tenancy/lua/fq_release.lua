-- Release a ticket (finished, or its waiter gave up) and dispatch the next ones.
-- KEYS: 1 in-flight leases, 2 waiting tickets, 3 ticket info, 4 virtual times
-- ARGV: 1 now_ms, 2 capacity, 3 ticket id, 4 lease_ms, 5 grant key prefix
-- Returns 1 if the ticket was still waiting (so it was never granted), else 0.
local now_ms, capacity = tonumber(ARGV[1]), tonumber(ARGV[2])
local ticket, lease_ms, grant_prefix = ARGV[3], tonumber(ARGV[4]), ARGV[5]

local was_waiting = redis.call('ZREM', KEYS[2], ticket)
redis.call('HDEL', KEYS[3], ticket)
redis.call('ZREM', KEYS[1], ticket)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now_ms)

local vt = tonumber(redis.call('HGET', KEYS[4], 'vt') or '0')
while redis.call('ZCARD', KEYS[1]) < capacity do
  local head = redis.call('ZPOPMIN', KEYS[2])
  if #head == 0 then break end
  local id = head[1]
  local head_start = tonumber(redis.call('HGET', KEYS[3], id) or '0')
  redis.call('HDEL', KEYS[3], id)
  if head_start > vt then vt = head_start end
  redis.call('ZADD', KEYS[1], now_ms + lease_ms, id)
  redis.call('RPUSH', grant_prefix .. id, 1)
  redis.call('EXPIRE', grant_prefix .. id, 300)
end
redis.call('HSET', KEYS[4], 'vt', vt)
return was_waiting
