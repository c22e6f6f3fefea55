-- The way out of a generation request in one atomic step (issue 12): settle.lua, then
-- fair_queue.lua's release of its slot (which dispatches the next tickets). settle and
-- fair_queue are those scripts' bodies, prepended as local functions of (KEYS, ARGV).
-- KEYS: 1-6 settle.lua's KEYS, 7-13 fair_queue.lua's KEYS for the ticket
-- ARGV: 1-12 settle.lua's ARGV, 13-19 fair_queue.lua's ARGV for 'release'
-- Returns {settle's reply, fair_queue's reply}
local function slice(list, first, last)
  local out = {}
  for i = first, last do out[#out + 1] = list[i] end
  return out
end

local settled = settle(slice(KEYS, 1, 6), slice(ARGV, 1, 12))
return {settled, fair_queue(slice(KEYS, 7, #KEYS), slice(ARGV, 13, #ARGV))}
