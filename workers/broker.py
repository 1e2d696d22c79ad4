"""The Dramatiq broker every process uses: the Redis broker with agentq's middleware.

`install_broker()` is the one bootstrap for sending and receiving; the web app, the worker
processes and the CLI call it, and it connects to nothing until the first message is sent.

Middleware chosen, and why:
- Retries (backoff from `AGENTQ_MIN_BACKOFF_MS` to `AGENTQ_MAX_BACKOFF_MS`, `AGENTQ_MAX_RETRIES`):
  unexpected failures (database or Redis errors, bugs) are retried; exhausted ones are dead letters.
- RunOutcomes: a message that died (nacked into the dead-letter queue) ends its run as `error` at once.
- WorkerServices: the lease keeper and the recovery sweep live in every worker process.
- No TimeLimit: a run is bounded by the agent's own timeout per attempt (see app.llm_client), which
  Dramatiq's asynchronous exception could only break in the middle of a database write.
- No ShutdownNotifications: on SIGTERM running turns finish within the shutdown grace period.

The Redis broker's consumers have no blocking fetch: a consumer whose queue was empty, or whose
threads were all busy, sleeps with a growing backoff capped by the worker timeout (1 s by default)
before it looks again, so a turn could sit in Redis for up to a second next to a free thread. The
cap here is `POLL_CAP_MS` (bench: 1 s waits on 2 x 100 threads went from 0.58 to 0.95 efficiency);
an idle work-queue consumer then makes ten small Redis calls a second (measured: about 20 ms of
CPU a second for a two-process worker). A consumer whose places are all taken (every thread has a
turn) does not poll at all: it waits for a worker thread to ack or nack, and fetches at once
(`RefillingConsumer`), so a thread that finished a turn does not idle for a backoff next to
queued turns (the latency-bound bench showed a fifth of the threads idle that way).
"""

from __future__ import annotations

import threading

import dramatiq
import redis
from dramatiq.broker import Consumer, MessageProxy
from dramatiq.brokers.redis import RedisBroker, _RedisConsumer
from dramatiq.middleware import AgeLimit, Callbacks, Pipelines, Retries

from app.config import get_settings
from workers.middleware import RunOutcomes, WorkerServices

_lock = threading.Lock()
_installed: RedisBroker | None = None

POLL_CAP_MS = 100
"""Longest sleep of a consumer between two fetches, in milliseconds."""


class RefillingConsumer(_RedisConsumer):
    """Dramatiq's Redis consumer, except that with every place taken it waits for one to be freed."""

    def __init__(self, broker: RedisBroker, queue_name: str, prefetch: int, timeout: int) -> None:
        super().__init__(broker, queue_name, prefetch, timeout)
        self._freed = threading.Event()

    def ack(self, message: MessageProxy) -> None:
        try:
            super().ack(message)
        finally:
            self._freed.set()

    def nack(self, message: MessageProxy) -> None:
        try:
            super().nack(message)
        finally:
            self._freed.set()

    def __next__(self) -> MessageProxy | None:
        """None (Dramatiq's "nothing yet") after waiting, at most the timeout, for a thread to free a place."""
        if self.message_cache or self.outstanding_message_count < self.prefetch:
            return super().__next__()
        self._freed.wait(self.timeout / 1000)
        self._freed.clear()
        return None


class PromptRedisBroker(RedisBroker):
    """The Redis broker whose consumers of work queues look for messages at least every `POLL_CAP_MS`."""

    @property
    def consumer_class(self) -> type[RefillingConsumer]:
        return RefillingConsumer

    def consume(self, queue_name: str, prefetch: int = 1, timeout: int = 5000) -> Consumer:
        """Dramatiq passes its worker timeout as `timeout`, which only bounds the consumer's idle backoff.

        Delay queues (retries waiting for their backoff, `.DQ`) keep Dramatiq's pace: nothing there is urgent.
        """
        if not queue_name.endswith(".DQ"):
            timeout = min(timeout, POLL_CAP_MS)
        return super().consume(queue_name, prefetch, timeout)


def build_broker() -> RedisBroker:
    settings = get_settings()
    client = redis.Redis(connection_pool=redis.BlockingConnectionPool.from_url(
        settings.redis_url, max_connections=1000, timeout=10, socket_timeout=30, socket_connect_timeout=5))
    broker = PromptRedisBroker(
        client=client,
        namespace=settings.broker_namespace,
        heartbeat_timeout=settings.broker_heartbeat_ms,
        maintenance_chance=settings.broker_maintenance_chance,
        middleware=[
            AgeLimit(),
            Callbacks(),
            Pipelines(),
            Retries(max_retries=settings.max_retries, min_backoff=settings.min_backoff_ms,
                    max_backoff=settings.max_backoff_ms),
            RunOutcomes(),
            WorkerServices(),
        ],
    )
    return broker


def install_broker() -> RedisBroker:
    global _installed
    with _lock:
        if _installed is None:
            _installed = build_broker()
            dramatiq.set_broker(_installed)
    return _installed
