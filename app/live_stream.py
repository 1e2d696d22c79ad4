"""The live stream of a turn's answer: what the worker produces, kept in a Redis Stream for readers.

Entries are `delta` (a piece of text, with the attempt it belongs to and its start offset in that
attempt's text), `status` (a status or model change; `restart` is true when a fallback starts over
and the earlier text of the turn is void), `continue` (an attempt that started over has repeated the text
readers hold, word for word, and goes on from its end: readers keep it and follow the new attempt) and
`done`. The stream has a bounded length and expires,
so an abandoned one costs nothing. The database stays the record: a reader arriving after the
stream is gone, or finding a gap in it (Redis lost data mid-turn), is served from the stored
message (see `app.answer_stream`). Publishing is best effort: a Redis failure never fails a turn.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, NamedTuple, cast

import redis
from redis.typing import EncodableT, FieldT

from app import metrics
from app.answer_sink import AnswerSink
from app.config import get_settings
from app.redis_client import StreamEntry, get_redis, key
from app.turn_status import TurnStatus

log = logging.getLogger(__name__)

StreamFields = dict[FieldT, EncodableT]


def stream_key(turn_id: int) -> str:
    return key("turn", turn_id, "stream")


def forget(turn_id: int) -> None:
    """Drop a turn's live stream before it runs again (a requeue), so a reader follows the new run live
    instead of first reading the old run to its `done`. Best effort: the new run's attempts are numbered
    apart from the old one's, so a stream left behind costs a reader the live view, never the text."""
    try:
        get_redis().delete(stream_key(turn_id))
    except redis.RedisError:
        log.warning("could not drop the old live stream of turn %s", turn_id)


_ATTEMPTS_PER_DELIVERY = 100


def attempt_number(delivery: int, index: int) -> int:
    """Numbers every attempt of every delivery apart, so text of a run that died is never mistaken for the
    text of the run that took the turn over."""
    return delivery * _ATTEMPTS_PER_DELIVERY + index


@dataclass(frozen=True, slots=True)
class Streamed:
    """The text of the last attempt a turn's live stream holds, the model its `status` entry named (None
    when that entry was trimmed away), and its number (`attempt_number`)."""

    text: str
    model: str | None
    attempt: int


class EntryRead(NamedTuple):
    """A live-stream entry as the worker writes it: its kind, attempt, and a delta's start and text or a
    status's payload."""

    kind: str
    attempt: int
    start: int
    text: str
    payload: dict[str, Any]


def read_entry(fields: dict[bytes, bytes]) -> EntryRead | None:
    """A live-stream entry as the worker writes it (`app.live_stream`), or None for one it does not write: the
    key is open to anything that writes to Redis, and an entry with a field missing or not what it should be
    (a status whose data is no JSON object, a delta without text, an attempt that is no number, bytes that
    are no UTF-8) cut every reader's response short, with no `done`, until the stream expired. A reader takes
    it as a gap (`app.answer_stream`); a look back at what a dead delivery streamed passes over it."""
    try:
        kind = fields[b"type"].decode()
        attempt = int(fields.get(b"a", b"0"))
        if kind == "delta":
            return EntryRead(kind, attempt, int(fields[b"o"]), fields[b"data"].decode(), {})
        if kind == "status":
            payload = json.loads(fields[b"data"])
            return EntryRead(kind, attempt, 0, "", payload) if isinstance(payload, dict) else None
        if kind == "continue":
            return EntryRead(kind, attempt, int(fields[b"o"]), "", {"from": int(fields[b"from"])})
        return EntryRead(kind, attempt, 0, "", {})
    except (KeyError, ValueError):  # UnicodeDecodeError and json's JSONDecodeError are ValueErrors
        return None


def text_streamed(turn_id: int) -> Streamed | None:
    """The attempt a reader of the turn's live stream follows last, and its text, whole from the start: what
    a delivery that died had sent its readers, and which model wrote it. None when there is no text (none
    streamed, or a restart voided it), or not all of it (the stream trimmed or lost with Redis), or Redis
    cannot be reached. The attempt is the last to stream text or to restart: a later delivery's first
    `status` entry, written before its moderation, voids nothing, and taken for the last attempt it lost
    the text readers still held when that delivery died too."""
    read = _read_stream(turn_id)
    if read is None:
        return None
    followed = [attempt for attempt in read.values() if attempt.text or attempt.missing or attempt.restarted]
    last = followed[-1] if followed else None
    return (Streamed(last.text, last.model, last.number) if last is not None and last.text and not last.missing
            else None)


