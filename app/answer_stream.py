"""Following a turn's answer as events, for the SSE endpoint: live from Redis, the rest from the database.

Event ids are `<message id>/<redis entry id>.<attempt>.<offset>`: the message they belong to (an id
sent to another turn's stream is not taken as a position in it), the attempt (`app.live_stream.attempt_number`:
delivery x 100 + 0 for its first model call, + 1 after a fallback, so a delivery that took the turn over
from a dead worker never writes into that worker's text) and how many characters of that attempt's text the
client has after the event (a `continue` entry moves a reader to a later attempt that goes on after its text,
at the same offset: no restart, no text sent twice).
With the Redis id a reconnecting client resumes exactly where it was while the live stream exists;
with the attempt and offset it still gets exactly the rest from the stored message when the live
stream is gone or has a gap (Redis lost data). A client that connects after the turn ended gets one
`delta` with the whole text, so concatenated deltas always equal the final content; a client whose position
cannot go on (an id of another text, a gap Redis lost) is sent a `status` event that says `restart`, clears its
text, and is sent the text again.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, replace
from typing import Any, TypeVar, cast

import redis

from app.auth import still_admits
from app.config import get_settings
from app.conversations import require_owned_answer
from app.db import transaction
from app.in_flight import answer_status
from app.live_stream import answer_links, read_entry, stored_answer_attempt, stream_key
from app.models import ConversationMessage
from app.outages import is_outage
from app.redis_client import SOCKET_TIMEOUT_SECONDS, StreamEntry, get_redis
from app.stream_slots import stream_slots
from app.turn_status import TurnStatus

Read = TypeVar("Read")

HEARTBEAT = "heartbeat"
FINAL = "final"
"""The entry of the last event sent from the stored message: nothing is left in the live stream."""
_ENTRY = re.compile(rf"[0-9]{{1,20}}-[0-9]{{1,20}}|{FINAL}")
"""A Redis stream entry id, or `final`."""
_NUMBER = re.compile(r"[0-9]{1,20}")
"""An attempt or an offset in an event id."""
_MAX_ENTRY_PART = 2**64 - 1
"""Each half of an entry id is a 64-bit number: Redis refuses a larger one."""


@dataclass(frozen=True, slots=True)
class StreamEvent:
    event: str
    data: Any
    id: str | None = None


@dataclass
class Cursor:
    """Where a client is: the last Redis entry it saw, and its position in the answer's text."""

    entry: str = "0-0"
    attempt: int = 0
    offset: int = 0

    @classmethod
    def parse(cls, last_event_id: str | None) -> Cursor | None:
        """The cursor an id of ours names, or None (a fresh start) for anything else: an entry Redis
        would refuse would otherwise fail every read of the stream, and its reader would poll."""
        if not last_event_id:
            return None
        try:
            entry, attempt, offset = last_event_id.strip().split(".")
        except ValueError:
            return None
        # Digits as this API writes them: `int()` reads more (a sign, `_` between digits, other scripts' digits).
        if not (_ENTRY.fullmatch(entry) and _NUMBER.fullmatch(attempt) and _NUMBER.fullmatch(offset)):
            return None
        if entry != FINAL and any(int(part) > _MAX_ENTRY_PART for part in entry.split("-")):
            return None
        return cls(entry, int(attempt), int(offset))

    def event_id(self) -> str:
        return f"{self.entry}.{self.attempt}.{self.offset}"


@dataclass(frozen=True, slots=True)
class OpenedStream:
    """A reader's events, and what frees its stream slot once the server has closed the response."""

    events: Iterator[StreamEvent]
    free_slot: Callable[[], None]


def open_answer_stream(user_id: int, api_key: str, message_id: int, last_event_id: str | None,
                       reader_gone: Callable[[], bool] | None) -> OpenedStream:
    """404 for a message that is not the caller's, 429 beyond the user's open streams in this process
    (`app.stream_slots`), else the answer's events from where `last_event_id` left off, until `reader_gone`
    says the client has closed its connection (looked at between reads of the live stream; None when the
    server cannot tell), or the key that opened the stream no longer admits its user (`still_admits`)."""
    _authorize(user_id, message_id)
    free_slot = stream_slots.take(user_id, get_settings().max_streams_per_user)

    def gone() -> bool:
        # A database out of reach is waited out as every read of the stream waits it out: it ends no stream.
        return (reader_gone is not None and reader_gone()) or _unless_outage(
            lambda: still_admits(api_key, user_id)) is False

    return OpenedStream(follow_answer(message_id, last_event_id, gone), free_slot)


