-- Shared by every ClaudeCluster store script (prepended by the Rust side).
--
-- Key names are derived from the key prefix inside the scripts, because the
-- keys a transition touches (the state indexes, the idempotency key) depend on
-- what is stored. That needs a single Redis primary (with replicas or
-- Sentinel), not Redis Cluster.

-- Every call runs this prelude again, so the state sets are functions, not
-- tables: building a table on each call cost more than the comparisons.
local function is_final(state)
  return state == 'succeeded' or state == 'failed' or state == 'timed_out'
    or state == 'cancelled' or state == 'dead_lettered'
end

-- Indexes are trimmed of entries older than the record TTL as they are
-- written, so they stay bounded without a sweeper process. Trimming on every
-- write would cost more than the write, so it happens for one task id in
-- sixteen (the last hex digit of a random id), which bounds the leftovers
-- just the same.
local function trim(key, id, cutoff)
  if string.sub(id, -1) == '0' then
    redis.call('ZREMRANGEBYSCORE', key, '-inf', '(' .. cutoff)
  end
end

-- States with an index of their own: the rare outcomes an operator looks
-- for among many successes. Every other state is listed from the index of
-- all tasks, filtered, which costs a listing a little more and spares each
-- task's way through queued, running and succeeded four index writes.
local function has_own_index(state)
  return state == 'failed' or state == 'timed_out' or state == 'cancelled'
    or state == 'dead_lettered'
end

-- Moves a task between the per-state indexes.
local function index_move(prefix, id, score, cutoff, from, to)
  if from == to then
    return
  end
  if from and has_own_index(from) then
    redis.call('ZREM', prefix .. 'index:' .. from, id)
  end
  if has_own_index(to) then
    local key = prefix .. 'index:' .. to
    redis.call('ZADD', key, score, id)
    trim(key, id, cutoff)
  end
end

-- Adds a task to the index of all tasks.
local function index_add(prefix, id, score, cutoff)
  local key = prefix .. 'index'
  redis.call('ZADD', key, score, id)
  trim(key, id, cutoff)
end

-- A small event for whoever follows the task (cheap when nobody listens).
-- Ids and state names need no JSON escaping.
local function publish(prefix, id, state)
  redis.call('PUBLISH', prefix .. 'events:' .. id, '{"id":"' .. id .. '","state":"' .. state .. '"}')
end

-- The answer to an execution that ended after its task was already final
-- (`state`): counted as a duplicate, the record left as it is.
local function count_duplicate(h, ttl, state)
  redis.call('HINCRBY', h, 'duplicates', 1)
  redis.call('EXPIRE', h, ttl)
  return {0, state}
end

-- Writes how an attempt ended: `set` (the fields the caller sets) plus the
-- outcome's result, error and finish (or requeue) time, in one HSET, and at
-- most one HDEL of the stale ones the record has (`had_result`,
-- `had_error`, `had_finished`: what the caller's HMGET found). Then the TTL.
local function write_end(h, ttl, set, new, at, result, err, had_result, had_error, had_finished)
  local del = {}
  if result ~= '' then
    set[#set + 1] = 'result'; set[#set + 1] = result
  elseif had_result then
    del[#del + 1] = 'result'
  end
  if err ~= '' then
    set[#set + 1] = 'error'; set[#set + 1] = err
  elseif had_error then
    del[#del + 1] = 'error'
  end
  if is_final(new) then
    set[#set + 1] = 'finished_at'; set[#set + 1] = at
  else
    -- Back on the queue for a retry.
    set[#set + 1] = 'queued_at'; set[#set + 1] = at
    if had_finished then
      del[#del + 1] = 'finished_at'
    end
  end
  redis.call('HSET', h, unpack(set))
  if #del > 0 then
    redis.call('HDEL', h, unpack(del))
  end
  redis.call('EXPIRE', h, ttl)
end

-- Runs `fn` once per task of a call that carries many (`coalesce.rs`):
-- with KEYS[k] and the `width` arguments of row k, which follow the
-- `shared` arguments every row uses. A row whose writes fail gets an error
-- reply of its own; the other rows still run.
local function rows(fn, shared, width)
  local out = {}
  local a = shared + 1
  for k = 1, #KEYS do
    local ok, reply = pcall(fn, KEYS[k], unpack(ARGV, a, a + width - 1))
    if ok then
      out[k] = reply
    elseif type(reply) == 'table' and reply.err then
      -- An error of redis.call comes as an error reply already.
      out[k] = reply
    else
      out[k] = {err = 'ERR ' .. tostring(reply)}
    end
    a = a + width
  end
  return out
end
