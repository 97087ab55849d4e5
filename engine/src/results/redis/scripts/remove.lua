-- Removes a record, its index entries and its idempotency key (only while
-- the key still points at this task).
--
-- KEYS[1]  the task hash
-- ARGV[1]  key prefix        ARGV[2]  task id
-- ARGV[3]  idempotency key, '' for none
--
-- Returns 1.
local prefix, id, idem = ARGV[1], ARGV[2], ARGV[3]
local h = KEYS[1]

local state = redis.call('HGET', h, 'state')
redis.call('DEL', h)
redis.call('ZREM', prefix .. 'index', id)
if state then
  redis.call('ZREM', prefix .. 'index:' .. state, id)
end
if idem ~= '' then
  local idem_key = prefix .. 'idem:' .. idem
  if redis.call('GET', idem_key) == id then
    redis.call('DEL', idem_key)
  end
end
return 1
