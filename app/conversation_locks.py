"""The Redis fast path for "one turn per conversation" and "N active conversations per user".

A conversation lock (owner token, lease) and a per-user set of slots are taken when a turn is
accepted, renewed by the worker while the model streams, and freed at the terminal status; if their
holder dies they expire by themselves. They only ever *refuse early*: the database repeats every
check (`app.turn_intake`), and a refusal is confirmed against the database before it is returned,
so a lock left behind by a crash never blocks a conversation that is really idle. When Redis is
unreachable every call degrades to a no-op and the database's guarantees stand alone.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import cast

import redis
from redis.typing import EncodableT

from app.config import get_settings
from app.db import transaction
from app.errors import ConversationBusy, TooManyActiveConversations
from app.failure_logs import warn_of_sparingly
from app.in_flight import active_conversation_ids, answer_status
from app.live_stream import stream_key
from app.redis_client import get_redis, key, lua_script
from app.stop_requests import stop_key

log = logging.getLogger(__name__)

BUSY = -1


def _run(name: str, keys: list[str], args: list[EncodableT]) -> object:
    return lua_script(name)(keys=keys, args=args, client=get_redis())


def lock_key(conversation_id: int) -> str:
    return key("conversation", conversation_id, "lock")


def slots_key(user_id: int) -> str:
    return key("user", user_id, "slots")


TURN_OWNER, INTAKE_OWNER = "turn:", "intake:"
"""A lock's owner is a turn (`turn:<id>`, renewed and freed by its worker) or a request being accepted
(`intake:<random>`, until it hands the lock to its turn)."""


def turn_owner(turn_id: int) -> str:
    return f"{TURN_OWNER}{turn_id}"


def _owning_turn(owner: str) -> int | None:
    return int(owner.removeprefix(TURN_OWNER)) if owner.startswith(TURN_OWNER) else None


def _now_ms() -> int:
    return int(time.time() * 1000)


def _lease_ms() -> int:
    return int(get_settings().lease_seconds * 1000)


@dataclass
class TurnSlots:
    """The lock and slot an accepted request holds until its turn is bound to them."""

    user_id: int
    conversation_id: int
    owner: str | None = field(default=None)
    redis_silent: bool = False
    """Redis did not answer this request in time (it hangs rather than refuses): the request asks it nothing
    more, since each call would wait as long, and leaves its turn to the recovery sweep to send."""

    def bind(self, turn_id: int) -> None:
        """Hand the lock from this request to the turn, whose worker renews and frees it. The same call drops
        what Redis holds under the new turn's id, before it is sent: a database made again (a deleted SQLite
        file, `make clean`) numbers its turns from 1 again, and a live stream or a stop flag its predecessor left
        (a worker stopped mid-answer) would show that turn's text to the new turn's readers, or stop it."""
        if self.owner is None:
            return
        try:
            _run("renew_turn_slots", [lock_key(self.conversation_id), slots_key(self.user_id), stream_key(turn_id),
                                      stop_key(turn_id)],
                 [turn_owner(turn_id), _now_ms(), _lease_ms(), self.conversation_id, self.owner])
        except redis.RedisError as exc:
            warn_of_sparingly(log, exc, "could not hand the conversation lock to turn %s", turn_id)
        self.owner = None

    def release(self) -> None:
        if self.owner is None:
            return
        _release(self.user_id, self.conversation_id, self.owner)
        self.owner = None


def _release(user_id: int, conversation_id: int, owner: str, *ended_turn_keys: str) -> None:
    try:
        _run("release_turn_slots", [lock_key(conversation_id), slots_key(user_id), *ended_turn_keys],
             [owner, conversation_id])
    except redis.RedisError as exc:
        warn_of_sparingly(log, exc, "could not free the lock of conversation %s; it runs out by itself",
                          conversation_id)


def _stale_turn_owner(owner: str) -> bool:
    """True when the lock names a turn the database says has ended (its holder died before freeing it)."""
    if (turn_id := _owning_turn(owner)) is None:
        return False
    status = answer_status(turn_id)
    return status is None or status.is_terminal


def _forget_idle_slots(user_id: int) -> None:
    """Drop the user's slots that the database, which decides the limit, says no turn holds: a slot whose
    holder died before its release would otherwise refuse the user's turns (a 429 the database does not
    confirm) until it runs out."""
    with transaction() as session:
        active = {str(cid) for cid in active_conversation_ids(session, user_id)}
    client = get_redis()
    members = {m.decode() for m in cast(list[bytes], client.zrange(slots_key(user_id), 0, -1))}
    stale = members - active
    if stale:
        client.zrem(slots_key(user_id), *stale)


def acquire_turn_slots(user_id: int, conversation_id: int) -> TurnSlots:
    """Take the conversation's lock and a user slot, or raise the refusal the database confirms.

    A lock held by another request still being accepted (`INTAKE_OWNER`) is not a refusal: that request
    may yet fail, or be this one's retry with the same Idempotency-Key, so the database decides.
    """
    settings = get_settings()
    owner = f"{INTAKE_OWNER}{secrets.token_hex(8)}"
    keys = [lock_key(conversation_id), slots_key(user_id)]
    lock_confirmed = slots_confirmed = False  # each kind of refusal is checked against the database once
    try:
        while True:
            result = _run("acquire_turn_slots", keys,
                          [owner, _now_ms(), _lease_ms(), settings.max_active_conversations, conversation_id])
            code = int(result[0])  # type: ignore[index]
            if code == 1:
                return TurnSlots(user_id, conversation_id, owner)
            if code == BUSY:
                holder = result[1]  # type: ignore[index]
                holder = holder.decode() if isinstance(holder, bytes) else holder
                if holder.startswith(INTAKE_OWNER):
                    break
                if not lock_confirmed and _stale_turn_owner(holder):
                    lock_confirmed = True
                    _release(user_id, conversation_id, holder)
                    continue
                raise ConversationBusy()
            if not slots_confirmed:
                slots_confirmed = True
                _forget_idle_slots(user_id)
                continue
            raise TooManyActiveConversations(settings.max_active_conversations)
    except redis.TimeoutError as exc:
        warn_of_sparingly(log, exc, "Redis did not answer in time; the database alone guards conversation %s, and "
                          "the recovery sweep sends its turn", conversation_id)
        return TurnSlots(user_id, conversation_id, None, redis_silent=True)
    except redis.RedisError as exc:
        warn_of_sparingly(log, exc, "Redis could not lock conversation %s; the database alone guards it",
                          conversation_id)
    return TurnSlots(user_id, conversation_id, None)


@dataclass(frozen=True, slots=True)
class HeldTurn:
    """What a worker needs to renew and free a turn's lock and slot."""

    turn_id: int
    user_id: int
    conversation_id: int


