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

    def after_process_message(self, broker: dramatiq.Broker, message: dramatiq.Message, *,
                              result: object = None, exception: BaseException | None = None) -> None:
        """Runs after Retries, which has marked the message failed if it will not be retried."""
        if exception is None or not message.failed or message.actor_name not in (RUN_TURN, RUN_DEBUG):
            return
        reason = f"retries exhausted: {type(exception).__name__}: {exception}"
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