def _authorize(user_id: int, message_id: int) -> None:
    """404 for a message that is not the caller's assistant message, before any streaming starts."""
    with transaction() as session:
        require_owned_answer(session, user_id, message_id)


def _load(message_id: int) -> tuple[ConversationMessage, int]:
    """The stored message and the number of the attempt that produced its text (`stored_answer_attempt`)."""
    with transaction() as session:
        return session.get_one(ConversationMessage, message_id), stored_answer_attempt(session, message_id)


def _finish_from_database(loaded: tuple[ConversationMessage, int], cursor: Cursor | None) -> Iterator[StreamEvent]:
    """The rest of an ended turn from the stored message (`_load`): what the client lacks, then `done`."""
    message, final_attempt = loaded
    content = message.content
    if cursor is not None and cursor.offset == 0:
        cursor = None  # nothing received yet, so nothing to void: the text from its start, without a restart
    status = {"status": message.status, "model": message.model}
    if cursor is not None and (cursor.offset > len(content) or (
            cursor.attempt != final_attempt and not _holds_start_of_answer(message.id, cursor, final_attempt,
                                                                           len(content)))):
        # Its id names the stored text (`final`): resuming from it must not read the live stream's voided text.
        # The restart is the status event too: one event for the one status.
        cursor = Cursor(FINAL, final_attempt, 0)
        yield StreamEvent("status", {**status, "restart": True}, cursor.event_id())
    else:
        yield StreamEvent("status", status)
    start = cursor.offset if cursor is not None else 0
    if len(content) > start:
        yield StreamEvent("delta", {"text": content[start:]}, Cursor(FINAL, final_attempt, len(content)).event_id())
    yield StreamEvent("done", message)


def _holds_start_of_answer(message_id: int, cursor: Cursor, final_attempt: int, length: int) -> bool:
    """Whether a reader at `cursor`, in an attempt the stored answer is not named by, holds the start of the
    stored answer: that attempt's text up to there went on in the attempts after it (`continue` entries), link
    by link to the stored answer's, as kept once the live stream, which holds those entries, is gone
    (`app.live_stream.answer_links`). Links whose last is not this answer (its attempt, its whole length) are
    another run's (one left behind by a requeue): none of them is believed."""
    links = answer_links(message_id)
    if not links or links[-1] != (final_attempt, length):
        return False
    return dict(links).get(cursor.attempt, -1) >= cursor.offset


def _terminal(message_id: int) -> bool:
    status = answer_status(message_id)
    return status is not None and status.is_terminal


def _unless_outage(read: Callable[[], Read]) -> Read | None:
    """`read()`, or None while the database cannot be reached: a reader waits an outage out, kept open by
    heartbeats, instead of losing its stream (a browser's EventSource would not open it again: its
    reconnect would be answered 503 until the database is back)."""
    try:
        return read()
    except Exception as error:
        if not is_outage(error):
            raise
        return None


def _ending(message_id: int, cursor: Cursor | None) -> list[StreamEvent] | None:
    """The rest of the answer from the stored message once the turn has ended; None while it runs, and while
    the database cannot be reached."""
    return _unless_outage(lambda: list(_finish_from_database(_load(message_id), cursor))
                          if _terminal(message_id) else None)


_LOOK_BACK_PAGE = 200


def _fresh_start(key: str) -> tuple[Cursor, dict[str, Any] | None]:
    """Where a new reader of a turn in flight starts: just after the last restart of the live stream (a call that
    started over knowing of no text readers held: a takeover that could not read it, or a stream written by an
    earlier release), with that restart's status as its first event, so it is never sent text the restart
    dropped and its deltas alone concatenate to the answer; from the start when there was none."""
    end = "+"
    try:
        while True:
            page = cast(list[StreamEntry], get_redis().xrevrange(key, max=end, min="-", count=_LOOK_BACK_PAGE))
            for raw_id, fields in page:
                read = read_entry(fields)
                if read is not None and read.kind == "status" and read.payload.pop("restart", False):
                    return Cursor(raw_id.decode(), read.attempt, 0), read.payload
            if len(page) < _LOOK_BACK_PAGE:
                return Cursor(), None
            end = "(" + page[-1][0].decode()
    except redis.RedisError:
        return Cursor(), None


