"""The Dramatiq broker every process uses: the Redis broker with agentq's middleware.

`install_broker()` is the one bootstrap for sending and receiving; the web app, the worker
processes and the CLI call it, and it connects to nothing until the first message is sent.

Middleware chosen, and why:
- Retries (backoff from `AGENTQ_MIN_BACKOFF_MS` to `AGENTQ_MAX_BACKOFF_MS`, `AGENTQ_MAX_RETRIES`):
  unexpected failures (database or Redis errors, bugs) are retried; exhausted ones are dead letters.
- RunOutcomes: a message that died (nacked into the dead-letter queue) ends its run at once: `error`, or
  `cancelled` for a turn whose stop was accepted.
- DeliveryLogContext: Dramatiq's own lines about a delivery carry its turn's id (and a failure an outage
  caused is one warning line, not an error with a traceback: `app.logging_setup.OutageFailureFilter`).
- WorkerServices: the lease keeper and the recovery sweep live in every worker process.
- No TimeLimit: a run is bounded by the agent's own timeout per attempt (see app.llm_client), which
  Dramatiq's asynchronous exception could only break in the middle of a database write.
- No ShutdownNotifications: on SIGTERM running turns finish within the shutdown grace period.
- No AgeLimit, Callbacks or Pipelines (Dramatiq's defaults): no message carries their options; the recovery
  sweep, not a message's age, decides what is abandoned (a turn pending past `AGENTQ_MAX_PENDING_SECONDS`).

Its consumers wait for a wake-up instead of sleeping a backoff (`workers.consumer`); its sends ring the doorbell
that wakes them (`workers/doorbell.py`) and leave a receipt for the recovery sweep.
"""

from __future__ import annotations

import logging
import os
import threading
import uuid
from typing import Any

import dramatiq
import redis
from dramatiq import Message
from dramatiq.broker import Consumer
from dramatiq.brokers.redis import RedisBroker
from dramatiq.common import dq_name
from dramatiq.middleware import Retries

from app.config import get_settings
from app.deliveries import retry_failed, send_retry
from app.dispatch import leave_receipt
from app.redis_client import CONNECTION_OPTIONS, leaving_replicas
from workers.consumer import RefillingConsumer, lost_redis_as_connection_closed
from workers.doorbell import Doorbell, channel_name
from workers.middleware import DeliveryLogContext, RunOutcomes, WorkerServices
from workers.places import SharedPlaces

log = logging.getLogger(__name__)

_lock = threading.Lock()
_installed: RedisBroker | None = None


def _is_retry(message: Message) -> bool:
    """Whether a send is a retry's: Dramatiq's Retries middleware counts them in the message's options, both
    when it sends one to wait out its backoff and when the delay queue's consumer moves it to its queue once
    due; a send of the API, the recovery sweep or a requeue is a fresh message without the count."""
    return "retries" in message.options


def _stopping() -> bool:
    """Whether this worker process is shutting down (only a worker sends retries: a sender does not load its
    services)."""
    from app import worker_services

    return worker_services.draining.is_set()


