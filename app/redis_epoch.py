"""Whether Redis still holds every message sent to it: the epoch the recovery sweep keeps there.

Redis keeps nothing on disk in the recommended set-up, and a restart, a flush or a failover to a replica
behind loses queued messages; a snapshot restores some and not the latest. The first recovery sweep after
such a loss must send every pending run again (`app.recovery`). It tells by the epoch key: missing, or
naming another run of the Redis server (`INFO server`'s `run_id`), Redis lost its data. The key is set again,
to this run, only once a sweep has re-sent them all, and only if Redis kept the mark that sweep left before
sending: lost again meanwhile, it lost the re-sent messages too, and the next sweep sends them again.
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass
from typing import Any, NamedTuple, cast

import redis

from app.models.base import utc_now
from app.redis_client import get_redis, key, lua_script

log = logging.getLogger(__name__)


def epoch_key() -> str:
    """Set by the first sweep after Redis starts empty, to the server run it saw; missing, or naming another
    server run, it means Redis lost its data (`redis_at_sweep`)."""
    return key("epoch")


def server_run(client: redis.Redis) -> str:
    """The Redis server's run: `INFO server`'s `run_id`, new at each start ("" from a server without one)."""
    return str(cast(dict[str, Any], client.info("server")).get("run_id", ""))


def epoch_value(run: str) -> str:
    """What the epoch key holds: the Redis server run whose data is known complete, and when."""
    return f"{run} {utc_now().isoformat()}"


class RedisAtSweep(NamedTuple):
    reachable: bool
    lost_run: str | None
    """The Redis server's run while the epoch key is missing or was written in another run: Redis was
    flushed, or restarted empty or from a snapshot, and lost some or all of its queues. None while it
    holds them all, or cannot be reached."""


def redis_at_sweep() -> RedisAtSweep:
    """Whether Redis answers as a sweep starts, and whether it lost its data (`RedisAtSweep.lost_run`).

    The key is set again only by a sweep that has re-sent every pending turn (`mark_epoch`), so a
    sweep that dies half-way (database down, process killed) leaves the work to the next one. A restart
    that lost nothing (an append-only file written at every command) costs one extra message per pending
    turn, a no-op at its claim.
    """
    try:
        client = get_redis()
        run, epoch = server_run(client), cast(bytes | None, client.get(epoch_key()))
    except redis.RedisError:
        return RedisAtSweep(False, None)
    return RedisAtSweep(True, run if epoch is None or epoch.split(b" ", 1)[0].decode() != run else None)


SWEEP_MARK_SECONDS = 3600
"""How long the mark of a sweep that died before it ended stays in Redis."""


@dataclass(frozen=True, slots=True)
class SweepMark:
    key: str
    server_run: str
    """The server run the sweep re-sends into, read before the mark is left: the epoch it sets names this
    run, so a restart later in the sweep (whose new run the mark may survive in a snapshot) is noticed."""


def leave_sweep_mark(run: str) -> SweepMark | None:
    """Before a sweep re-sends everything pending into the Redis run that lost its data: a key that goes if
    Redis loses its data again, with the messages the sweep sent. None when Redis is unreachable (the
    sends fail too, and the epoch is not set)."""
    mark = f"{epoch_key()}:sweep:{secrets.token_hex(8)}"
    try:
        get_redis().set(mark, "1", ex=SWEEP_MARK_SECONDS)
    except redis.RedisError:
        return None
    return SweepMark(mark, run)


def mark_epoch(sweep_mark: SweepMark | None) -> None:
    if sweep_mark is None:
        return
    try:
        marked = lua_script("mark_epoch")(keys=[sweep_mark.key, epoch_key()],
                                          args=[epoch_value(sweep_mark.server_run)], client=get_redis())
    except redis.RedisError:
        log.warning("could not mark Redis as recovered; the next sweep re-sends pending turns again")
        return
    if not marked:
        log.warning("Redis lost its data again while pending turns were re-sent; the next sweep re-sends them")
