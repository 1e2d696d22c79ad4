"""Sending work to the workers: the queue and actor names, and the one call that enqueues.

The application never imports the actors; it sends a message by name through the broker that
`workers.broker.install_broker()` set up for this process. Every caller sends only after its
transaction committed, and a send that fails is not an error for the caller: recovery re-sends
whatever stayed pending (see `app.recovery`).
"""

from __future__ import annotations

import logging

import dramatiq
from dramatiq import Message

from app.config import get_settings

log = logging.getLogger(__name__)

TURNS_QUEUE = "turns"
DEBUG_QUEUE = "debug"
RUN_TURN = "run_turn"
RUN_DEBUG = "run_debug_run"
QUEUES = (TURNS_QUEUE, DEBUG_QUEUE)


def broker_key(queue: str, suffix: str = "") -> str:
    """The Redis broker's key for a queue: `<namespace>:<queue>` plus `.DQ` (delayed) or `.XQ` (dead), each
    with `.msgs` for the bodies; what operators read, since Dramatiq 2 has no API for these queues."""
    return f"{get_settings().broker_namespace}:{queue}{suffix}"


def enqueue(queue: str, actor: str, ident: int) -> bool:
    """Send run `ident` to `actor` on `queue` (`app.run_kinds` says which); False when the broker could not
    take it, which is logged here and handled by the caller's outbox."""
    message = Message(queue_name=queue, actor_name=actor, args=(ident,), kwargs={}, options={})
    try:
        dramatiq.get_broker().enqueue(message)
    except Exception:
        log.warning("could not enqueue %s(%s); recovery will send it", actor, ident, exc_info=True)
        return False
    return True
