-- Stores a new task record, claiming its idempotency key first.
--
-- KEYS[1]  the task hash
-- ARGV[1]  key prefix        ARGV[2]  task id
-- ARGV[3]  idempotency key, '' for none
-- ARGV[4]  TTL in seconds    ARGV[5]  index score (created_at, ms)
-- ARGV[6]  index cutoff (ms) ARGV[7]  state
-- ARGV[8..] field, value, field, value, ... of the hash
--
-- Returns {1} when stored (or when this id is already stored: a retried
-- create leaves the record alone), {0, owner_id, HGETALL of the owner} when
-- another live task holds the idempotency key.
local prefix, id, idem, ttl = ARGV[1], ARGV[2], ARGV[3], ARGV[4]

if idem ~= '' then
  local idem_key = prefix .. 'idem:' .. idem
  local owner = redis.call('GET', idem_key)
  if owner and owner ~= id then
    local fields = redis.call('HGETALL', prefix .. 'task:' .. owner)
    if #fields > 0 then
      return {0, owner, fields}
    end
    -- The key outlived its task (records are refreshed, keys are not): the
    -- submitter gets a new task, as if the key had expired.
  end
  redis.call('SET', idem_key, id, 'EX', ttl)
end

if redis.call('EXISTS', KEYS[1]) == 1 then
  return {1}
end

redis.call('HSET', KEYS[1], unpack(ARGV, 8))
redis.call('EXPIRE', KEYS[1], ttl)
index_add(prefix, id, ARGV[5], ARGV[6])
index_move(prefix, id, ARGV[5], ARGV[6], nil, ARGV[7])
publish(prefix, id, ARGV[7])
return {1}
