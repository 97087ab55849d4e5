-- Marks tasks running and opens a new attempt for each. One call carries
-- the starts a worker makes at the same time (`coalesce.rs`), a row per task:
-- a call costs Redis far less than its rows would one by one.
--
-- ARGV[1]  key prefix        ARGV[2]  TTL in seconds
-- ARGV[3]  index cutoff (ms) ARGV[4]  worker id
-- then per task (KEYS[k] is its hash), four arguments:
--   task id; now (RFC 3339); the task message JSON, to create a missing
--   record, '' when the caller expects the record to exist; the index score
--   of a missing record (created_at, ms)
--
-- Returns a reply per task: {1, attempt} when started, {0, state} when the
-- task is final, {-1} when the record is missing and no message came to
-- create it from (the caller then calls again with the message); an error
-- reply for a task whose writes failed.
local prefix, ttl, cutoff, worker = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
-- The attempt's JSON is spliced, not encoded, when the worker id needs no
-- escaping (always, for ids the workers make): cjson costs more than the
-- HSET. The timestamp is RFC 3339 and needs none either.
local splice = not string.find(worker, '[%c"\\]')

local function start(h, id, at, message, created)
  local cur = redis.call('HMGET', h, 'state', 'created_ms', 'attempts')
  local state, score, attempts = cur[1], cur[2] or created, cur[3]
  if not state then
    if message == '' then
      return {-1}
    end
    -- A message published straight onto the queue by another system: its
    -- record starts here.
    score = created
    attempts = 0
    redis.call('HSET', h, 'message', message, 'state', 'queued', 'attempts', 0,
      'duplicates', 0, 'queued_at', at, 'updated_at', at, 'created_ms', score)
    index_add(prefix, id, score, cutoff)
  elseif is_final(state) then
    return {0, state}
  end

  -- Counted here rather than with HINCRBY: the script runs atomically, and one
  -- call fewer matters on a path every task takes.
  local n = (tonumber(attempts) or 0) + 1
  local attempt
  if splice then
    attempt = '{"number":' .. n .. ',"worker_id":"' .. worker .. '","started_at":"' .. at .. '"}'
  else
    attempt = cjson.encode({number = n, worker_id = worker, started_at = at})
  end
  redis.call('HSET', h, 'state', 'running', 'attempts', n, 'worker_id', worker,
    'started_at', at, 'updated_at', at, 'attempt:' .. n, attempt)
  redis.call('EXPIRE', h, ttl)
  index_move(prefix, id, score, cutoff, state or nil, 'running')
  publish(prefix, id, 'running')
  return {1, n}
end

return rows(start, 4, 4)
