-- Drops expired workers and returns the WorkerInfo JSON of the live ones.
--
-- KEYS[1]  the workers hash  KEYS[2]  the workers' expiry times (ZSET)
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

local expired = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now)
for _, id in ipairs(expired) do
  redis.call('HDEL', KEYS[1], id)
  redis.call('ZREM', KEYS[2], id)
end

local out = {}
local live = redis.call('ZRANGEBYSCORE', KEYS[2], '(' .. now, '+inf')
for _, id in ipairs(live) do
  local info = redis.call('HGET', KEYS[1], id)
  if info then
    out[#out + 1] = info
  end
end
return out
