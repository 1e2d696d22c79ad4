-- Take one message out of a queue's dead-letter set: its id and its body together.
-- KEYS[1] the dead-letter zset (<namespace>:<queue>.XQ), KEYS[2] its bodies (<namespace>:<queue>.XQ.msgs)
-- ARGV[1] the message's redis_message_id
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
