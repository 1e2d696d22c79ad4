"""Waking idle consumers when a message is sent to their queue, instead of leaving them to poll.

Dramatiq's Redis broker has no blocking fetch: an idle consumer looks at its queue, sleeps a growing
backoff and looks again. A turn sent to an idle worker therefore waited for that worker's next look
(a lone user's turn, looks capped at 100 ms: 40-53 ms at the median from its POST to the model's
request, against 21-23 ms with the ring; `make bench`, `pickup`), and idle workers kept Redis busy
with looks that found nothing. Here every send also
publishes the queue's name on one pub/sub channel of the broker's namespace, and one thread in each
worker process wakes that process's consumers of the queue, which look at once.

Every listening process hears every ring, and each of its idle consumers of that queue looks: one
of them gets the message, the others find nothing. With many mostly idle worker processes that is
one empty look each per send, which is what each of them spent every 100 ms polling before.

The ring is a hint, never a guarantee: a send never fails because of it, and a ring missed (the
listener reconnecting, Redis restarting) costs at most one poll interval (`AGENTQ_BROKER_POLL_MS`),
which is how long an idle consumer waits between two looks without one.
"""

from __future__ import annotations

import logging
import threading
import time

import redis
from redis.client import Pipeline

log = logging.getLogger(__name__)

RECONNECT_SECONDS = 1.0
QUIET_SECONDS = 15.0
"""A listener that heard nothing from Redis for this long pings it, so a dead connection is noticed."""
PONG_SECONDS = 5.0
RESUBSCRIBE_SECONDS = 300.0
"""A subscription this old is made again at its next quiet moment (no ring for `QUIET_SECONDS`). After a
failover behind an address that moved (a managed Redis's DNS name, a proxy), the listener's connection stays
on the old primary, now a replica, which takes SUBSCRIBE and PING: when it does not replicate the new
primary, it hears no ring, and only a new connection reaches the new one. Rings missed meanwhile cost the
poll interval each, as any missed ring does."""


def channel_name(namespace: str) -> str:
    return f"{namespace}:doorbell"


class Doorbell:
    """One channel per broker namespace; `ring_in` on the sending side, `listen` on the consuming side."""

    def __init__(self, client: redis.Redis, channel: str) -> None:
        self._client = client
        self.channel = channel
        self._lock = threading.Lock()
        self._bells: dict[str, set[threading.Event]] = {}
        self._listener: threading.Thread | None = None
        self._closed = threading.Event()
        self._lost = False

    def ring_in(self, client: redis.Redis | Pipeline, queue_name: str) -> None:
        """The ring as one more command of `client`, a pipeline the caller sends with its own commands."""
        client.publish(self.channel, queue_name)

    def listen(self, queue_name: str, bell: threading.Event) -> None:
        """Set `bell` whenever a message is sent to `queue_name`; starts this process's listener once."""
        with self._lock:
            self._bells.setdefault(queue_name, set()).add(bell)
            if not self._closed.is_set() and (self._listener is None or not self._listener.is_alive()):
                self._listener = threading.Thread(target=self._listen, name="doorbell", daemon=True)
                self._listener.start()

    def forget(self, queue_name: str, bell: threading.Event) -> None:
        with self._lock:
            self._bells.get(queue_name, set()).discard(bell)

    def close(self) -> None:
        """Stop listening (the broker is closing); the listener lets its connection go within a second."""
        self._closed.set()

    def _wake(self, queue_name: str | None) -> None:
        """Wake the consumers of one queue, or of every queue (`None`: rings may have been missed)."""
        with self._lock:
            bells = [b for name, group in self._bells.items() if queue_name in (None, name) for b in group]
        for bell in bells:
            bell.set()

    def _listen(self) -> None:
        """Subscribe, wake every consumer once the subscription is live, then wake them by queue.

        Any failure (Redis gone, a connection that stopped answering a ping) is logged once per outage
        and the listener subscribes again; meanwhile consumers look at their queues on their timer."""
        while not self._closed.is_set():
            pubsub = self._client.pubsub()
            try:
                pubsub.subscribe(self.channel)
                self._relay(pubsub)
            except Exception as exc:
                if not self._lost and not self._closed.is_set():
                    log.warning("doorbell listener lost Redis (%s); idle workers poll until it is back", exc)
                self._lost = True
                self._closed.wait(RECONNECT_SECONDS)
            finally:
                pubsub.close()

    def _relay(self, pubsub: redis.client.PubSub) -> None:
        """Relay rings until the connection fails, or the subscription is due to be made again (returns)."""
        subscribed = heard = time.monotonic()
        pinged: float | None = None
        while not self._closed.is_set():
            message = pubsub.get_message(timeout=RECONNECT_SECONDS)
            now = time.monotonic()
            if message is None:
                if now - subscribed > RESUBSCRIBE_SECONDS and now - heard > QUIET_SECONDS:
                    return
                if pinged is not None and now - pinged > PONG_SECONDS:
                    raise redis.ConnectionError(f"no answer to a ping within {PONG_SECONDS:g}s")
                if pinged is None and now - heard > QUIET_SECONDS:
                    pubsub.ping()
                    pinged = now
                continue
            heard, pinged = now, None
            if message["type"] == "subscribe":
                if self._lost:
                    log.info("doorbell listener is back on Redis")
                    self._lost = False
                self._wake(None)
            elif message["type"] == "message":
                self._wake(message["data"].decode(errors="replace"))
