"""Sending work to the workers: the one call that enqueues (the queue and actor names are `app.queues`).

The application never imports the actors; it sends a message by name through the broker that
`workers.broker.install_broker()` set up for this process. Every caller sends only after its
transaction committed, and a send that fails is not an error for the caller: recovery re-sends
whatever stayed pending (see `app.recovery`).

A send that goes with an outbox mark (the `enqueued_at` its caller just wrote) is named after it
(`message_id`), and the broker leaves a receipt of that name in Redis (`receipt_key`) with the doorbell's
ring. A run still pending a little after its mark, without a receipt, was committed by a process that
died before its send: the recovery sweep sends it within seconds, instead of waiting for
`AGENTQ_STALE_PENDING_SECONDS`, which it must for a run whose message waits in a long queue.
"""

from __future__ import annotations

import logging
import math
from datetime import UTC, datetime, timedelta
from typing import Any

import dramatiq
from dramatiq import Message
from redis.client import Pipeline

from app.broker_keys import namespaced
from app.config import get_settings
from app.failure_logs import warn_of_sparingly
from app.logging_setup import logged_request_id
from app.models.base import as_utc

log = logging.getLogger(__name__)

Delivered = dramatiq.Message[Any] | dramatiq.MessageProxy
"""A message as the broker hands it to middleware (a proxy of it) or to an actor."""


REQUEST_ID_OPTION = "request_id"
"""The message option that carries the API request that sent it (`web.request_ids`), for the worker's lines; a
send of the recovery sweep carries none."""

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
RECEIPT_SWEEPS = 3
"""How many recovery sweeps, after the enqueue grace, look for a pending run's receipt (and each worker
process's first sweep, however long ago the run was sent: `receipt_look_seconds`)."""


def message_id(actor: str, ident: int, enqueued_at: datetime) -> str:
    """The Dramatiq message id of the send that goes with outbox mark `enqueued_at` (read back from either
    database: SQLite hands it back without its UTC zone). Unique per send, as Dramatiq's consumers assume,
    since every such send writes a new mark; readable in the logs."""
    return f"{actor}-{ident}-{(as_utc(enqueued_at) - _EPOCH) // timedelta(microseconds=1)}"


def receipt_key(message: str) -> str:
    return namespaced(f"sent:{message}")


def receipt_key_of_send(actor: str, ident: int, enqueued_at: datetime) -> str:
    """The receipt the send that went with outbox mark `enqueued_at` left, if it reached the broker."""
    return receipt_key(message_id(actor, ident, enqueued_at))


def receipt_look_seconds(*, first_sweep: bool = False) -> float:
    """How long after the enqueue grace the recovery sweep looks for a pending run's receipt: a few sweeps,
    so that a send missed by one is caught by the next; past that, the stale-pending rule holds. A worker
    process's first sweep looks back as far as that rule: the runs an API process stranded while no worker
    ran (a machine that restarted, a deployment that stopped everything) are older than the later sweeps'
    window."""
    settings = get_settings()
    return settings.stale_pending_seconds if first_sweep else RECEIPT_SWEEPS * settings.recovery_interval_seconds


def _receipt_seconds() -> int:
    """How long a receipt stays: as long as any sweep may look for it, by a lease (the mark is the sender's
    clock, the sweep's window the database's)."""
    settings = get_settings()
    return math.ceil(settings.stale_pending_seconds + settings.lease_seconds)


def leave_receipt(pipe: Pipeline, message: str) -> None:
    """Queue, in the broker's round trip after a send, the receipt that tells the recovery sweep this message
    reached Redis."""
    pipe.set(receipt_key(message), b"", ex=_receipt_seconds())


def enqueue(queue: str, actor: str, ident: int, enqueued_at: datetime | None) -> bool:
    """Send run `ident` to `actor` on `queue` (`app.run_kinds` says which); False when the broker could not
    take it, which is logged here and handled by the caller's outbox. `enqueued_at` is the outbox mark
    the caller wrote for this send (None for a send that wrote none: an Idempotency-Key's replay)."""
    named: dict[str, Any] = {} if enqueued_at is None else {"message_id": message_id(actor, ident, enqueued_at)}
    request_id = logged_request_id()  # an API request's: the worker's lines about the run name it too
    message: Message[Any] = Message(queue_name=queue, actor_name=actor, args=(ident,), kwargs={},
                                    options={} if request_id is None else {REQUEST_ID_OPTION: request_id}, **named)
    try:
        dramatiq.get_broker().enqueue(message)
    except Exception as exc:
        warn_of_sparingly(log, exc, "could not enqueue %s(%s); recovery will send it", actor, ident)
        return False
    return True
