-- Marks a task running and opens a new attempt.
--
-- KEYS[1]  the task hash
-- ARGV[1]  key prefix        ARGV[2]  task id
-- ARGV[3]  TTL in seconds    ARGV[4]  index cutoff (ms)
-- ARGV[5]  worker id         ARGV[6]  now (RFC 3339)
-- ARGV[7]  the task message JSON, to create a missing record; '' when the
--          caller expects the record to exist
-- ARGV[8]  index score of a missing record (created_at, ms)
--
-- Returns {1, attempt} when started, {0, state} when the task is final,
-- {-1} when the record is missing and no message came to create it from
-- (the caller then calls again with the message).
local prefix, id, ttl, cutoff, worker, at = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local h = KEYS[1]

local cur = redis.call('HMGET', h, 'state', 'created_ms', 'attempts')
local state, score, attempts = cur[1], cur[2] or ARGV[8], cur[3]
if not state then
  if ARGV[7] == '' then
    return {-1}
  end
  -- A message published straight onto the queue by another system: its
  -- record starts here.
  score = ARGV[8]
  attempts = 0
  redis.call('HSET', h, 'message', ARGV[7], 'state', 'queued', 'attempts', 0,
    'duplicates', 0, 'queued_at', at, 'updated_at', at, 'created_ms', score)
  index_add(prefix, id, score, cutoff)
elseif is_final(state) then
  return {0, state}
end

-- Counted here rather than with HINCRBY: the script runs atomically, and one
-- call fewer matters on a path every task takes.
local n = (tonumber(attempts) or 0) + 1
-- The attempt's JSON is spliced, not encoded, when the worker id needs no
-- escaping (always, for ids the workers make): cjson costs more than the
-- HSET. The timestamp is RFC 3339 and needs none either.
local attempt
if string.find(worker, '[%c"\\]') then
  attempt = cjson.encode({number = n, worker_id = worker, started_at = at})
else
  attempt = '{"number":' .. n .. ',"worker_id":"' .. worker .. '","started_at":"' .. at .. '"}'
end
redis.call('HSET', h, 'state', 'running', 'attempts', n, 'worker_id', worker,
  'started_at', at, 'updated_at', at, 'attempt:' .. n, attempt)
redis.call('EXPIRE', h, ttl)
index_move(prefix, id, score, cutoff, state or nil, 'running')
publish(prefix, id, 'running')
return {1, n}
