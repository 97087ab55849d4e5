-- Puts a task back to queued for a replay: clears the outcome, keeps the
-- attempt history, and recreates an expired record from the message.
--
-- KEYS[1]  the task hash
-- ARGV[1]  key prefix        ARGV[2]  task id
-- ARGV[3]  TTL in seconds    ARGV[4]  index cutoff (ms)
-- ARGV[5]  now (RFC 3339)
-- ARGV[6]  the task message JSON
-- ARGV[7]  index score of a missing record (created_at, ms)
--
-- Returns HGETALL of the record.
local prefix, id, ttl, cutoff, at = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local h = KEYS[1]

local cur = redis.call('HMGET', h, 'state', 'created_ms')
local state, score = cur[1], cur[2] or ARGV[7]
if not state then
  score = ARGV[7]
  redis.call('HSET', h, 'message', ARGV[6], 'attempts', 0, 'duplicates', 0,
    'created_ms', score)
  index_add(prefix, id, score, cutoff)
else
  redis.call('HDEL', h, 'result', 'error', 'finished_at')
end

redis.call('HSET', h, 'state', 'queued', 'queued_at', at, 'updated_at', at)
redis.call('EXPIRE', h, ttl)
index_move(prefix, id, score, cutoff, state or nil, 'queued')
publish(prefix, id, 'queued')
return redis.call('HGETALL', h)
