-- Extend leases on Redis's clock (never a gateway's): one step for a replica's running
-- requests. Only leases that still exist are extended (XX): one that expired is gone.
-- KEYS: the lease zsets, one per member
-- ARGV: 1 now_ms ("": Redis's clock, as in production), 2 ttl_ms, 3.. the members, in KEYS' order
local now_ms = tonumber(ARGV[1])
if not now_ms then
  local clock = redis.call('TIME')
  now_ms = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
end
local expiry = now_ms + tonumber(ARGV[2])
for i = 1, #KEYS do
  redis.call('ZADD', KEYS[i], 'XX', expiry, ARGV[i + 2])
end
return #KEYS
