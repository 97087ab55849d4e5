-- Records how attempts ended, unless their task is already final. One call
-- carries the ends a worker writes at the same time (`coalesce.rs`), a row
-- per task.
--
-- ARGV[1]  key prefix        ARGV[2]  TTL in seconds
-- ARGV[3]  index cutoff (ms)
-- then per task (KEYS[k] is its hash), six arguments:
--   task id; attempt number; the new state; now (RFC 3339); result JSON,
--   '' for none; error JSON, '' for none
--
-- Returns a reply per task: {1} when written, {0, state} when the task was
-- already final (the execution is counted as a duplicate), {-1} when there
-- is no record; an error reply for a task whose writes failed.
--
-- A task cancelled while this attempt ran is final too, but its still open
-- attempt is this very execution being stopped, not a second one: the
-- attempt is closed as cancelled and no duplicate is counted.
local prefix, ttl, cutoff = ARGV[1], ARGV[2], ARGV[3]

local function finish(h, id, n, new, at, result, err)
  local field = 'attempt:' .. n
  -- Everything the update depends on in one read: the attempt's own record,
  -- and which of the fields a final write clears exist at all.
  local cur = redis.call('HMGET', h, 'state', 'created_ms', 'worker_id', 'started_at', field,
    'result', 'error', 'finished_at')
  local state, score, raw = cur[1], cur[2] or '0', cur[5]
  if not state then
    return {-1}
  end
  if state == 'cancelled' then
    if raw then
      local attempt = cjson.decode(raw)
      if not attempt.finished_at then
        attempt.finished_at = at
        attempt.outcome = 'cancelled'
        if err ~= '' then
          attempt.error = cjson.decode(err)
        else
          attempt.error = nil
        end
        redis.call('HSET', h, field, cjson.encode(attempt), 'updated_at', at)
        redis.call('EXPIRE', h, ttl)
        return {0, state}
      end
    end
  end
  if is_final(state) then
    return count_duplicate(h, ttl, state)
  end

  -- The closed attempt: the open one as start_attempt wrote it, with the end
  -- spliced in. Decoding and encoding it with cjson costs more than the rest
  -- of the update; it is only needed when the attempt is not in that shape.
  local closed
  if raw and #raw > 2 and string.sub(raw, -1) == '}' and not string.find(raw, '"finished_at"', 1, true) then
    closed = string.sub(raw, 1, -2) .. ',"finished_at":"' .. at .. '","outcome":"' .. new .. '"'
    if err ~= '' then
      closed = closed .. ',"error":' .. err
    end
    closed = closed .. '}'
  else
    local attempt
    if raw then
      attempt = cjson.decode(raw)
    else
      attempt = {number = tonumber(n), worker_id = cur[3] or '', started_at = cur[4] or at}
    end
    attempt.finished_at = at
    attempt.outcome = new
    if err ~= '' then
      attempt.error = cjson.decode(err)
    else
      attempt.error = nil
    end
    closed = cjson.encode(attempt)
  end

  write_end(h, ttl, {'state', new, 'updated_at', at, field, closed}, new, at, result, err,
    cur[6], cur[7], cur[8])
  index_move(prefix, id, score, cutoff, state, new)
  publish(prefix, id, new)
  return {1}
end

return rows(finish, 3, 6)
