-- Register a tenant's LoRA adapter: the name is free and the tenant is below its cap,
-- checked and written in one step (two admins registering at once cannot pass the cap).
-- KEYS[1] the tenant's adapters hash (name -> JSON record)
-- ARGV[1] adapter name, ARGV[2] its JSON record, ARGV[3] the tenant's max_adapters
-- Returns 1 (registered), -1 (the name is taken), -2 (the tenant is at its cap).
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then
  return -1
end
if redis.call('HLEN', KEYS[1]) >= tonumber(ARGV[3]) then
  return -2
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return 1
