-- Mark when Redis began holding the workers' list, by Redis's own clock: set by the first publish into a Redis
-- without the mark (a new server, a flush, a failover to a replica that lacks it), and kept after.
-- KEYS[1] the mark
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('SET', KEYS[1], redis.call('TIME')[1])
end
return 1
