"""Dramatiq middleware that ties the broker's life cycle to agentq's services."""

from __future__ import annotations

import logging

import dramatiq
from dramatiq.middleware import Middleware

from app import worker_services
from app.dispatch import RUN_DEBUG, RUN_TURN

log = logging.getLogger(__name__)


class RunOutcomes(Middleware):
    """Ends a turn (or admin test run) as `error` when its message dies with retries exhausted."""

    def after_nack(self, broker: dramatiq.Broker, message: dramatiq.Message) -> None:
        """A nack is the message going to the dead-letter queue; its options hold the last traceback."""
        if message.actor_name not in (RUN_TURN, RUN_DEBUG):
            return
        trace = (message.options.get("traceback") or "").strip().splitlines()
        last_error = trace[-1] if trace else "unknown error"
        reason = f"retries exhausted after {message.options.get('retries', 0)} attempts: {last_error}"
        try:
            worker_services.message_died(message.actor_name, int(message.args[0]), reason)
        except Exception:
            log.exception("could not end run %s after its message died; recovery will", message.args)


class WorkerServices(Middleware):
    """Starts the lease keeper's companions (recovery sweep, stop watcher) in each worker process."""

    def after_process_boot(self, broker: dramatiq.Broker) -> None:
        """A forked process must not reuse its parent's database or Redis sockets."""
        worker_services.after_fork()

    def after_worker_boot(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        """Background services start once the worker threads exist."""
        worker_services.start()

    def before_worker_shutdown(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        """Stop sweeping before the threads drain."""
        worker_services.stop()
