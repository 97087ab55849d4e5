-- Records a worker heartbeat that expires after a TTL, on the server's clock
-- so that workers with skewed clocks agree on who is alive.
--
-- KEYS[1]  the workers hash  KEYS[2]  the workers' expiry times (ZSET)
-- ARGV[1]  worker id         ARGV[2]  WorkerInfo JSON
-- ARGV[3]  TTL in ms
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[3]), ARGV[1])
return 1
