"""The Redis broker's dead-letter queues, read and edited through their keys.

Dramatiq 2 has no API for them: a queue's dead messages are the zset `<namespace>:<queue>.XQ` (ids
scored by when they died) and the hash `.XQ.msgs` (their bodies). Reading is two commands per queue;
removing an entry is one Lua script, so its id and its body go together.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, cast

import dramatiq
import redis

from app.dispatch import broker_key
from app.queues import QUEUES
from app.redis_client import get_redis, lua_script

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class BrokerEntry:
    queue: str
    redis_message_id: str
    dead_at: datetime
    message: dramatiq.Message[Any] | None
    """None when the body is missing or unreadable."""


def dead_entries() -> dict[str, BrokerEntry]:
    """Every dead message of agentq's queues, by the broker's message id."""
    client = get_redis()
    entries: dict[str, BrokerEntry] = {}
    for queue in QUEUES:
        scored = cast(list[tuple[bytes, float]], client.zrange(broker_key(queue, ".XQ"), 0, -1, withscores=True))
        if not scored:
            continue
        ids = [member.decode() for member, _ in scored]
        bodies = cast(list[bytes | None], client.hmget(broker_key(queue, ".XQ.msgs"), ids))
        for (_, score), ident, body in zip(scored, ids, bodies, strict=True):
            message = _readable(body) if body is not None else None
            if body is not None and message is None:
                log.warning("dead letter %s of queue %s has a body agentq cannot read", ident, queue)
            entries[ident] = BrokerEntry(queue, ident, _death_time(score), message)
    return entries


def _readable(body: bytes) -> dramatiq.Message[Any] | None:
    """The body as a message whose fields have the types Dramatiq writes, else None. These keys are open to
    anything that writes to Redis: one odd body (options a list, retries a word, a numeric traceback) made
    every listing of dead letters a 500, and only a hand edit of Redis brought them back."""
    try:
        message = dramatiq.Message.decode(body)
    except Exception:
        return None
    options = message.options
    if not (isinstance(message.actor_name, str) and isinstance(message.args, (list, tuple))
            and isinstance(options, dict)):
        return None
    retries, trace = options.get("retries", 0), options.get("traceback")
    if not (type(retries) is int and (trace is None or isinstance(trace, str))):
        return None
    return message


def _death_time(score: float) -> datetime:
    """When Dramatiq dead-lettered the message (its score, in milliseconds); now for a score no date holds."""
    try:
        return datetime.fromtimestamp(score / 1000, UTC)
    except (OverflowError, OSError, ValueError):
        return datetime.now(UTC)


def take_entry(queue: str, redis_message_id: str) -> None:
    """Remove one dead message, its id and its body together (one already gone is left gone)."""
    lua_script("take_dead_letter")(keys=[broker_key(queue, ".XQ"), broker_key(queue, ".XQ.msgs")],
                                   args=[redis_message_id], client=get_redis())


def holds_entry(queue: str, redis_message_id: str) -> bool:
    """Whether the broker still holds this dead message; True when Redis cannot say (keep the record)."""
    try:
        return get_redis().zscore(broker_key(queue, ".XQ"), redis_message_id) is not None
    except redis.RedisError:
        return True
