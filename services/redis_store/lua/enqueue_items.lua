-- Add a chunk of batch items to a pool's item stream, all of them or none: the first XADD
-- is refused when Redis is out of memory (nothing added), and a script that has written
-- runs to its end. One call per chunk and pool: redis-py packs one argument per item and
-- parses one reply per chunk (a pipeline of XADDs packs five per item and parses a reply
-- for each, most of a large batch's enqueue time).
-- KEYS: 1 the pool's item stream
-- ARGV: each item's encoded value (the entry's `item` field)
-- Returns the new entry ids, in order
local ids = {}
for n = 1, #ARGV do
  ids[n] = redis.call('XADD', KEYS[1], '*', 'item', ARGV[n])
end
return ids
