"""Runs waiting for a retry: what an operator looks at before a run becomes a dead letter.

When a delivery fails, Dramatiq's Retries middleware sends the message again with a delay, and the Redis
broker keeps it in the queue's delay queue until that delay is over: its body in `<queue>.DQ.msgs`, with
the number of retries so far, the traceback of the last failure and the time it runs again (`eta`). A
worker takes the id into its own unacknowledged set as soon as it sees it and holds the message until
then, so the bodies, not the delay queue's list, are what tells which runs wait (the count of
`/api/admin/queues` reads them the same way). Read-only: nothing here changes the broker's data.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any, cast

from app.broker_keys import delayed_bodies_key
from app.db import transaction
from app.dead_letter_queue import broker_time, message_id_of, readable_message
from app.dead_letters import error_summary
from app.queues import QUEUES
from app.redis_client import get_redis
from app.run_kinds import run_id_of, statuses_of_runs


@dataclass(frozen=True, slots=True)
class WaitingRetry:
    broker_message_id: str
    queue: str
    actor: str
    """`unknown` for a body agentq cannot read (anything that writes to Redis can put one there)."""
    args: list[Any]
    run_id: int | None
    run_status: str | None
    retries: int
    error: str | None
    """The last failure's `Type: message` line, from the traceback Dramatiq kept."""
    retry_at: datetime | None


def soonest_first() -> list[WaitingRetry]:
    """Every message waiting in a delay queue, the soonest retry first (those without a time last)."""
    client = get_redis()
    pipe = client.pipeline(transaction=False)
    for queue in QUEUES:
        pipe.hgetall(delayed_bodies_key(queue))
    bodies = cast(list[dict[bytes, bytes]], pipe.execute())
    waiting = [_waiting(queue, message_id, body)
               for queue, held in zip(QUEUES, bodies, strict=True) for member, body in held.items()
               if (message_id := message_id_of(member, queue)) is not None]
    with transaction() as session:
        statuses = statuses_of_runs(session, [(retry.actor, retry.run_id) for retry in waiting])
    return sorted((replace(retry, run_status=statuses.get((retry.actor, retry.run_id))) for retry in waiting),
                  key=lambda retry: (retry.retry_at is None, retry.retry_at or datetime.min.replace(tzinfo=UTC)))


def _waiting(queue: str, message_id: str, body: bytes) -> WaitingRetry:
    message = readable_message(body)
    if message is None:
        return WaitingRetry(message_id, queue, "unknown", [], None, None, 0, None, None)
    options = message.options
    args = list(message.args)
    return WaitingRetry(message_id, queue, message.actor_name, args, run_id_of(message.actor_name, args), None,
                        int(options.get("retries", 0)), error_summary(options.get("traceback")),
                        broker_time(eta) if type(eta := options.get("eta")) is int else None)


__all__ = ["WaitingRetry", "soonest_first"]
