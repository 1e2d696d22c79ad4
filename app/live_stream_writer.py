"""The writing side of a turn's live stream (`app.live_stream`): a worker's deltas, statuses and ends, published
by one thread per process in pipelines. Best effort: a Redis failure never fails a turn, and readers then
fall back to the database.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import deque
from dataclasses import dataclass

import redis
from redis.typing import EncodableT, FieldT

from app import metrics
from app.answer_sink import AnswerSink
from app.config import get_settings
from app.failure_logs import warn_of_repeated
from app.live_stream import Links, Streamed, attempt_number, links_key, stream_key, write_links
from app.redis_client import get_redis
from app.turn_status import TurnStatus

log = logging.getLogger(__name__)

StreamFields = dict[FieldT, EncodableT]


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
        self.add_together(key, [(fields, expire)])

    def add_together(self, key: str, entries: list[tuple[StreamFields, bool]]) -> None:
        """Entries that must reach Redis in one pipeline (a `continue` and the text it announces): queued at once,
        so the publisher never takes the first without the others."""
        self._items.extend([(key, fields, expire) for fields, expire in entries])
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
            except redis.RedisError as exc:
                warn_of_repeated(log, exc, "publishing stream entries", "readers fall back to the database")

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
    """The attempt a turn's readers follow, the model they were told wrote it, the text they were sent of it, in
    pieces, and where what its call wrote begins in that text (`Streamed.own_from`)."""

    attempt: int
    model: str | None
    pieces: list[str]
    own_from: int = 0
    links: Links = ()
    """The `continue` entries that lead to it (`Streamed.links`)."""


@dataclass
class _Repeat:
    """An attempt that started over, while its text is still the start of the text the call readers follow
    wrote (`held` from `own_from`: `Streamed.own_from`)."""

    model: str
    attempt: int
    held: str
    own_from: int
    links: Links
    matched: int = 0

    @property
    def rest(self) -> str:
        """What of the followed call's text this attempt has not repeated yet."""
        return self.held[self.own_from + self.matched:]


ANSWER_SEPARATOR = "\n\n"
"""Between the text readers hold and a new call's answer that departs from it."""


