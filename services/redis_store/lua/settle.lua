-- Settle an admitted request to its actual usage, free its concurrency slot and add it to
-- the tenant's daily usage, in one step. Idempotent per lease: redis-py resends a script
-- whose reply was lost (connection error, timeout), and that must not count twice.
-- KEYS: 1 token window, 2 daily tokens, 3 concurrency leases, 4 settle marker of the lease,
--       5 the tenant's usage hash of the day, 6 set of tenants with usage that day
-- ARGV: 1 bucket second of the reservation, 2 delta tokens (actual - reserved), 3 lease id,
--       4 marker TTL seconds, 5 usage field prefix "<model>|", 6 prompt tokens,
--       7 completion tokens, 8 images, 9 usage TTL seconds ("" when nothing is billed),
--       10 tenant id, 11 cached prompt tokens (of 6), 12 cache credit: tokens of the actual
--       usage the daily budget does not charge (cached prompt tokens billed at the pool's
--       cached_prompt_billing_factor; issue 13)
-- The token window (TPM) moves by ARGV 2; the daily budget by ARGV 2 - ARGV 12.
-- Returns 1 when this call settled the lease, 0 when an earlier call already had.
redis.call('ZREM', KEYS[3], ARGV[3])
if not redis.call('SET', KEYS[4], '1', 'NX', 'EX', tonumber(ARGV[4])) then
  return 0
end
local delta = tonumber(ARGV[2])
local credit = tonumber(ARGV[12] or '0')
-- A bucket that already left the window keeps no weight; only adjust live ones.
if delta ~= 0 and redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then
  redis.call('HINCRBY', KEYS[1], ARGV[1], delta)
end
if delta - credit ~= 0 and redis.call('EXISTS', KEYS[2]) == 1 then
  redis.call('INCRBY', KEYS[2], delta - credit)
end
if ARGV[9] ~= '' then
  local ttl = tonumber(ARGV[9])
  redis.call('HINCRBY', KEYS[5], ARGV[5] .. 'requests', 1)
  redis.call('HINCRBY', KEYS[5], ARGV[5] .. 'prompt_tokens', tonumber(ARGV[6]))
  redis.call('HINCRBY', KEYS[5], ARGV[5] .. 'completion_tokens', tonumber(ARGV[7]))
  if tonumber(ARGV[8]) > 0 then
    redis.call('HINCRBY', KEYS[5], ARGV[5] .. 'images', tonumber(ARGV[8]))
  end
  if tonumber(ARGV[11]) > 0 then
    redis.call('HINCRBY', KEYS[5], ARGV[5] .. 'cached_prompt_tokens', tonumber(ARGV[11]))
  end
  if credit > 0 then
    redis.call('HINCRBY', KEYS[5], ARGV[5] .. 'cache_credit_tokens', credit)
  end
  redis.call('EXPIRE', KEYS[5], ttl)
  redis.call('SADD', KEYS[6], ARGV[10])
  redis.call('EXPIRE', KEYS[6], ttl)
end
return 1
