"""Stop requests for turns: asked through the API, noticed by the worker that runs the turn.

A request is a Redis key (instant to check on the lease keeper's half-second tick) backed by
`turns.cancel_requested_at` in the database, which is what counts if Redis lost the key.
"""

from __future__ import annotations

import contextlib
from typing import cast

import redis
from sqlalchemy import select

from app.db import transaction
from app.models import Turn
from app.redis_client import get_redis, key

STOP_TTL_SECONDS = 7200


def stop_key(turn_id: int) -> str:
    return key("turn", turn_id, "stop")


def publish_stop(turn_id: int) -> None:
    with contextlib.suppress(redis.RedisError):
        get_redis().set(stop_key(turn_id), "1", ex=STOP_TTL_SECONDS)


def stopped_turns(turn_ids: list[int]) -> set[int]:
    """Which of these turns a user asked to stop."""
    try:
        flags = cast(list[bytes | None], get_redis().mget([stop_key(t) for t in turn_ids]))
        return {t for t, flag in zip(turn_ids, flags, strict=True) if flag}
    except redis.RedisError:
        with transaction() as session:
            return set(session.scalars(
                select(Turn.assistant_message_id).where(Turn.assistant_message_id.in_(turn_ids),
                                                        Turn.cancel_requested_at.is_not(None))
            ))
