-- Free a turn's lock and slot, but only if the lock is still the caller's.
-- KEYS[1] conversation lock, KEYS[2] the user's slot set, KEYS[3] (an ended turn's only) its stop flag, dropped
-- whoever holds the lock; ARGV: owner token, conversation id
if KEYS[3] then
  redis.call('DEL', KEYS[3])
end
local owner = redis.call('GET', KEYS[1])
if owner and owner ~= ARGV[1] then
  return 0
end
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[2])
return 1