@dataclass
class StreamedAttempt:
    """One model call of a delivery as its readers were sent it: the model its `status` entry named (None when
    trimmed away), the text the stream still holds and how many characters it lacks (trimmed by the stream's
    length bound, or lost), whether it started with a restart, and the times of its first entry, its first
    text and its last entry (in ms, from the entries' ids, which are Redis's clock)."""

    number: int
    model: str | None = None
    text: str = ""
    missing: int = 0
    restarted: bool = False
    started_ms: int | None = None
    first_text_ms: int | None = None
    last_ms: int = 0

    @property
    def index(self) -> int:
        """The call's place in its delivery (`attempt_number`): 0 for its first model, 1 after a fallback."""
        return self.number % _ATTEMPTS_PER_DELIVERY


def attempts_streamed(turn_id: int, *, up_to: int) -> dict[int, list[StreamedAttempt]] | None:
    """The calls that streamed text of each delivery up to `up_to`, by delivery, each's in order (a call that
    streamed none cannot be told from one never made: its `status` entry comes before moderation); None when
    Redis cannot be reached."""
    read = _read_stream(turn_id)
    if read is None:
        return None
    by_delivery: dict[int, list[StreamedAttempt]] = {}
    for number, attempt in read.items():
        if number < attempt_number(up_to + 1, 0) and (attempt.text or attempt.missing):
            by_delivery.setdefault(number // _ATTEMPTS_PER_DELIVERY, []).append(attempt)
    return by_delivery


def _read_stream(turn_id: int) -> dict[int, StreamedAttempt] | None:
    """Every attempt the turn's live stream holds, by number, in order; None when Redis cannot be reached.
    An entry the worker never writes (the key is open to anything that writes to Redis) is passed over."""
    try:
        entries = cast(list[StreamEntry], get_redis().xrange(stream_key(turn_id)))
    except redis.RedisError:
        return None
    found: dict[int, StreamedAttempt] = {}
    for raw_id, fields in entries:
        read = read_entry(fields)
        if read is None:
            continue
        at_ms = int(raw_id.split(b"-")[0])
        attempt = found.setdefault(read.attempt, StreamedAttempt(read.attempt))
        if attempt.started_ms is None:
            attempt.started_ms = at_ms
        attempt.last_ms = at_ms
        if read.kind == "status":
            model = read.payload.get("model")
            attempt.model = model if isinstance(model, str) else attempt.model
            attempt.restarted = attempt.restarted or read.payload.get("restart") is True
        elif read.kind == "delta":
            _add_text(attempt, read.start, read.text, at_ms)
        elif read.kind == "continue":
            _continue_text(attempt, found.get(read.payload["from"]), read.start)
    return dict(sorted(found.items()))


def _continue_text(attempt: StreamedAttempt, repeated: StreamedAttempt | None, length: int) -> None:
    """A `continue` entry: the attempt's text begins with the first `length` characters of the one it repeated
    (or lacks them, when the stream no longer holds them whole)."""
    if repeated is not None and not repeated.missing and len(repeated.text) >= length:
        attempt.text = repeated.text[:length]
    else:
        attempt.missing = length


def _add_text(attempt: StreamedAttempt, start: int, piece: str, at_ms: int) -> None:
    held = attempt.missing + len(attempt.text)
    if start > held:
        attempt.missing += start - held
        held = start
    attempt.text += piece[held - start:]
    if attempt.first_text_ms is None:
        attempt.first_text_ms = at_ms


class _Publisher:
    """One thread per process writes every turn's stream entries, in pipelines.

    A worker thread only appends to a queue (no network wait on the streaming path); the publisher
    wakes at once, sends whatever has accumulated in one round trip, so bursts of small deltas cost
    one pipeline rather than one call each, and a lone delta is not held back.
    """

    def __init__(self) -> None:
        self._items: deque[tuple[str, StreamFields, bool]] = deque()
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._pid = 0
        self._expired_at: dict[str, float] = {}
        """When each stream this process writes was last given its expiry (`time.monotonic()`)."""

    def add(self, key: str, fields: StreamFields, expire: bool) -> None:
        self._items.append((key, fields, expire))
        if self._thread is None or self._pid != os.getpid() or not self._thread.is_alive():
            self._start()
        self._wake.set()

    def _start(self) -> None:
        with self._lock:
            if self._thread is None or self._pid != os.getpid() or not self._thread.is_alive():
                self._pid = os.getpid()
                self._thread = threading.Thread(target=self._run, name="stream-publisher", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        settings = get_settings()
        while True:
            self._wake.wait()
            self._wake.clear()
            batch = _coalesce(self._items)
            if not batch:
                continue
            try:
                pipe = get_redis().pipeline(transaction=False)
                for key, fields, expire in batch:
                    pipe.xadd(key, fields, maxlen=settings.stream_maxlen, approximate=True)
                    if fields["type"] == "done":
                        self._expired_at.pop(key, None)
                        pipe.expire(key, settings.stream_ended_ttl_seconds)
                    elif self._expiry_due(key, expire, settings.stream_ttl_seconds):
                        pipe.expire(key, settings.stream_ttl_seconds)
                pipe.execute()
            except redis.RedisError:
                log.warning("could not publish %d stream entries; readers fall back to the database", len(batch))

    def _expiry_due(self, key: str, asked: bool, ttl: float) -> bool:
        """Whether this entry of a running turn (re)sets its stream's expiry: a status asks for it, and so does
        a delta once a quarter of the expiry has gone by since it was last set. Set by the statuses alone,
        the stream of an answer longer than the expiry vanished mid-answer, and readers who connected or
        resumed after that found a gap until the end."""
        now = time.monotonic()
        set_at = self._expired_at.get(key)
        due = asked or set_at is None or now - set_at >= ttl / 4
        if due:
            self._expired_at.pop(key, None)  # to the end of the order: the oldest set is forgotten first
            self._expired_at[key] = now
            if len(self._expired_at) > _EXPIRIES_KEPT:
                del self._expired_at[next(iter(self._expired_at))]
        return due


_EXPIRIES_KEPT = 10_000
"""How many streams' expiry times a process keeps: those of turns whose end another process wrote stay until
they are the oldest past this many, forgotten one at a time (a forgotten stream's next delta sets its
expiry once more). Filtering the whole map each time it was full cost every entry published a pass over
ten thousand streams once that many had been taken over in an hour."""


def _coalesce(items: deque[tuple[str, StreamFields, bool]]) -> list[tuple[str, StreamFields, bool]]:
    """Take everything queued; a delta that continues the previous entry of its stream joins it.

    One entry then carries what the upstream sent in several chunks while the last pipeline was
    in flight: fewer entries to write and to relay, the same text at the same offsets.
    """
    batch: list[tuple[str, StreamFields, bool]] = []
    last: dict[str, StreamFields] = {}
    while items:
        key, fields, expire = items.popleft()
        previous = last.get(key)
        if (fields["type"] == "delta" and previous is not None and previous["type"] == "delta"
                and previous["a"] == fields["a"]
                and int(previous["o"]) + len(str(previous["data"])) == fields["o"]):
            previous["data"] = str(previous["data"]) + str(fields["data"])
            continue
        batch.append((key, fields, expire))
        last[key] = fields
    return batch


_publisher = _Publisher()


@dataclass
class _Followed:
    """The attempt a turn's readers follow, the model they were told wrote it, and the text they were sent of
    it, in pieces."""

    attempt: int
    model: str | None
    pieces: list[str]


@dataclass
class _Repeat:
    """An attempt that started over, while its text is still the start of what readers hold (`text`)."""

    model: str
    attempt: int
    text: str
    matched: int = 0


class TurnStream(AnswerSink):
    """The writing side of a turn's live stream, for one delivery.

    An attempt that starts over (a fallback, or a delivery that took the turn over or runs it again) does not
    void what the turn's readers hold until its text departs from it: most often the new call repeats it word
    for word (a deterministic model, a retry of the same one), and then readers are sent only what comes after
    it, so that their deltas concatenate to the answer as the contract says. Text that departs is a `restart`.
    `readers_hold` is what an earlier delivery sent them (`text_streamed`), None when it cannot be read whole.
    """

    def __init__(self, turn_id: int, delivery: int = 0, readers_hold: Streamed | None = None) -> None:
        self._key = stream_key(turn_id)
        self._delivery = delivery
        self._index = -1
        self._attempt = attempt_number(delivery, 0)
        self._offset = 0
        self._followed = (None if readers_hold is None
                          else _Followed(readers_hold.attempt, readers_hold.model, [readers_hold.text]))
        self._repeat: _Repeat | None = None

    def _add(self, fields: StreamFields, expire: bool = False) -> None:
        _publisher.add(self._key, fields, expire)

    def status(self, status: TurnStatus, model: str | None, restart: bool = False) -> None:
        payload: dict[str, object] = {"status": status.value, "model": model}
        if restart:
            payload["restart"] = True
        self._add({"type": "status", "a": self._attempt, "data": json.dumps(payload)}, expire=True)

    def attempt_started(self, model_name: str, restart: bool) -> None:
        """A fallback, or any attempt of a later delivery, starts over: it repeats what readers hold, or voids
        it with a `restart` when there is nothing to repeat."""
        self._index += 1
        self._attempt = attempt_number(self._delivery, self._index)
        self._offset = 0
        self._repeat = None
        if not (restart or self._delivery > 1):
            self._followed = _Followed(self._attempt, model_name, [])
            return
        held = "".join(self._followed.pieces) if self._followed is not None else ""
        if held and self._followed is not None:
            self._repeat = _Repeat(model_name, self._followed.attempt, held)
            self.status(TurnStatus.PROCESSING, model_name)
        else:
            self._start_over(model_name)

    def _start_over(self, model_name: str) -> None:
        self.status(TurnStatus.PROCESSING, model_name, restart=True)
        self._followed = _Followed(self._attempt, model_name, [])

    def delta(self, text: str) -> None:
        if self._repeat is None:
            self._send(text)
            return
        repeat = self._repeat
        rest = repeat.text[repeat.matched:]
        if rest.startswith(text):
            repeat.matched += len(text)
            return
        self._repeat = None
        if text.startswith(rest):
            self._continue(repeat)
            self._send(text[len(rest):])
        else:
            self._start_over(repeat.model)
            self._send(repeat.text[:repeat.matched] + text)

    def _send(self, text: str) -> None:
        self._add({"type": "delta", "a": self._attempt, "o": self._offset, "data": text})
        self._offset += len(text)
        if self._followed is not None:
            self._followed.pieces.append(text)

    def _continue(self, repeat: _Repeat) -> None:
        """The attempt repeated all readers hold: they follow it from there."""
        self._move_readers(repeat.attempt, len(repeat.text))
        self._offset = len(repeat.text)
        self._followed = _Followed(self._attempt, repeat.model, [repeat.text])

    def _move_readers(self, attempt: int, length: int) -> None:
        self._add({"type": "continue", "a": self._attempt, "from": attempt, "o": length}, expire=True)

    def held_by_readers(self) -> Streamed | None:
        """The text readers hold of an earlier call that this delivery has not voided: it has called no model
        yet, or its call is still repeating that text. What a stop keeps then, rather than the shorter repeat
        (or nothing, during moderation), which would take back text readers were sent."""
        followed = self._followed
        if followed is None or followed.attempt == self._attempt or not followed.pieces:
            return None
        text = "".join(followed.pieces)
        return Streamed(text, followed.model, followed.attempt) if text else None

    def finished(self, status: TurnStatus, model: str | None, content: str | None = None) -> None:
        """The last entry: readers then load the stored message and send `done`. Every end of a turn is
        announced here, after its commit (a worker's settlement, an end no worker held), so the count of
        ended turns is taken here too, once per end. A stored answer (`content`) that is the text readers hold of
        an earlier call (a call that ended having repeated it exactly, a stop that kept it) moves them first to
        the attempt the stored answer is named by, so that they are sent no restart and nothing twice."""
        held = self.held_by_readers()
        if content and held is not None and held.text == content:
            self._move_readers(held.attempt, len(content))
        self._repeat = None
        metrics.observe_terminal(status.value)
        payload = {"status": status.value, "model": model}
        self._add({"type": "done", "a": self._attempt, "data": json.dumps(payload)}, expire=True)