_closing = threading.Event()


def close_streams() -> None:
    """The server is stopping: every reader ends at its next look (within a heartbeat), as at its deadline,
    without `done`, and its client reconnects with `Last-Event-ID` to a server still running. Readers of
    long turns otherwise held the stop for the server's whole graceful timeout, then were cut anyway."""
    _closing.set()


@dataclass(frozen=True, slots=True)
class _Watch:
    """Until when a reader is followed: its deadline (`AGENTQ_STREAM_MAX_SECONDS`), the server's stop, and its
    client going away (`gone`: the web's look at the connection, for a closed one was noticed only when a write
    failed, a heartbeat or two later, and meanwhile held the user's stream slot, refusing the reconnect; and
    the stream's key replaced)."""

    deadline: float
    gone: Callable[[], bool] | None = None

    def open(self) -> bool:
        return time.monotonic() < self.deadline and not _closing.is_set() and not (self.gone and self.gone())


GAP_POLL_SECONDS = 1.0
"""How often a reader waiting out a gap looks at the database: a Redis blip can put every live reader of
every turn in this state at once, for as long as their turns run."""


def _first_load(message_id: int, watch: _Watch) -> Generator[StreamEvent, None, tuple[ConversationMessage, int]]:
    """The stored message the stream starts from (`_load`), with heartbeats while the database cannot be
    reached: the reader was authorized a moment ago, and an outage starting now is waited out as one later
    on is."""
    while watch.open():
        if (loaded := _unless_outage(lambda: _load(message_id))) is not None:
            return loaded
        yield StreamEvent(HEARTBEAT, None)
        time.sleep(GAP_POLL_SECONDS)
    return _load(message_id)


def follow_answer(message_id: int, last_event_id: str | None,
                  reader_gone: Callable[[], bool] | None = None) -> Generator[StreamEvent, None, None]:
    """The answer's events from where `last_event_id` left off. Every id names its message
    (`<message id>/<cursor>`): the cursor's entry and offset belong to one message's stream and text, and
    an id of another message, taken for this one's, resumed it from another position (a gap)."""
    shown: dict[str, Any] | None = None
    for event in _follow(message_id, Cursor.parse(_own_cursor(message_id, last_event_id)), reader_gone):
        if event.event == "status":
            status = {name: value for name, value in event.data.items() if name != "restart"}
            if status == shown and not event.data.get("restart"):
                continue  # `status` is sent on a change: a takeover's delivery writes the same status again
            shown = status
        yield event if event.id is None else replace(event, id=f"{message_id}/{event.id}")


def _own_cursor(message_id: int, last_event_id: str | None) -> str | None:
    """The cursor part of an id of this message's stream; None, a fresh start, for any other id."""
    tag, tagged, cursor = (last_event_id or "").strip().partition("/")
    return cursor if tagged and tag == str(message_id) else None


