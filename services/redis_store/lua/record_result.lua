-- Record batch items' results exactly once, and acknowledge their stream entries, atomically.
-- A redelivered item (its worker died after writing) finds its result already there: the
-- count is not bumped again and the entry is just acknowledged. Several items are recorded
-- per call (the worker coalesces results for a few milliseconds).
-- KEYS: 1 the pool's item stream, then per item n (from 1): 2n its batch's record (hash),
--       2n + 1 its batch's results (hash)
-- ARGV: 1 consumer group, then per item n: 2n "<line>|<completed or failed>|<entry id>",
--       2n + 1 the result JSON
-- Returns per item: new (0/1), completed, failed, total (the batch's counts after this call)
local FINAL = {completed = true, failed = true, cancelled = true, expired = true}
local news, batches, entries, added = {}, {}, {}, {}
for n = 1, (#ARGV - 1) / 2 do
  local line, outcome, entry = string.match(ARGV[2 * n], '^([^|]+)|([^|]+)|([^|]+)$')
  local batch_key, results_key = KEYS[2 * n], KEYS[2 * n + 1]
  -- A finished (or expired) batch's results have left Redis for its files: a late duplicate
  -- must not bring the hash back nor count twice.
  local status = redis.call('HGET', batch_key, 'status')
  local new = 0
  if status and not FINAL[status] then
    new = redis.call('HSETNX', results_key, line, ARGV[2 * n + 1])
  end
  if new == 1 then
    local counter = batch_key .. '\0' .. outcome
    added[counter] = (added[counter] or 0) + 1
  end
  news[#news + 1] = new
  batches[#batches + 1] = batch_key
  entries[#entries + 1] = entry
end
-- One count update per batch and outcome, not one per item.
for counter, n in pairs(added) do
  local batch_key, outcome = string.match(counter, '^(.*)%z(.*)$')
  redis.call('HINCRBY', batch_key, outcome, n)
end
redis.call('XACK', KEYS[1], ARGV[1], unpack(entries))
redis.call('XDEL', KEYS[1], unpack(entries))
local counts, out = {}, {}
for n, batch_key in ipairs(batches) do
  if counts[batch_key] == nil then
    counts[batch_key] = redis.call('HMGET', batch_key, 'completed', 'failed', 'total')
  end
  local c = counts[batch_key]
  out[#out + 1] = news[n]
  out[#out + 1] = tonumber(c[1] or '0')
  out[#out + 1] = tonumber(c[2] or '0')
  out[#out + 1] = tonumber(c[3] or '0')
end
return out