class TurnStream(AnswerSink):
    """The writing side of a turn's live stream, for one delivery.

    Readers never take text back: the contract says their deltas concatenate to the final content, so every
    end of the turn stores what they were sent (`readers_text`). An attempt that starts over (a fallback, or a
    delivery that took the turn over or runs it again) most often repeats what they hold word for word (a
    deterministic model, a retry of the same one): they are sent only what comes after it. One whose text
    departs from it (another model's words) is sent after it, a paragraph on (`ANSWER_SEPARATOR`).
    `readers_hold` is what an earlier delivery sent them (`text_streamed`), None when it cannot be read whole.
    """

    def __init__(self, turn_id: int, delivery: int = 0, readers_hold: Streamed | None = None, *,
                 attempt: int | None = None) -> None:
        """`attempt`: the attempt an end that no worker held names its stored answer by (`app.unheld_ends`),
        where a delivery's first is `attempt_number(delivery, 0)`."""
        self._turn_id = turn_id
        self._key = stream_key(turn_id)
        self._delivery = delivery
        self._index = -1
        self._attempt = attempt_number(delivery, 0) if attempt is None else attempt
        self._offset = 0
        self._followed = (None if readers_hold is None else _Followed(
            readers_hold.attempt, readers_hold.model, [readers_hold.text], readers_hold.own_from, readers_hold.links))
        self._repeat: _Repeat | None = None

    def _add(self, fields: StreamFields, expire: bool = False) -> None:
        _publisher.add(self._key, fields, expire)

    def status(self, status: TurnStatus, model: str | None, restart: bool = False) -> None:
        payload: dict[str, object] = {"status": status.value, "model": model}
        if restart:
            payload["restart"] = True
        self._add({"type": "status", "a": self._attempt, "data": json.dumps(payload)}, expire=True)

    def attempt_started(self, model_name: str, restart: bool) -> None:
        """A fallback, or any attempt of a later delivery, starts over: what readers hold is matched against its
        text (`delta`). When they hold none, they follow it from its start. This delivery knows that they hold
        none when it wrote all they hold (its primary failed before its first token): a plain `status` tells
        them of the switch, and a reader, at the start of no text, takes the new attempt's first delta as its
        own (`app.answer_stream`). When it knows nothing of what they hold (an earlier delivery's stream it
        could not read whole: trimmed, lost with Redis, out of reach), a `restart` tells them to drop it and
        follow this call live rather than wait for the end.

        Every attempt's `status` entry names its model here, as its call is made (after moderation passed, with
        no stop asked and time left): readers are told of no model that was not called, and a delivery whose
        worker died is known to have made the call its last such entry names (`app.interrupted_calls`)."""
        self._index += 1
        self._attempt = attempt_number(self._delivery, self._index)
        self._offset = 0
        self._repeat = None
        readers_restart = False
        if restart or self._delivery > 1:
            if (held := self.readers_text()) is not None:
                self._repeat = _Repeat(model_name, held.attempt, held.text, held.own_from, held.links)
            else:
                readers_restart = self._followed is None
        if self._repeat is None:
            self._followed = _Followed(self._attempt, model_name, [])
        self.status(TurnStatus.PROCESSING, model_name, restart=readers_restart)

    def delta(self, text: str) -> None:
        if self._repeat is None:
            self._send(text)
            return
        repeat = self._repeat
        rest = repeat.rest
        if rest.startswith(text):
            repeat.matched += len(text)
            return
        self._repeat = None
        if text.startswith(rest):  # it repeated the followed call's text, and goes on from its end
            self._continue(repeat, repeat.own_from, text[len(rest):])
        else:  # it departs: what it wrote goes after all readers hold
            written = repeat.held[repeat.own_from:repeat.own_from + repeat.matched]
            self._continue(repeat, len(repeat.held) + len(ANSWER_SEPARATOR), ANSWER_SEPARATOR + written + text)

    def _send(self, text: str) -> None:
        self._add(self._delta(text))

    def _delta(self, text: str) -> StreamFields:
        """The entry of `text`, counted as sent to readers."""
        fields: StreamFields = {"type": "delta", "a": self._attempt, "o": self._offset, "data": text}
        self._offset += len(text)
        if self._followed is not None:
            self._followed.pieces.append(text)
        return fields

    def _continue(self, repeat: _Repeat, own_from: int, text: str) -> None:
        """Readers follow this attempt from the end of all they hold, and are sent `text`; what its call wrote
        begins at `own_from`. Published together: a `continue` read without its text (the worker killed
        between them) would say the call wrote from past the end of the text."""
        moved = self._readers_moved(repeat.attempt, len(repeat.held), own_from)
        self._offset = len(repeat.held)
        self._followed = _Followed(self._attempt, repeat.model, [repeat.held], own_from,
                                   (*repeat.links, (repeat.attempt, len(repeat.held))))
        _publisher.add_together(self._key, [(moved, True), *([(self._delta(text), False)] if text else [])])

    def _keep_links(self, links: Links) -> None:
        """The attempts readers followed on the way to the stored answer, and how much of each begins it, kept past
        the live stream's end for as long as a running turn's stream is (`AGENTQ_STREAM_TTL_SECONDS`): a reader
        that resumes from one of them once the stream is gone is sent the rest of the stored answer, not all of it
        again after a `restart` (`app.answer_stream`). Only for a turn whose readers followed more than one attempt
        (a fallback, a takeover); best effort, as every write of the stream is."""
        try:
            get_redis().set(links_key(self._turn_id), write_links(links), ex=get_settings().stream_ttl_seconds)
        except redis.RedisError as exc:
            warn_of_repeated(log, exc, "keeping the links of a turn's answer", "its readers may be sent a restart")

    def _readers_moved(self, attempt: int, length: int, own_from: int) -> StreamFields:
        return {"type": "continue", "a": self._attempt, "from": attempt, "o": length, "s": own_from}

    def held_by_readers(self) -> Streamed | None:
        """The text readers hold of an earlier call that this delivery has not gone past: it has called no model
        yet, or its call is still repeating that text. What a stop keeps then, rather than the shorter repeat
        (or nothing, during moderation), which would take back text readers were sent."""
        followed = self._followed
        return None if followed is None or followed.attempt == self._attempt else self.readers_text()

    def readers_text(self) -> Streamed | None:
        """Everything the turn's readers hold, and the model they were told wrote it: what every end of the
        turn stores as its content, so that their deltas concatenate to it; None when they hold nothing."""
        followed = self._followed
        text = "".join(followed.pieces) if followed is not None else ""
        return (Streamed(text, followed.model, followed.attempt, followed.own_from, followed.links)
                if followed is not None and text else None)

    def finished(self, status: TurnStatus, model: str | None, content: str | None = None) -> None:
        """The last entry: readers then load the stored message and send `done`. Every end of a turn is
        announced here, after its commit (a worker's settlement, an end no worker held), so the count of
        ended turns is taken here too, once per end. A stored answer (`content`) that is the text readers hold of
        an earlier call (a call that ended having repeated it exactly, a stop that kept it) moves them first to
        the attempt the stored answer is named by, so that they are sent no restart and nothing twice."""
        held = self.held_by_readers()
        if content and held is not None and held.text == content:
            self._add(self._readers_moved(held.attempt, len(content), held.own_from), expire=True)
        self._repeat = None
        metrics.observe_terminal(status.value)
        payload = {"status": status.value, "model": model}
        self._add({"type": "done", "a": self._attempt, "data": json.dumps(payload)}, expire=True)
        # After the `done` is queued: the links are for readers who come back later. Readers hold `held` when it
        # is not None; otherwise they followed this attempt, whose text is joined only when links lead to it.
        followed = self._followed
        readers = held or (self.readers_text() if followed is not None and followed.links else None)
        if content and readers is not None and readers.text == content:
            self._keep_links((*readers.links, (readers.attempt, len(content)), (self._attempt, len(content))))
