-- Take one message out of a queue's dead-letter set: its id and its body together.
-- KEYS[1] the dead-letter zset (<namespace>:<queue>.XQ), KEYS[2] its bodies (<namespace>:<queue>.XQ.msgs)
-- ARGV[1] the message's redis_message_id
-- Returns 1 when this call removed it, 0 when it was not (or no longer) there.
local removed = redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
return removed
