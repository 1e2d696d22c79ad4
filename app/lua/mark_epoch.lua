-- Set the epoch key only if the sweep's mark survived it: had Redis lost its data again while the sweep
-- re-sent the pending runs, the mark would be gone with what it sent, and the next sweep must send again.
-- KEYS[1] the sweep's mark, KEYS[2] the epoch key; ARGV[1] the epoch's value (this Redis run, and when)
if redis.call('DEL', KEYS[1]) == 1 then
  redis.call('SET', KEYS[2], ARGV[1])
  return 1
end
return 0