class DoorbellRedisBroker(RedisBroker):
    """The Redis broker whose sends ring the doorbell and whose consumers wake up for them."""

    def __init__(self, *, poll_ms: int, **options: Any) -> None:
        super().__init__(**options)
        self.poll_ms = poll_ms
        self.doorbell = Doorbell(self.client, channel_name(self.namespace))
        self.places = SharedPlaces()
        self.unsent_retries: set[str] = set()
        """The failed deliveries whose retry Redis did not take in time: their consumer leaves their messages
        unacknowledged (`workers.consumer.RefillingConsumer.ack`)."""

    def enqueue(self, message: Message, *, delay: int | None = None) -> Message:
        """A Redis out of reach is `ConnectionClosed` here too (`lost_redis_as_connection_closed`): the delayed
        queue's consumer thread sends each retry that comes due through this, and a refused connection there was
        logged by Dramatiq as a CRITICAL unexpected error with its traceback, not as the lost connection it is.
        A retry's send (the Retries middleware's, and the delay queue consumer's once it is due) waits an outage
        out (`app.deliveries.send_retry`); any other send fails at once, its run left to the recovery sweep."""
        def send() -> Message:
            with lost_redis_as_connection_closed():
                return super(DoorbellRedisBroker, self).enqueue(message, delay=delay)

        if not _is_retry(message):
            sent = send()
        else:
            failed_at = message.options.get("requeue_timestamp")
            try:
                sent = send_retry(send, what=f"the retry of {message.actor_name}{tuple(message.args)}",
                                  failed_at_ms=failed_at if isinstance(failed_at, int) else None, stopping=_stopping)
            except Exception:
                if delay is not None:  # the Retries middleware's send: the failed delivery's message is still held
                    self.unsent_retries.add(message.message_id)
                raise
        if delay is None:
            self._announce(sent)
        return sent

    def _announce(self, sent: Message) -> None:
        """In one round trip after a send: the doorbell's ring, and the send's receipt
        (`app.dispatch.leave_receipt`), which tells the recovery sweep that this message reached Redis. Both
        are hints: without the ring a worker finds the message at its next look; without the receipt the
        sweep sends the run once more, and its claim runs it once all the same."""
        pipe = self.client.pipeline(transaction=False)
        self.doorbell.ring_in(pipe, sent.queue_name)
        leave_receipt(pipe, sent.message_id)
        try:
            pipe.execute()
        except redis.RedisError:
            log.debug("could not ring the doorbell of %s or leave the receipt of %s", sent.queue_name,
                      sent.message_id, exc_info=True)

    def close(self) -> None:
        self.doorbell.close()
        super().close()

    def consume(self, queue_name: str, prefetch: int = 1, timeout: int = 5000) -> Consumer:
        """A work queue's consumer is woken by the doorbell and looks at least every `poll_ms`; a delay
        queue's looks every `timeout` (Dramatiq's worker timeout, 1 s): nothing there is due yet. A work queue's
        consumer fetches nothing while its process is cut off from its database (`app.database_reach`); a
        delay queue's still does, since it only moves retries that come due to their queue, for any worker."""
        from app import worker_services  # only a worker consumes: senders do not load its services

        if queue_name == dq_name(queue_name):
            return RefillingConsumer(self, queue_name, prefetch, timeout, worker_services.moves_retries)
        return RefillingConsumer(self, queue_name, prefetch, self.poll_ms, worker_services.takes_new_runs,
                                 self.doorbell, self.places, self.unsent_retries)


def broker_options() -> dict[str, Any]:
    """What agentq gives Dramatiq's Redis broker: its Redis pool, namespace, heartbeat and middleware. The pool's
    connections are made as agentq's own (`app.redis_client.CONNECTION_OPTIONS`, `leaving_replicas`); at its
    limit a caller waits up to 10 s for a connection another thread gives back, where a plain pool would fail
    the send at once."""
    settings = get_settings()
    client = redis.Redis(connection_pool=leaving_replicas(redis.BlockingConnectionPool.from_url(
        settings.redis_url, timeout=10, **CONNECTION_OPTIONS)))
    return {
        "client": client,
        "namespace": settings.broker_namespace,
        "heartbeat_timeout": settings.broker_heartbeat_ms,
        "maintenance_chance": settings.broker_maintenance_chance,
        "middleware": [
            DeliveryLogContext(),
            Retries(retry_when=retry_failed, min_backoff=settings.min_backoff_ms, max_backoff=settings.max_backoff_ms),
            RunOutcomes(),
            WorkerServices(),
        ],
    }


def build_broker() -> RedisBroker:
    return DoorbellRedisBroker(poll_ms=get_settings().broker_poll_ms, **broker_options())


def _become_a_broker_of_its_own() -> None:
    """A forked process is a worker of its own to Redis: its heartbeat, and the messages it holds (which
    Dramatiq gives back to the queue once that heartbeat stops). The broker is installed before the fork
    (`workers.group.preload`), so every process would otherwise share one id: a dead process's messages
    would stay held while its siblings kept the id's heartbeat alive."""
    if _installed is not None:
        _installed.broker_id = str(uuid.uuid4())


os.register_at_fork(after_in_child=_become_a_broker_of_its_own)


def install_broker() -> RedisBroker:
    global _installed
    with _lock:
        if _installed is None:
            _installed = build_broker()
            dramatiq.set_broker(_installed)
    return _installed
