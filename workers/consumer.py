"""A worker's Redis consumer: Dramatiq's, waking for work instead of sleeping a backoff.

The Redis broker's consumers have no blocking fetch: an idle consumer sleeps a growing backoff
between looks at its queue. Here a consumer waits instead for one of two wake-ups, and looks at
once: a message sent to its queue (the doorbell, `workers/doorbell.py`: every send publishes the
queue's name, and a listener thread in each worker process wakes the consumers of that queue), or,
when every place is taken (each thread has a turn), a worker thread's ack or nack freeing one
(`RefillingConsumer`), so a thread that finished a turn does not idle next to queued turns (the
latency-bound bench showed a fifth of the threads idle that way). Without a wake-up it looks again
after `AGENTQ_BROKER_POLL_MS` (1 s): the safety net for a missed ring and for messages Dramatiq puts
back without a send (a stopping worker's prefetched ones, a dead worker's). Delay queues (retries
waiting for their backoff, `.DQ`) are not rung and look every second: their messages are not due yet.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import redis
from dramatiq.broker import MessageProxy
from dramatiq.brokers.redis import RedisBroker, _RedisConsumer
from dramatiq.errors import ConnectionClosed

from app.failure_logs import OUTAGE_REPEAT_SECONDS, said_again
from app.outages import REDIS_UNAVAILABLE, in_one_line
from app.setup_problems import setup_problem
from workers.doorbell import Doorbell
from workers.places import SharedPlaces

log = logging.getLogger(__name__)


@contextmanager
def lost_redis_as_connection_closed() -> Iterator[None]:
    """Redis out of reach, hanging past the socket timeout, or refusing every write for a while (at its
    `maxmemory` with `noeviction`, a replica after a failover: `app.outages.REDIS_UNAVAILABLE`), as Dramatiq's
    `ConnectionClosed`, which its threads ride out: an ack or a nack is tried again every five seconds until
    Redis takes it, a requeue at a consumer's close is left for the broker to give back. Dramatiq turns only
    `redis.ConnectionError` into it: to Dramatiq a timeout or a refused write is a bug, which ends a consumer
    thread or drops an ack (its message then held by this worker until it restarts). Other errors (a command
    Redis refuses for good) stay Dramatiq's unexpected ones: tried again, they would hold a thread for ever."""
    try:
        yield
    except REDIS_UNAVAILABLE as error:
        raise ConnectionClosed(error) from error


class RefillingConsumer(_RedisConsumer):
    """Dramatiq's Redis consumer, except that it waits for a wake-up instead of sleeping a backoff, and
    fetches only into the places its process has free (`workers.places`: the consumers of a process's work
    queues share them; a delay queue's consumer, or one made alone, has its own).

    `timeout` (ms) is the longest wait between two looks at the queue. Dramatiq's own consumer sleeps
    its backoff after a look that found nothing; here the waiting is done on a freed place or on the
    doorbell's ring, so a wake-up is never slept through.
    """

    def __init__(self, broker: RedisBroker, queue_name: str, prefetch: int, timeout: int,
                 takes_new: Callable[[], bool], doorbell: Doorbell | None = None,
                 places: SharedPlaces | None = None, unsent_retries: set[str] | None = None) -> None:
        super().__init__(broker, queue_name, prefetch, 1)
        self._unsent_retries = unsent_retries if unsent_retries is not None else set()
        self._wait_seconds = timeout / 1000
        self._rung = threading.Event()
        self._doorbell = doorbell
        self._takes_new = takes_new
        self._places = places or SharedPlaces()
        self._places.join(self)
        if doorbell is not None:
            doorbell.listen(queue_name, self._rung)

    def ack(self, message: MessageProxy) -> None:
        """A failed delivery whose retry could not be sent (`DoorbellRedisBroker.enqueue`: Redis refused it past the
        retry's hand-over, or this worker stopped meanwhile) keeps its message unacknowledged: Redis gives it
        back to its queue once this worker has stopped, where an ack would have written the run off until the
        recovery sweep's stale-pending rule; should the sweep send the run first, the run's claim lets one run it."""
        try:
            if message.message_id in self._unsent_retries:
                self._unsent_retries.discard(message.message_id)
                self.queued_message_ids.discard(message.message_id)
                return
            with lost_redis_as_connection_closed():
                super().ack(message)
        finally:
            self._places.freed()

    def nack(self, message: MessageProxy) -> None:
        try:
            with lost_redis_as_connection_closed():
                super().nack(message)
        finally:
            self._places.freed()

    def requeue(self, messages: Iterable[MessageProxy]) -> None:
        with lost_redis_as_connection_closed():
            super().requeue(messages)

    def __next__(self) -> MessageProxy | None:
        """A message, or None (Dramatiq's "nothing yet") after waiting for a place or a message; no new fetch
        while the process takes none (it is stopping, or cut off from its database): what it still holds goes
        to its threads."""
        if not self.message_cache and not self._fetched():
            return None
        with lost_redis_as_connection_closed():
            return super().__next__()  # from the cache the fetch filled: no look at Redis

    def _fetched(self) -> bool:
        """Fetch as many messages as there are free places into the cache; False, after waiting for a freed
        place (none free, or none taken now) or for a ring (the queue was empty), when none came."""
        with self._places.changed:
            free = self.prefetch - self._places.taken() if self._takes_new() else 0
            if free <= 0:
                self._places.changed.wait(self._wait_seconds)
                return False
            refused: redis.RedisError | None = None
            try:
                self.message_cache = self.broker.do_fetch(self.queue_name, free)
            except REDIS_UNAVAILABLE as error:
                refused = error
        if refused is not None:
            self._ride_out(refused)
            return False
        if self.message_cache:
            return True
        self._rung.wait(self._wait_seconds)
        self._rung.clear()
        return False

    def _ride_out(self, refused: redis.RedisError) -> None:
        """A fetch Redis refused or did not answer: look again after the usual wait, keeping what the consumer
        holds. Dramatiq's own way (its thread's CRITICAL line, then a new consumer a second later) dropped the
        retries a delay queue's consumer held until their backoff was over: no longer in its memory, still
        in this worker's unacknowledged set, which Redis gives back only once the worker has stopped, they
        waited for the recovery sweep's stale-pending rule (five minutes by default). Said in one line a queue
        and process (`app.failure_logs.said_again`)."""
        if (since := said_again(log.name, f"the fetch of {self.queue_name}", "fetches")) is not None:
            problem = setup_problem(refused)  # a password changed under a running worker
            log.warning("the consumer of %s could not fetch (%s): %s; it looks again every %g s and keeps the "
                        "messages it holds, said at most every %g s%s", self.queue_name, in_one_line(refused),
                        problem.step if problem else "Redis is out of reach or refuses writes", self._wait_seconds,
                        OUTAGE_REPEAT_SECONDS, since)
        time.sleep(self._wait_seconds)

    def close(self) -> None:
        self._places.leave(self)
        if self._doorbell is not None:
            self._doorbell.forget(self.queue_name, self._rung)
        super().close()
