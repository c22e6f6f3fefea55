-- Admit one request for a tenant, atomically: RPM, TPM reservation, concurrency
-- lease, daily token budget. Windows are hashes of per-second buckets (sliding 60 s).
-- KEYS: 1 request window, 2 token window, 3 concurrency leases (zset), 4 daily tokens
-- ARGV: 1 now_ms ("": Redis's clock, as in production), 2 rpm, 3 tpm, 4 max_concurrent,
--       5 daily_budget (0 = no limit), 6 reserve_tokens, 7 lease_id, 8 lease_ttl_ms, 9 day_ttl_s
-- Returns {admitted, reason, retry_after_ms, req_remaining, req_reset_ms, tok_remaining,
--          tok_reset_ms, now_ms}
-- Windows and leases run on Redis's TIME: gateways whose clocks disagree share one window
-- (a gateway ahead would otherwise drop the others' buckets as stale; issue 9).
local now_ms = tonumber(ARGV[1])
if not now_ms then
  local clock = redis.call('TIME')
  now_ms = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
end
local rpm, tpm = tonumber(ARGV[2]), tonumber(ARGV[3])
local max_conc, budget = tonumber(ARGV[4]), tonumber(ARGV[5])
local reserve = tonumber(ARGV[6])
local now_s = math.floor(now_ms / 1000)
local oldest_kept = now_s - 59

-- Sum a window, dropping buckets older than 60 s; return total and sorted buckets.
local function window(key)
  local flat = redis.call('HGETALL', key)
  local total, buckets, stale = 0, {}, {}
  for i = 1, #flat, 2 do
    local sec, n = tonumber(flat[i]), tonumber(flat[i + 1])
    if sec < oldest_kept then
      stale[#stale + 1] = flat[i]
    else
      total = total + n
      buckets[#buckets + 1] = {sec, n}
    end
  end
  if #stale > 0 then redis.call('HDEL', key, unpack(stale)) end
  table.sort(buckets, function(a, b) return a[1] < b[1] end)
  return total, buckets
end

-- Milliseconds until at least `need` units leave the window.
local function wait_for(buckets, need)
  local freed = 0
  for _, b in ipairs(buckets) do
    freed = freed + b[2]
    if freed >= need then return (b[1] + 60) * 1000 - now_ms end
  end
  return 60000
end

local req_used, req_buckets = window(KEYS[1])
local tok_used, tok_buckets = window(KEYS[2])
local req_reset = #req_buckets > 0 and (req_buckets[1][1] + 60) * 1000 - now_ms or 0
local tok_reset = #tok_buckets > 0 and (tok_buckets[1][1] + 60) * 1000 - now_ms or 0
local req_left = rpm > 0 and rpm - req_used or -1
local tok_left = tpm > 0 and tpm - tok_used or -1

local function refuse(reason, retry_ms)
  return {0, reason, math.max(retry_ms, 1), req_left, req_reset, tok_left, tok_reset, now_ms}
end

if rpm > 0 and req_used + 1 > rpm then
  return refuse('requests_per_minute', wait_for(req_buckets, req_used + 1 - rpm))
end
if tpm > 0 and reserve > tpm then
  return refuse('request_exceeds_tpm', 60000)
end
if tpm > 0 and tok_used + reserve > tpm then
  return refuse('tokens_per_minute', wait_for(tok_buckets, tok_used + reserve - tpm))
end
if max_conc > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now_ms)
  if redis.call('ZCARD', KEYS[3]) >= max_conc then
    return refuse('concurrency', 1000)
  end
end
if budget > 0 then
  local spent = tonumber(redis.call('GET', KEYS[4]) or '0')
  if spent + reserve > budget then
    local to_midnight = (86400 - (now_s % 86400)) * 1000
    return refuse('daily_token_budget', to_midnight)
  end
end

-- Admitted: record everything in this one step.
redis.call('HINCRBY', KEYS[1], now_s, 1)
redis.call('EXPIRE', KEYS[1], 120)
redis.call('HINCRBY', KEYS[2], now_s, reserve)
redis.call('EXPIRE', KEYS[2], 120)
redis.call('ZADD', KEYS[3], now_ms + tonumber(ARGV[8]), ARGV[7])
redis.call('EXPIRE', KEYS[3], 86400)
redis.call('INCRBY', KEYS[4], reserve)
redis.call('EXPIRE', KEYS[4], tonumber(ARGV[9]))
if req_left >= 0 then req_left = req_left - 1 end
if tok_left >= 0 then tok_left = tok_left - reserve end
if req_reset == 0 then req_reset = 60000 end
if tok_reset == 0 then tok_reset = 60000 end
return {1, 'ok', 0, req_left, req_reset, tok_left, tok_reset, now_ms}
