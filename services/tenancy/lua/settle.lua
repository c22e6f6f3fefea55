-- Settle an admitted request to its actual usage, free its concurrency slot and add it to
-- the tenant's daily usage, in one step.
-- KEYS: 1 token window, 2 daily tokens, 3 concurrency leases, 4 usage hash of the day
-- ARGV: 1 bucket second of the reservation, 2 delta tokens (actual - reserved), 3 lease id,
--       4 usage field prefix "<tenant>|<model>|", 5 prompt tokens, 6 completion tokens,
--       7 images, 8 usage TTL seconds ("" when the request is not to be recorded)
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
local freed = redis.call('ZREM', KEYS[3], ARGV[3])
if ARGV[8] ~= '' then
  redis.call('HINCRBY', KEYS[4], ARGV[4] .. 'requests', 1)
  redis.call('HINCRBY', KEYS[4], ARGV[4] .. 'prompt_tokens', tonumber(ARGV[5]))
  redis.call('HINCRBY', KEYS[4], ARGV[4] .. 'completion_tokens', tonumber(ARGV[6]))
  if tonumber(ARGV[7]) > 0 then
    redis.call('HINCRBY', KEYS[4], ARGV[4] .. 'images', tonumber(ARGV[7]))
  end
  redis.call('EXPIRE', KEYS[4], tonumber(ARGV[8]))
end
return freed
