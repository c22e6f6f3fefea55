-- Record one batch item's result exactly once, and acknowledge its stream entry, atomically.
-- A redelivered item (its worker died after writing) finds its result already there: the
-- count is not bumped again and the entry is just acknowledged.
-- KEYS: 1 results hash, 2 batch hash, 3 item stream
-- ARGV: 1 line number, 2 result JSON, 3 "completed" or "failed", 4 group, 5 entry id
local new = redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2])
if new == 1 then
  redis.call('HINCRBY', KEYS[2], ARGV[3], 1)
end
if ARGV[5] ~= '' then
  redis.call('XACK', KEYS[3], ARGV[4], ARGV[5])
  redis.call('XDEL', KEYS[3], ARGV[5])
end
local counts = redis.call('HMGET', KEYS[2], 'completed', 'failed', 'total')
return {new, tonumber(counts[1] or '0'), tonumber(counts[2] or '0'), tonumber(counts[3] or '0')}