def _follow(message_id: int, cursor: Cursor | None, reader_gone: Callable[[], bool] | None) -> Iterator[StreamEvent]:
    settings = get_settings()
    watch = _Watch(time.monotonic() + settings.stream_max_seconds, reader_gone)
    loaded = yield from _first_load(message_id, watch)
    message = loaded[0]
    if TurnStatus(message.status).is_terminal and (cursor is None or cursor.entry == FINAL):
        yield from _finish_from_database(loaded, cursor)
        return
    if cursor is not None and cursor.entry == FINAL:
        # The id of an ended turn's stored text, for a turn running again since (an operator's requeue):
        # its live stream is read from the start, the client's attempt and offset judging what it lacks.
        cursor = Cursor("0-0", cursor.attempt, cursor.offset)
    if cursor is None:
        cursor, status = _fresh_start(stream_key(message_id))
        yield StreamEvent("status", status or {"status": message.status, "model": message.model})
    heartbeat = settings.stream_heartbeat_seconds
    longest_block = min(heartbeat, SOCKET_TIMEOUT_SECONDS - 1)
    # A turn already ended has nothing more coming: its stream is read without waiting, and what it lacks
    # (the live stream gone with Redis or its expiry, an id past its end) comes from the stored message at
    # once rather than after a blocking read's heartbeat.
    ended = TurnStatus(message.status).is_terminal
    quiet_since = time.monotonic()
    key = stream_key(message_id)
    while watch.open():
        # A read blocks until the next heartbeat is due, no longer: a heartbeat checked only after whole blocks
        # came up to a block late, and a proxy whose idle timeout is the heartbeat's cut the stream.
        block_ms = max(int(min(longest_block, heartbeat - (time.monotonic() - quiet_since)) * 1000), 1)
        try:
            found = cast(list[tuple[bytes, list[StreamEntry]]],
                         get_redis().xread({key: cursor.entry}, count=200, block=None if ended else block_ms))
        except redis.RedisError:  # said by the API's readiness and its other requests, not once a reader a read:
            found = None  # the reader looks again, and an end written meanwhile comes from the database (`_ending`)
            time.sleep(0.5)
        entries = found[0][1] if found else []
        if not entries:
            if (ending := _ending(message_id, cursor)) is not None:
                yield from ending
                return
            ended = False  # running again since it was loaded (a requeue): wait for its stream
            if time.monotonic() - quiet_since >= heartbeat:
                quiet_since = time.monotonic()
                yield StreamEvent(HEARTBEAT, None)
            continue
        quiet_since = time.monotonic()
        events, cursor, from_database = _relay(entries, cursor)
        yield from events
        if from_database:
            yield from _wait_and_finish(message_id, cursor, watch)
            return


def _relay(entries: list[tuple[bytes, dict[bytes, bytes]]],
           cursor: Cursor) -> tuple[list[StreamEvent], Cursor, bool]:
    """What a batch of live-stream entries gives a reader at `cursor`: its events, the cursor after them, and
    whether the rest must come from the stored message: the stream is done, or has a gap (a delta that does
    not continue the text the reader has: Redis lost entries)."""
    events: list[StreamEvent] = []
    for raw_id, fields in entries:
        entry = raw_id.decode()
        read = read_entry(fields)
        if read is None:  # an entry the worker did not write: taken as a gap
            return events, Cursor(entry, cursor.attempt, cursor.offset), True
        kind, attempt, start, text, payload = read
        if kind == "delta":
            if attempt > cursor.attempt and cursor.offset == 0 and start == 0:
                cursor = Cursor(cursor.entry, attempt, 0)
            if attempt < cursor.attempt:
                # A late write of a voided attempt (attempt numbers only grow): the worker that lost the
                # turn flushing what it had as it left. Nothing for this reader, who follows the new one.
                cursor = Cursor(entry, cursor.attempt, cursor.offset)
                continue
            if attempt != cursor.attempt or start > cursor.offset:  # a gap
                return events, cursor, True
            fresh = text[cursor.offset - start:]
            cursor = Cursor(entry, attempt, max(cursor.offset, start + len(text)))
            if fresh:
                events.append(StreamEvent("delta", {"text": fresh}, cursor.event_id()))
        elif kind == "status":
            restart = bool(payload.get("restart"))
            cursor = Cursor(entry, attempt if restart else cursor.attempt, 0 if restart else cursor.offset)
            events.append(StreamEvent("status", payload, cursor.event_id()))
        elif kind == "continue":
            if (cursor.attempt, cursor.offset) != (payload["from"], start):  # not the text it repeated: a gap
                return events, cursor, True
            cursor = Cursor(entry, attempt, start)  # the reader's text goes on in the attempt that repeated it
        else:  # done: the rest comes from the stored message
            return events, Cursor(entry, cursor.attempt, cursor.offset), True
    return events, cursor, False


def _wait_and_finish(message_id: int, cursor: Cursor, watch: _Watch) -> Iterator[StreamEvent]:
    """The rest comes from the stored message (the live stream's `done`, a gap where Redis lost entries, or an
    entry that cannot be read, `_relay`): wait for the turn's end and send what the reader lacks of it."""
    heartbeat = get_settings().stream_heartbeat_seconds
    quiet_since = time.monotonic()
    while watch.open():
        if (ending := _ending(message_id, cursor)) is not None:
            yield from ending
            return
        time.sleep(max(min(GAP_POLL_SECONDS, heartbeat - (time.monotonic() - quiet_since)), 0.0))
        if time.monotonic() - quiet_since >= heartbeat:
            quiet_since = time.monotonic()
            yield StreamEvent(HEARTBEAT, None)
