-- The way in of a generation request in one atomic step (issue 12): the auth version,
-- then admit.lua, then fair_queue.lua's acquire. admit and fair_queue are the bodies of
-- those scripts, prepended as local functions of (KEYS, ARGV) (redis_store/scripts.py).
-- KEYS: 1-4 admit.lua's KEYS, 5 the auth version (bumped by every key revocation and
--       tenant change), 6-12 fair_queue.lua's KEYS for the ticket
-- ARGV: 1 the auth version the caller's cached key was read at ("": not checked),
--       2-10 admit.lua's ARGV, 11-22 fair_queue.lua's ARGV for 'acquire'
-- Returns {'stale', version}: the caller's key or tenant changed since it cached them;
--           nothing was recorded (read them again, then retry);
--         {'refused', version, admit's reply}: a tenant limit refused the request;
--         {'ok', version, admit's reply, fair_queue's reply}. A full waiting room in the
--           fair queue's reply (-1, -2) has undone the admission: only the request count
--           of the RPM window stays, as when a call is refused after admission.
local version = redis.call('GET', KEYS[5]) or '0'
if ARGV[1] ~= '' and ARGV[1] ~= version then
  return {'stale', version}
end

local function slice(list, first, last)
  local out = {}
  for i = first, last do out[#out + 1] = list[i] end
  return out
end

local admit_args = slice(ARGV, 2, 10)
local admitted = admit(slice(KEYS, 1, 4), admit_args)
if admitted[1] == 0 then
  return {'refused', version, admitted}
end
local queued = fair_queue(slice(KEYS, 6, #KEYS), slice(ARGV, 11, #ARGV))
if queued[1] < 0 then
  local reserve = tonumber(admit_args[6])
  redis.call('ZREM', KEYS[3], admit_args[7])
  redis.call('HINCRBY', KEYS[2], math.floor(admitted[8] / 1000), -reserve)
  redis.call('INCRBY', KEYS[4], -reserve)
end
return {'ok', version, admitted, queued}
