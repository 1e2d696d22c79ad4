"""How fast a user may start turns (`AGENTQ_MAX_TURNS_PER_MINUTE`; 0, the default, for no bound).

The other bounds on a user hold what is in flight (`AGENTQ_MAX_ACTIVE_CONVERSATIONS`) and what one request
carries; none held how often a key could start a turn, and a turn its user cannot afford still stores its
message (the contract's `insufficient_balance` is a turn's end, not a refusal), so a key with no credit could
store messages without end. A token bucket per user in Redis (`app/lua/take_turn_token.lua`): a burst of the
limit, then the limit a minute, counted alike by every API process. A request that would start a turn takes a
token before the conversation's lock (one refused busy or at the active limit counts too); a replay of an
`Idempotency-Key` starts nothing and takes none. With Redis out of reach the turn is accepted, uncounted: the
bound is a brake, and the database's own limits still hold.
"""

from __future__ import annotations

import logging
import math

import redis

from app.config import get_settings
from app.errors import TooManyTurns
from app.failure_logs import warn_of_sparingly
from app.redis_client import get_redis, key, lua_script

log = logging.getLogger(__name__)


def bucket_key(user_id: int) -> str:
    return key("user", user_id, "turn_tokens")


def take_turn_token(user_id: int) -> None:
    """Take one of the user's turn tokens, or refuse the turn (429 `too_many_turns`, with when to retry)."""
    limit = get_settings().max_turns_per_minute
    if limit == 0:
        return
    try:
        taken = lua_script("take_turn_token")(keys=[bucket_key(user_id)], args=[limit], client=get_redis())
    except redis.RedisError as exc:
        warn_of_sparingly(log, exc, "could not count a turn of user %s against AGENTQ_MAX_TURNS_PER_MINUTE; "
                          "accepted uncounted", user_id)
        return
    if int(taken[0]) != 1:
        raise TooManyTurns(limit, retry_after=max(1, math.ceil(int(taken[1]) / 1000)))
