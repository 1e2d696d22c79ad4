-- Take a conversation's lock and one of its user's slots, atomically.
-- KEYS[1] conversation lock, KEYS[2] the user's slot set (member: conversation id, score: expiry ms)
-- ARGV: owner token, now ms, lease ms, per-user limit, conversation id
-- Returns {1} on success, {-1, owner} when the conversation is locked, {-2} at the user's limit.
local owner = redis.call('GET', KEYS[1])
if owner then
  return {-1, owner}
end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', ARGV[2])
if not redis.call('ZSCORE', KEYS[2], ARGV[5]) and redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[4]) then
  return {-2}
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[3])
redis.call('ZADD', KEYS[2], tonumber(ARGV[2]) + tonumber(ARGV[3]), ARGV[5])
redis.call('PEXPIRE', KEYS[2], ARGV[3])
return {1}
