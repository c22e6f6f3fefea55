-- Reserve a place in a per-tenant quota hash, atomically (two creates at once cannot both
-- take the last place). The hash maps a member (batch id, file id) to an amount (items,
-- bytes): its length and the sum of its amounts are what the quota limits.
-- KEYS: 1 the quota hash
-- ARGV: 1 member, 2 amount, 3 most members, 4 largest sum
-- Returns {verdict, members, sum} before the reservation: verdict 0 reserved (or already
-- there), 1 too many members, 2 the sum would pass its limit.
local count = redis.call('HLEN', KEYS[1])
local sum = 0
for _, v in ipairs(redis.call('HVALS', KEYS[1])) do sum = sum + tonumber(v) end
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then return {0, count, sum} end
if count + 1 > tonumber(ARGV[3]) then return {1, count, sum} end
if sum + tonumber(ARGV[2]) > tonumber(ARGV[4]) then return {2, count, sum} end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return {0, count, sum}
