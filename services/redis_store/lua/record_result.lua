-- Record batch items' results exactly once, and acknowledge their stream entries, atomically.
-- A redelivered item (its worker died after writing) finds its result already there: the
-- count is not bumped again and the entry is just acknowledged. Several items are recorded
-- per call (the worker coalesces results for a few milliseconds), grouped by batch: each
-- batch's status, present results, new results and counts take one command each per call
-- (HMGET + HSET instead of an HSETNX per item: a command from Lua costs more than its work).
-- KEYS: 1 the pool's item stream, then per batch b (from 1): 2b its record (hash),
--       2b + 1 its results (hash)
-- ARGV: 1 consumer group; 2 one line per item n: "<b> <line> <completed or failed> <entry id>";
--       2 + n item n's result JSON
-- Returns the items' new flags (0/1) in order, then per batch: completed, failed, total
-- (its counts after this call)
local FINAL = {completed = true, failed = true, cancelled = true, expired = true}
local items, by_batch, entries = {}, {}, {}
for b, line, outcome, entry in string.gmatch(ARGV[2], '(%d+) (%d+) (%a+) (%S+)') do
  local n = #items + 1
  b = tonumber(b)
  items[n] = {b = b, line = line, outcome = outcome}
  entries[n] = entry
  local lines = by_batch[b]
  if lines == nil then
    lines = {}
    by_batch[b] = lines
  end
  lines[#lines + 1] = n
end
local news = {}
for b, members in pairs(by_batch) do
  -- A finished (or expired) batch's results have left Redis for its files: a late
  -- duplicate must not bring the hash back nor count twice.
  local status = redis.call('HGET', KEYS[2 * b], 'status')
  if status ~= false and not FINAL[status] then
    local fields = {}
    for i, n in ipairs(members) do
      fields[i] = items[n].line
    end
    local present = redis.call('HMGET', KEYS[2 * b + 1], unpack(fields))
    local taken, writes, added = {}, {}, {completed = 0, failed = 0}
    for i, n in ipairs(members) do
      local item = items[n]
      if present[i] == false and not taken[item.line] then
        taken[item.line] = true
        writes[#writes + 1] = item.line
        writes[#writes + 1] = ARGV[2 + n]
        added[item.outcome] = added[item.outcome] + 1
        news[n] = 1
      end
    end
    if #writes > 0 then
      redis.call('HSET', KEYS[2 * b + 1], unpack(writes))
    end
    -- One count update per batch and outcome, not one per item.
    for outcome, k in pairs(added) do
      if k > 0 then
        redis.call('HINCRBY', KEYS[2 * b], outcome, k)
      end
    end
  end
end
if #entries > 0 then
  redis.call('XACK', KEYS[1], ARGV[1], unpack(entries))
  redis.call('XDEL', KEYS[1], unpack(entries))
end
local out = {}
for n = 1, #items do
  out[n] = news[n] or 0
end
for b = 1, (#KEYS - 1) / 2 do
  local c = redis.call('HMGET', KEYS[2 * b], 'completed', 'failed', 'total')
  out[#out + 1] = tonumber(c[1] or '0')
  out[#out + 1] = tonumber(c[2] or '0')
  out[#out + 1] = tonumber(c[3] or '0')
end
return out
