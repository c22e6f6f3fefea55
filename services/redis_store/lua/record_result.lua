-- Record batch items' results exactly once, and acknowledge their stream entries, atomically.
-- A redelivered item (its worker died after writing) finds its result already there: the
-- count is not bumped again and the entry is just acknowledged. Several items are recorded
-- per call (the worker coalesces results for a few milliseconds), grouped by batch so that
-- each batch's status, counts and keys are handled once per call, not once per item.
-- KEYS: 1 the pool's item stream, then per batch b (from 1): 2b its record (hash),
--       2b + 1 its results (hash)
-- ARGV: 1 consumer group; 2 one line per item n: "<b> <line> <completed or failed> <entry id>";
--       2 + n item n's result JSON
-- Returns the items' new flags (0/1) in order, then per batch: completed, failed, total
-- (its counts after this call)
local FINAL = {completed = true, failed = true, cancelled = true, expired = true}
local open, added, news, entries = {}, {}, {}, {}
local n = 0
for b, line, outcome, entry in string.gmatch(ARGV[2], '(%d+) (%d+) (%a+) (%S+)') do
  n = n + 1
  b = tonumber(b)
  if open[b] == nil then
    -- A finished (or expired) batch's results have left Redis for its files: a late
    -- duplicate must not bring the hash back nor count twice.
    local status = redis.call('HGET', KEYS[2 * b], 'status')
    open[b] = status ~= false and not FINAL[status]
    added[b] = {completed = 0, failed = 0}
  end
  local new = 0
  if open[b] then
    new = redis.call('HSETNX', KEYS[2 * b + 1], line, ARGV[2 + n])
  end
  if new == 1 then
    added[b][outcome] = added[b][outcome] + 1
  end
  news[n] = new
  entries[n] = entry
end
-- One count update per batch and outcome, not one per item.
for b, counts in pairs(added) do
  for outcome, k in pairs(counts) do
    if k > 0 then
      redis.call('HINCRBY', KEYS[2 * b], outcome, k)
    end
  end
end
if n > 0 then
  redis.call('XACK', KEYS[1], ARGV[1], unpack(entries))
  redis.call('XDEL', KEYS[1], unpack(entries))
end
for b = 1, (#KEYS - 1) / 2 do
  local c = redis.call('HMGET', KEYS[2 * b], 'completed', 'failed', 'total')
  news[#news + 1] = tonumber(c[1] or '0')
  news[#news + 1] = tonumber(c[2] or '0')
  news[#news + 1] = tonumber(c[3] or '0')
end
return news
