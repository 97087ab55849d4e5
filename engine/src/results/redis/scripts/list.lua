-- One page of an index, newest first, after a cursor.
--
-- KEYS[1]  the index (all tasks, or one state's)
-- ARGV[1]  highest score to include ('+inf', or the cursor's score)
-- ARGV[2]  the cursor's task id, '' for the first page
-- ARGV[3]  page size         ARGV[4]  index cutoff (ms)
--
-- Returns up to page size + 1 flat {id, score, ...} pairs (one more than asked
-- tells the caller there is a next page). Entries at the cursor's score sort
-- by id, descending, so the ones at or above the cursor's id were on earlier
-- pages.
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. ARGV[4])

local max, after, limit = ARGV[1], ARGV[2], tonumber(ARGV[3])
local max_score = tonumber(max)
local want = 2 * (limit + 1)
local out = {}
local offset, chunk = 0, limit + 1
while true do
  local items = redis.call('ZRANGE', KEYS[1], max, '-inf', 'BYSCORE', 'REV',
    'LIMIT', offset, chunk, 'WITHSCORES')
  for i = 1, #items, 2 do
    local id, score = items[i], items[i + 1]
    if after == '' or tonumber(score) < max_score or id < after then
      out[#out + 1] = id
      out[#out + 1] = score
      if #out >= want then
        return out
      end
    end
  end
  if #items < 2 * chunk then
    return out
  end
  offset = offset + chunk
end
