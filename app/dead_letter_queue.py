"""The Redis broker's dead-letter queues, read and edited through their keys.

Dramatiq 2 has no API for them: a queue's dead messages are the zset `<namespace>:<queue>.XQ` (ids
scored by when they died) and the hash `.XQ.msgs` (their bodies). The ids are read with one command per
queue, the bodies only where asked for (those no row records yet); removing an entry is one Lua script,
so its id and its body go together.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, cast

import dramatiq
import redis

from app.broker_keys import dead_bodies_key, dead_ids_key
from app.db import in_batches
from app.models.base import SHORT_TEXT_CHARS
from app.queues import QUEUES
from app.redis_client import get_redis, lua_script
from app.text import unstorable

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class BrokerEntry:
    queue: str
    redis_message_id: str
    dead_at: datetime
    message: dramatiq.Message[Any] | None
    """None when the body is missing or unreadable."""


@dataclass(frozen=True, slots=True)
class DeadMessage:
    """A dead message as the broker's zset has it: its queue, id and time of death, without its body."""

    queue: str
    redis_message_id: str
    dead_at: datetime


def dead_messages() -> dict[str, DeadMessage]:
    """Every dead message of agentq's queues, by the broker's message id. Ids and times only: a body holds a
    traceback, kilobytes each, and only those of messages no row records yet are read (`with_bodies`)."""
    client = get_redis()
    found: dict[str, DeadMessage] = {}
    for queue in QUEUES:
        scored = cast(list[tuple[bytes, float]], client.zrange(dead_ids_key(queue), 0, -1, withscores=True))
        for member, score in scored:
            if (ident := message_id_of(member, queue)) is not None:
                found[ident] = DeadMessage(queue, ident, broker_time(score) or datetime.now(UTC))
    return found


def with_bodies(dead: list[DeadMessage]) -> list[BrokerEntry]:
    """`dead` with their bodies, read a thousand at a time."""
    client = get_redis()
    entries: list[BrokerEntry] = []
    for queue in QUEUES:
        for batch in in_batches(d for d in dead if d.queue == queue):
            bodies = cast(list[bytes | None], client.hmget(dead_bodies_key(queue),
                                                           [d.redis_message_id for d in batch]))
            for one, body in zip(batch, bodies, strict=True):
                message = readable_message(body) if body is not None else None
                if body is not None and message is None:
                    log.warning("dead letter %s of queue %s has a body agentq cannot read", one.redis_message_id,
                                queue)
                entries.append(BrokerEntry(one.queue, one.redis_message_id, one.dead_at, message))
    return entries


MESSAGE_ID_CHARS = 64
"""The longest message id a dead letter's row keeps; Dramatiq's are UUIDs (36)."""


def message_id_of(member: bytes, queue: str) -> str | None:
    """A member of the dead-letter zset as a message id, or None (logged, and left out of every listing and
    count) for one Dramatiq never writes: not printable ASCII, or longer than a row keeps. Such an id made
    the listing, `GET /api/admin/queues` and `/metrics` answer 500 while it was there."""
    try:
        ident = member.decode("ascii")
    except UnicodeDecodeError:
        ident = None
    if ident is None or not ident.isprintable() or not 0 < len(ident) <= MESSAGE_ID_CHARS:
        log.warning("the dead-letter queue of %s holds an entry %r that is no message id; left out (remove it "
                    "from Redis by hand)", queue, member[:80])
        return None
    return ident


def readable_message(body: bytes) -> dramatiq.Message[Any] | None:
    """The body as a message whose fields have the types Dramatiq writes and values a row can keep, else None
    (the letter is then listed as actor `unknown`). These keys are open to anything that writes to Redis:
    one odd body (options a list, retries a word or past a 32-bit integer, a NUL or a lone surrogate in the
    actor's name, the arguments or the traceback, a NaN among the arguments) made every listing of dead
    letters a 500, and only a hand edit of Redis brought them back."""
    try:
        message = dramatiq.Message.decode(body)
    except Exception:
        return None
    options = message.options
    if not (_keepable(message.actor_name, SHORT_TEXT_CHARS) and isinstance(message.args, (list, tuple))
            and isinstance(options, dict)):
        return None
    retries, trace = options.get("retries", 0), options.get("traceback")
    if not (type(retries) is int and 0 <= retries < 2**31 and (trace is None or _keepable(trace))):
        return None
    try:
        arguments = json.dumps(message.args, allow_nan=False, ensure_ascii=False)
    except ValueError:
        return None
    return message if _keepable(arguments) else None


def _keepable(text: object, most_chars: int | None = None) -> bool:
    return (isinstance(text, str) and unstorable(text) is None
            and (most_chars is None or len(text) <= most_chars))


def broker_time(milliseconds: float) -> datetime | None:
    """A time as the broker writes it (a dead message's score, a delayed one's `eta`: milliseconds since the
    epoch); None for one no date holds, which anything that writes to Redis can put there."""
    try:
        return datetime.fromtimestamp(milliseconds / 1000, UTC)
    except (OverflowError, OSError, ValueError):
        return None


def take_entry(queue: str, redis_message_id: str) -> None:
    """Remove one dead message, its id and its body together (one already gone is left gone)."""
    lua_script("take_dead_letter")(keys=[dead_ids_key(queue), dead_bodies_key(queue)],
                                   args=[redis_message_id], client=get_redis())


def holds_entry(queue: str, redis_message_id: str) -> bool:
    """Whether the broker still holds this dead message; True when Redis cannot say (keep the record)."""
    try:
        return get_redis().zscore(dead_ids_key(queue), redis_message_id) is not None
    except redis.RedisError:
        return True
