"""What operators look at: queue depths from the broker's own Redis keys, turns in flight from the database."""

from __future__ import annotations

from dataclasses import dataclass, field

import redis
from sqlalchemy import func, select

from app.config import get_settings
from app.db import transaction
from app.dispatch import DEBUG_QUEUE, TURNS_QUEUE
from app.models import ConversationMessage
from app.redis_client import get_redis
from app.turn_status import IN_FLIGHT

QUEUES = (TURNS_QUEUE, DEBUG_QUEUE)


@dataclass(frozen=True, slots=True)
class QueueDepth:
    name: str
    ready: int
    delayed: int
    dead: int


@dataclass
class QueueSnapshot:
    queues: list[QueueDepth] = field(default_factory=list)
    turns_by_status: dict[str, int] = field(default_factory=dict)
    redis_error: str | None = None


def broker_key(queue: str, suffix: str = "") -> str:
    """The Redis broker's key for a queue: `<namespace>:<queue>` plus `.DQ` (delayed) or `.XQ` (dead)."""
    return f"{get_settings().broker_namespace}:{queue}{suffix}"


def queue_snapshot() -> QueueSnapshot:
    snapshot = QueueSnapshot()
    try:
        pipe = get_redis().pipeline(transaction=False)
        for queue in QUEUES:
            pipe.llen(broker_key(queue))
            pipe.llen(broker_key(queue, ".DQ"))
            pipe.zcard(broker_key(queue, ".XQ"))
        counts = pipe.execute()
        for index, queue in enumerate(QUEUES):
            ready, delayed, dead = counts[index * 3: index * 3 + 3]
            snapshot.queues.append(QueueDepth(queue, int(ready), int(delayed), int(dead)))
    except redis.RedisError as exc:
        snapshot.redis_error = f"{type(exc).__name__}: {exc}"
    with transaction() as session:
        rows = session.execute(
            select(ConversationMessage.status, func.count())
            .where(ConversationMessage.role == "assistant",
                   ConversationMessage.status.in_([s.value for s in IN_FLIGHT]))
            .group_by(ConversationMessage.status)
        ).all()
    snapshot.turns_by_status = {s.value: 0 for s in sorted(IN_FLIGHT)}
    snapshot.turns_by_status.update({status: count for status, count in rows})
    return snapshot
