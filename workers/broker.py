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
"""

from __future__ import annotations

import threading

import dramatiq
import redis
from dramatiq.brokers.redis import RedisBroker
from dramatiq.middleware import AgeLimit, Callbacks, Pipelines, Retries

from app.config import get_settings
from workers.middleware import RunOutcomes, WorkerServices

_lock = threading.Lock()
_installed: RedisBroker | None = None


def build_broker() -> RedisBroker:
    settings = get_settings()
    client = redis.Redis(connection_pool=redis.BlockingConnectionPool.from_url(
        settings.redis_url, max_connections=1000, timeout=10, socket_timeout=30, socket_connect_timeout=5))
    broker = RedisBroker(
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
