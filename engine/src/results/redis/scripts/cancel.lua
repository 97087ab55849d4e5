-- Moves a task that is not final to cancelled.
--
-- KEYS[1]  the task hash
-- ARGV[1]  key prefix        ARGV[2]  task id
-- ARGV[3]  TTL in seconds    ARGV[4]  index cutoff (ms)
-- ARGV[5]  now (RFC 3339)
--
-- Returns {1, HGETALL} when cancelled, {0, HGETALL} when already final,
-- {-1} when there is no record.
local prefix, id, ttl, cutoff, at = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local h = KEYS[1]

local cur = redis.call('HMGET', h, 'state', 'created_ms')
local state, score = cur[1], cur[2] or '0'
if not state then
  return {-1}
end
if is_final(state) then
  return {0, redis.call('HGETALL', h)}
end

redis.call('HSET', h, 'state', 'cancelled', 'finished_at', at, 'updated_at', at)
redis.call('EXPIRE', h, ttl)
index_move(prefix, id, score, cutoff, state, 'cancelled')
publish(prefix, id, 'cancelled')
return {1, redis.call('HGETALL', h)}
