-- Extend (or re-take) a turn's lock and slot while its owner works on it.
-- KEYS[1] conversation lock, KEYS[2] the user's slot set, KEYS[3..] (a new turn's hand-over only) keys of its id
-- left by a database made again, whose ids start over: dropped before the turn is sent, whoever holds the lock
-- ARGV: owner token, now ms, lease ms, conversation id, a previous owner handing over (or '')
-- Returns 1 when the lock is ours (renewed, handed over or re-taken after it expired), 0 when another holds it.
for i = 3, #KEYS do
  redis.call('DEL', KEYS[i])
end
local owner = redis.call('GET', KEYS[1])
if owner and owner ~= ARGV[1] and owner ~= ARGV[5] then
  return 0
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[3])
redis.call('ZADD', KEYS[2], tonumber(ARGV[2]) + tonumber(ARGV[3]), ARGV[4])
local ttl = redis.call('PTTL', KEYS[2])
if ttl < tonumber(ARGV[3]) then
  redis.call('PEXPIRE', KEYS[2], ARGV[3])
end
return 1
