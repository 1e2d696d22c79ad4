"""Dramatiq middleware that ties the broker's life cycle to agentq's services."""

from __future__ import annotations

import threading
from types import ModuleType

import dramatiq
from dramatiq.middleware import Middleware, SkipMessage

from app.logging_setup import configure_logging
from workers.process_signals import stop_with_the_parent, treat_a_repeated_stop_as_one


def _worker() -> ModuleType:
    """`app.worker_services`, loaded by the hooks only a worker process runs: a process that only sends (the
    API, the command line) installs this middleware too, and need not load the runners and the openai SDK
    they bring (a second of CPU at every start of a process)."""
    from app import worker_services

    return worker_services


def _outcomes() -> ModuleType:
    """`app.message_outcomes`, loaded by the hooks only a worker process runs, as `_worker` is."""
    from app import message_outcomes

    return message_outcomes


class DeliveryLogContext(Middleware):
    """Dramatiq's own lines about a delivery (its failure, its retry) name the turn, as agentq's lines do.
    First in the broker's list: its `before` hook runs before the others' and its `after` hooks after theirs
    (Dramatiq calls those in reverse), so it spans the Retries middleware's lines too."""

    def before_process_message(self, broker: dramatiq.Broker, message: dramatiq.MessageProxy) -> None:
        _outcomes().delivery_started(message)

    def after_process_message(self, broker: dramatiq.Broker, message: dramatiq.MessageProxy, *,
                              result: object = None, exception: BaseException | None = None) -> None:
        _outcomes().delivery_ended()

    def after_skip_message(self, broker: dramatiq.Broker, message: dramatiq.MessageProxy) -> None:
        _outcomes().delivery_ended()


class RunOutcomes(Middleware):
    """Ends a turn (or admin test run) when its message dies with retries exhausted: `error`, or `cancelled`
    for a turn whose stop was accepted."""

    def after_process_message(self, broker: dramatiq.Broker, message: dramatiq.MessageProxy, *,
                              result: object = None, exception: BaseException | None = None) -> None:
        """A run given up (`RunGivenUp`): the reason and the retry count its dead letter shows, which Dramatiq
        writes only for the failures it retries (`app.message_outcomes.delivery_failed`)."""
        if exception is not None:
            _outcomes().delivery_failed(message, exception)

    def after_nack(self, broker: dramatiq.Broker, message: dramatiq.MessageProxy) -> None:
        """A nack is the message going to the dead-letter queue; its options hold the last traceback."""
        _outcomes().message_died(message)


class WorkerServices(Middleware):
    """Starts the lease keeper's companions (the recovery sweep, the presence loop; the stop check starts with
    the first run held) in each worker process, and at shutdown stops them and hands another worker the runs
    its threads are given, and those still calling their models when the grace runs out (a run writing its
    end is left to finish)."""

    def after_process_boot(self, broker: dramatiq.Broker) -> None:
        """In each forked process: fresh sockets, agentq's log format, a stop with the group's parent; and, in
        the main thread before any worker thread takes a run, a repeated SIGTERM treated as one (Dramatiq set
        its handlers just before this hook; set any later, a stop sent to the process group while the
        database pool opened killed the process with its first runs in flight)."""
        _worker().after_fork()
        configure_logging()
        stop_with_the_parent()
        if threading.current_thread() is threading.main_thread():
            treat_a_repeated_stop_as_one(_worker().stop_fetching)

    def before_worker_boot(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        """The database pool opens before the consumers fetch: a process that boots while its database is out
        of reach fetches nothing until it answers (`app.database_reach`)."""
        _worker().open_pools(worker.worker_threads)

    def after_worker_boot(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        """Background services start once the worker threads exist."""
        _worker().start(worker.worker_threads)

    def before_worker_shutdown(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        """Stop sweeping and fetching before the threads drain, so a stopping worker takes no new run."""
        _worker().stop()

    def after_worker_shutdown(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        """The threads had the shutdown grace: the runs still calling their models are handed to another worker
        now, and those writing their ends are given a moment to finish (`hand_back_unfinished`); then the process
        leaves the workers' list (`app.worker_presence`)."""
        try:
            _worker().hand_back_unfinished()
        finally:
            _worker().leave()

    def before_process_message(self, broker: dramatiq.Broker, message: dramatiq.MessageProxy) -> None:
        """A run that reaches an idle thread after SIGTERM goes back to the queue for another worker."""
        if _worker().hand_back_if_draining(message):
            raise SkipMessage(f"worker shutting down; {message.actor_name}{tuple(message.args)} handed back")
