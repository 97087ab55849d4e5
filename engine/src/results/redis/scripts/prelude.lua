-- Shared by every ClaudeCluster store script (prepended by the Rust side).
--
-- Key names are derived from the key prefix inside the scripts, because the
-- keys a transition touches (the state indexes, the idempotency key) depend on
-- what is stored. That needs a single Redis primary (with replicas or
-- Sentinel), not Redis Cluster.

local FINAL = {
  succeeded = true, failed = true, timed_out = true,
  cancelled = true, dead_lettered = true,
}

-- Moves a task between the per-state indexes and trims the target index of
-- entries older than the record TTL, so indexes stay bounded without a
-- sweeper process.
local function index_move(prefix, id, score, cutoff, from, to)
  if from and from ~= to then
    redis.call('ZREM', prefix .. 'index:' .. from, id)
  end
  local key = prefix .. 'index:' .. to
  redis.call('ZADD', key, score, id)
  redis.call('ZREMRANGEBYSCORE', key, '-inf', '(' .. cutoff)
end

-- Adds a task to the index of all tasks, trimmed the same way.
local function index_add(prefix, id, score, cutoff)
  local key = prefix .. 'index'
  redis.call('ZADD', key, score, id)
  redis.call('ZREMRANGEBYSCORE', key, '-inf', '(' .. cutoff)
end

-- A small event for whoever follows the task (cheap when nobody listens).
local function publish(prefix, id, state)
  redis.call('PUBLISH', prefix .. 'events:' .. id, cjson.encode({id = id, state = state}))
end
