-- Settle an admitted request to its actual usage and free its concurrency slot.
-- KEYS: 1 token window, 2 daily tokens, 3 concurrency leases
-- ARGV: 1 bucket second of the reservation, 2 delta tokens (actual - reserved), 3 lease id
local delta = tonumber(ARGV[2])
if delta ~= 0 then
  -- A bucket that already left the window keeps no weight; only adjust live ones.
  if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then
    redis.call('HINCRBY', KEYS[1], ARGV[1], delta)
  end
  if redis.call('EXISTS', KEYS[2]) == 1 then
    redis.call('INCRBY', KEYS[2], delta)
  end
end
return redis.call('ZREM', KEYS[3], ARGV[3])