def renew(turns: Iterable[HeldTurn]) -> None:
    """Renew the locks of the turns this process works on, in one pipeline.

    A lock another turn took meanwhile (Redis lost its keys and a later turn of the conversation took
    them) is left to it: the lock only spares the database work, and the lease, renewed in the database
    by the same keeper, is what decides which worker runs a turn."""
    held = list(turns)
    if not held:
        return
    now, lease = _now_ms(), _lease_ms()
    script = lua_script("renew_turn_slots")
    pipe = get_redis().pipeline(transaction=False)
    for turn in held:
        script(keys=[lock_key(turn.conversation_id), slots_key(turn.user_id)],
               args=[turn_owner(turn.turn_id), now, lease, turn.conversation_id, ""], client=pipe)
    with contextlib.suppress(redis.RedisError):
        pipe.execute()


def release(held: HeldTurn) -> None:
    """Free an ended turn's lock and slot, and drop its stop flag in the same call, which would sit in Redis for
    `STOP_TTL_SECONDS` otherwise. A turn that never ended here (its worker stopped mid-answer) leaves its flag
    and its live stream behind: a turn of the same id in a database made again drops them at its hand-over
    (`TurnSlots.bind`), the one guard of a new id."""
    _release(held.user_id, held.conversation_id, turn_owner(held.turn_id), stop_key(held.turn_id))
