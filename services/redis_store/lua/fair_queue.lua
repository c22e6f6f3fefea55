-- Start-time fair queueing across tenants for one pool (issue 3; SFQ as in the Virtual
-- Token Counter paper). One script, three operations, the same dispatch step:
--   acquire: enqueue the caller's ticket, then dispatch while the pool has free capacity
--            (an idle pool grants the caller in this same round trip)
--   release: free the ticket's slot, or withdraw it if still waiting (a waiter that left),
--            and drop a grant pushed to it that it never read; then dispatch
--   renew:   extend the leases of live tickets (waiting: the waiter's loop; granted: the
--            lease keeper, and a waiter that just read its grant); then dispatch
-- Time is Redis's (TIME), never a gateway's clock: every replica sees the same leases.
-- A waiting ticket has a lease of its own that its waiter renews; one whose waiter died
-- (kill -9, lost connection) expires and is dropped here before it can be granted, and a
-- grant pushed to a waiter gets that short lease until the waiter claims it (issue 9).
-- KEYS: 1 in-flight leases (zset), 2 waiting tickets (zset), 3 tickets (hash: "<start>|<tenant>"),
--       4 virtual times (hash: "vt" and "t:<tenant>" last finish tags),
--       5 waiting-ticket leases (zset), 6 waiting tickets per tenant (hash),
--       7.. the grant lists of the tickets named in ARGV, in their order
-- ARGV: 1 op, 2 capacity, 3 lease_ms, 4 ticket_ttl_ms, then
--       acquire: 5 ticket, 6 tenant, 7 cost, 8 weight, 9 class, 10 max_waiting,
--                11 max_waiting_per_tenant (0: none),
--                12 policy ("fair", or "fcfs": plain arrival order, the benchmarks' baseline)
--       release: 5 ticket, 6 the ticket's tenant ("" or absent: no correction),
--                7 the correction of that tenant's last virtual finish: (actual cost -
--                cost charged at acquire) / weight, applied only by the call that frees
--                the granted slot (issue 13: the request's real work, cached prompt
--                tokens at the pool's cached_prompt_queue_factor)
--       renew:   5.. tickets
-- Returns {result, granted}. result: acquire 1 granted now, 0 queued (BLPOP the grant key),
-- -1 the pool's waiting room is full, -2 the tenant's waiting cap is reached;
-- release 1 if the ticket was still waiting (never granted), else 0;
-- renew, per ticket, 1 waiting, 2 granted (lease extended), 0 unknown (expired or released).
-- granted: the other waiters' tickets this step's dispatch granted. Their grant lists are
-- not this call's keys (no one knows before the call which tickets dispatch picks), so the
-- caller pushes them; a waiter whose push is lost still finds its grant by its next renew.
local op, capacity = ARGV[1], tonumber(ARGV[2])
local lease_ms, ticket_ttl_ms = tonumber(ARGV[3]), tonumber(ARGV[4])
local CLASS_SPAN = 1e15
local clock = redis.call('TIME')
local now_ms = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)

-- Forget a waiting ticket (popped, withdrawn or expired); returns its start tag.
local function unqueue(id)
  redis.call('ZREM', KEYS[2], id)
  redis.call('ZREM', KEYS[5], id)
  local entry = redis.call('HGET', KEYS[3], id)
  if not entry then return nil end
  redis.call('HDEL', KEYS[3], id)
  local start, tenant = string.match(entry, '^([^|]*)|(.*)$')
  if redis.call('HINCRBY', KEYS[6], tenant, -1) <= 0 then redis.call('HDEL', KEYS[6], tenant) end
  return tonumber(start)
end

redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now_ms)
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[5], '-inf', now_ms, 'LIMIT', 0, 1000)) do
  unqueue(id)
end
local vt = tonumber(redis.call('HGET', KEYS[4], 'vt') or '0')
local result = 0
local granted = {}
local ticket = ARGV[5]

if op == 'acquire' then
  local tenant, cost, weight, class = ARGV[6], tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9])
  -- The caps bind only when the caller would have to wait.
  if redis.call('ZCARD', KEYS[1]) >= capacity then
    if redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[10]) then return {-1, granted} end
    local cap = tonumber(ARGV[11])
    if cap > 0 and tonumber(redis.call('HGET', KEYS[6], tenant) or '0') >= cap then return {-2, granted} end
  end
  local last_finish = tonumber(redis.call('HGET', KEYS[4], 't:' .. tenant) or '0')
  local start = math.max(vt, last_finish)
  redis.call('HSET', KEYS[4], 't:' .. tenant, start + cost / weight)
  if ARGV[12] == 'fcfs' then
    redis.call('ZADD', KEYS[2], now_ms, ticket)
  else
    redis.call('ZADD', KEYS[2], class * CLASS_SPAN + start, ticket)
  end
  redis.call('ZADD', KEYS[5], now_ms + ticket_ttl_ms, ticket)
  redis.call('HSET', KEYS[3], ticket, string.format('%.17g', start) .. '|' .. tenant)
  redis.call('HINCRBY', KEYS[6], tenant, 1)
elseif op == 'release' then
  if unqueue(ticket) then result = 1 end
  local held = redis.call('ZREM', KEYS[1], ticket) == 1
  redis.call('DEL', KEYS[7])
  -- Once: a resent call (or a lease that already expired) finds no slot and corrects nothing.
  local tenant, correction = ARGV[6], tonumber(ARGV[7] or '0')
  if held and tenant and tenant ~= '' and correction ~= 0 then
    local last_finish = tonumber(redis.call('HGET', KEYS[4], 't:' .. tenant) or '0')
    redis.call('HSET', KEYS[4], 't:' .. tenant, math.max(last_finish + correction, 0))
  end
else
  result = {}
  for i = 5, #ARGV do
    local id = ARGV[i]
    if redis.call('ZSCORE', KEYS[5], id) then
      redis.call('ZADD', KEYS[5], now_ms + ticket_ttl_ms, id)
      result[#result + 1] = 1
    elseif redis.call('ZSCORE', KEYS[1], id) then
      redis.call('ZADD', KEYS[1], now_ms + lease_ms, id)
      redis.call('DEL', KEYS[i + 2])  -- claimed: a grant not yet read is not needed
      result[#result + 1] = 2
    else
      result[#result + 1] = 0
    end
  end
end

-- Dispatch: grant the lowest-scored tickets while there is capacity. The pool's virtual
-- time follows the start tag of what was last dispatched.
while redis.call('ZCARD', KEYS[1]) < capacity do
  local head = redis.call('ZRANGE', KEYS[2], 0, 0)
  if #head == 0 then break end
  local id = head[1]
  local head_start = unqueue(id) or 0
  if head_start > vt then vt = head_start end
  if op ~= 'release' and id == ticket then
    -- The caller itself (acquiring, or a waiter renewing): it holds the grant right now.
    redis.call('ZADD', KEYS[1], now_ms + lease_ms, id)
    if op == 'acquire' then result = 1 else result[1] = 2 end
  else
    -- The waiter claims its grant (a renew) within a ticket lease, or it is freed.
    redis.call('ZADD', KEYS[1], now_ms + ticket_ttl_ms, id)
    granted[#granted + 1] = id
  end
end
redis.call('HSET', KEYS[4], 'vt', vt)
return {result, granted}
