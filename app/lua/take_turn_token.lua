-- Take one of a user's turn tokens: a bucket of `capacity` tokens, refilled at `capacity` a minute.
-- KEYS[1] the user's bucket (a hash: tokens, at ms)
-- ARGV: capacity
-- Returns {1} when a token was taken, {0, ms until one is} otherwise. Redis's own clock, so that every API
-- process counts alike; a bucket left alone for a minute is full again, and expires.
local capacity = tonumber(ARGV[1])
local per_ms = capacity / 60000
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local bucket = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens, at = tonumber(bucket[1]), tonumber(bucket[2])
if tokens == nil or at == nil then
  tokens, at = capacity, now
end
tokens = math.min(capacity, tokens + math.max(0, now - at) * per_ms)
if tokens < 1 then
  return {0, math.ceil((1 - tokens) / per_ms)}
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens - 1), 'at', now)
redis.call('PEXPIRE', KEYS[1], 60000)
return {1}
