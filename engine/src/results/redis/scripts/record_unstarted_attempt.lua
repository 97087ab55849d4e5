-- Records whole attempts that were not recorded as started: short first
-- attempts, written once when they end instead of once before and once
-- after (`record_start_after_ms`). Each takes the next attempt number and
-- takes the record through `running` (its event is published) to its end
-- state, as start_attempt.lua and end_attempt.lua would together. One call
-- carries the attempts a worker records at the same time (`coalesce.rs`), a
-- row per task.
--
-- ARGV[1]  key prefix        ARGV[2]  TTL in seconds
-- ARGV[3]  index cutoff (ms) ARGV[4]  worker id
-- then per task (KEYS[k] is its hash), six arguments:
--   task id; when the attempt started (RFC 3339); the new state; when it
--   ended (RFC 3339); result JSON, '' for none; error JSON, '' for none
--
-- Returns a reply per task: {1} when written, {0, state} when the task was
-- already final, {-1} when there is no record; an error reply for a task
-- whose writes failed.
--
-- A task cancelled while this attempt ran had no attempt open to close: the
-- execution is recorded as an attempt closed as cancelled, not counted as a
-- duplicate, as end_attempt.lua does for an attempt it finds open. A call
-- made again (its reply was lost) writes the same attempt again.
local prefix, ttl, cutoff, worker = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
-- As in start_attempt.lua: ids the workers make need no JSON escaping.
local splice = not string.find(worker, '[%c"\\]')

local function attempt_json(n, started, at, outcome, err)
  if splice then
    local json = '{"number":' .. n .. ',"worker_id":"' .. worker .. '","started_at":"' .. started
      .. '","finished_at":"' .. at .. '","outcome":"' .. outcome .. '"'
    if err ~= '' then
      json = json .. ',"error":' .. err
    end
    return json .. '}'
  end
  local attempt = {number = n, worker_id = worker, started_at = started, finished_at = at,
    outcome = outcome}
  if err ~= '' then
    attempt.error = cjson.decode(err)
  end
  return cjson.encode(attempt)
end

local function record(h, id, started, new, at, result, err)
  local cur = redis.call('HMGET', h, 'state', 'created_ms', 'attempts', 'result', 'error',
    'finished_at', 'worker_id', 'started_at')
  local state, score = cur[1], cur[2] or '0'
  if not state then
    return {-1}
  end
  local n = tonumber(cur[3]) or 0
  -- The latest attempt is this very execution when its worker and start
  -- time match: a call sent again after its reply was lost, or a start
  -- written after all (start_attempt.lua) whose reply was lost. It is
  -- written again, not counted twice.
  local mine = n > 0 and cur[7] == worker and cur[8] == started
  if not mine then
    n = n + 1
  end
  local field = 'attempt:' .. n
  if state == 'cancelled' then
    redis.call('HSET', h, 'attempts', n, field, attempt_json(n, started, at, 'cancelled', err),
      'updated_at', at)
    redis.call('EXPIRE', h, ttl)
    return {0, state}
  end
  if mine and is_final(state) then
    return {0, state}
  end
  if is_final(state) then
    return count_duplicate(h, ttl, state)
  end

  write_end(h, ttl, {'state', new, 'attempts', n, 'worker_id', worker, 'started_at', started,
    'updated_at', at, field, attempt_json(n, started, at, new, err)}, new, at, result, err,
    cur[4], cur[5], cur[6])
  index_move(prefix, id, score, cutoff, state, new)
  publish(prefix, id, 'running')
  publish(prefix, id, new)
  return {1}
end

return rows(record, 4, 6)
