"""The live stream of a turn's answer: what the worker produces, kept in a Redis Stream for readers.

Entries are `delta` (a piece of text, with the attempt it belongs to and its start offset in that
attempt's text), `status` (a status or model change; `restart` is true when a call starts over knowing of no
text readers hold: none was streamed, or an earlier delivery's could not be read whole), `continue` (an
attempt that started over goes on after all the text readers hold, which it repeated or departed from:
readers keep it and follow the new attempt from its end; `s` says where what the new call wrote begins) and
`done`. Readers never take text back, so their deltas concatenate to the stored answer. The stream has a
bounded length and expires, so an abandoned one costs nothing. The database stays the record: a reader
arriving after the stream is gone, or finding a gap in it (Redis lost data mid-turn), is served from the stored
message (see `app.answer_stream`). The worker writes it (`app.live_stream_writer`), best effort: a
Redis failure never fails a turn. Here: its keys, its entries read, and what it holds of a turn's calls read
back by the delivery that runs the turn on; and, past the stream's expiry, the links of a stored answer whose
readers followed more than one attempt (`answer_links`), so that a reader resuming from an earlier one is
still sent only the rest.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any, NamedTuple, cast

import redis
from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session

from app.deliveries import first_delivery_since_requeue
from app.models import ModelAttempt, Turn
from app.redis_client import StreamEntry, get_redis, key

log = logging.getLogger(__name__)


def stream_key(turn_id: int) -> str:
    return key("turn", turn_id, "stream")


def forget(turn_id: int) -> None:
    """Drop a turn's live stream, and its stored answer's links, before it runs again (a requeue), so a reader
    follows the new run live instead of first reading the old run to its `done`. Best effort: the new run's
    attempts are numbered apart from the old one's, so a stream left behind costs a reader the live view, never
    the text, and links left behind name another answer than the one stored next (`answer_links`' last link)."""
    try:
        get_redis().delete(stream_key(turn_id), links_key(turn_id))
    except redis.RedisError:
        log.warning("could not drop the old live stream of turn %s", turn_id)


_ATTEMPTS_PER_DELIVERY = 100


def attempt_number(delivery: int, index: int) -> int:
    """Numbers every attempt of every delivery apart, so text of a run that died is never mistaken for the
    text of the run that took the turn over."""
    return delivery * _ATTEMPTS_PER_DELIVERY + index


def stored_answer_attempt(session: Session, turn_id: int) -> int:
    """The attempt a turn's stored answer is named by: the last of its settling delivery's (its `deliveries`). An
    earlier delivery that lost the turn recorded its attempts too (`app.attempts`), under its own number (rows
    from before that column count as the settling one's). A reader whose position is in that attempt is sent the
    rest of the stored answer; one in another is sent it whole, after a `restart` (`app.answer_stream`)."""
    delivery = session.scalar(select(Turn.deliveries).where(Turn.assistant_message_id == turn_id)) or 0
    attempts = session.scalar(select(func.count()).select_from(ModelAttempt).where(
        ModelAttempt.message_id == turn_id,
        or_(ModelAttempt.delivery == delivery, ModelAttempt.delivery.is_(None)))) or 0
    return attempt_number(delivery, max(attempts - 1, 0))


Links = tuple[tuple[int, int], ...]
"""The `continue` entries that lead to an attempt, as (the attempt readers followed, the length of its text that
went on in the next): a reader in one of those attempts at no more than that length holds the start of the
later one's text, link by link."""


def links_key(turn_id: int) -> str:
    return key("turn", turn_id, "links")


def answer_links(turn_id: int) -> Links:
    """The links of an ended turn's stored answer, kept by `app.live_stream_writer` when its readers followed
    more than one attempt, for as long as a running turn's stream is kept: each attempt readers followed on the
    way, with how much of its text begins the stored answer, the last being the attempt the answer is named by,
    at its whole length. Empty when none were kept, or when Redis cannot be read: a reader in such an attempt
    is then sent the stored answer whole, after a `restart`."""
    try:
        kept = cast(bytes | None, get_redis().get(links_key(turn_id)))
        pairs = [link.split(b":") for link in kept.split(b",")] if kept else []
        return tuple((int(attempt), int(length)) for attempt, length in pairs)
    except (redis.RedisError, ValueError):  # a value no writer of agentq's made: no link is believed
        return ()


def write_links(links: Links) -> str:
    """`Links` as `answer_links` reads them back."""
    return ",".join(f"{attempt}:{length}" for attempt, length in links)


@dataclass(frozen=True, slots=True)
class Streamed:
    """The text of the last attempt a turn's live stream holds, the model its `status` entry named (None
    when that entry was trimmed away), and its number (`attempt_number`).

    `own_from` is where the text that attempt's call wrote begins: after the text of earlier calls its readers
    held when it departed from it (`app.live_stream_writer.ANSWER_SEPARATOR` between them); 0 when the call
    wrote all of it, or repeated what came before. A call that starts over is matched against that part alone,
    so that one repeating the same answer goes on from its end instead of writing it a second time."""

    text: str
    model: str | None
    attempt: int
    own_from: int = 0
    links: Links = ()
    """The `continue` entries that lead to this attempt since the last `restart`."""


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
            own_from = fields.get(b"s")  # not written by releases before the field
            return EntryRead(kind, attempt, int(fields[b"o"]), "",
                             {"from": int(fields[b"from"]), "own_from": None if own_from is None else int(own_from)})
        return EntryRead(kind, attempt, 0, "", {})
    except (KeyError, ValueError):  # UnicodeDecodeError and json's JSONDecodeError are ValueErrors
        return None


def text_streamed(turn_id: int, *, since: int = 0) -> Streamed | None:
    """The attempt a reader of the turn's live stream follows last, and its text, whole from the start: what
    a delivery that died had sent its readers, and which model wrote it. None when there is no text (none
    streamed, or a restart dropped it: a takeover that could not read it), or not all of it (the stream trimmed
    or lost with Redis), or Redis cannot be reached. The attempt is the last to stream text or to restart: a
    later delivery's first `status` entry, written as its first call starts, drops nothing, and taken for the last
    attempt it lost the text readers still held when that delivery died too. Only deliveries numbered `since` and
    after are read: a stream its requeue could not drop is an earlier run's, which the new run's readers were not
    sent."""
    read = _read_stream(turn_id)
    if read is None:
        return None
    followed = [attempt for attempt in read.values() if attempt.delivery >= since
                and (attempt.streamed_text or attempt.restarted)]
    last = followed[-1] if followed else None
    return (Streamed(last.text, last.model, last.number, last.own_from, last.links)
            if last is not None and last.text and not last.missing else None)


def text_so_far(turn_id: int, deliveries: int) -> Streamed | None:
    """What the readers of a turn in flight hold now, for a read of its answer while it is `processing` (the
    API's `content`, which the database has only at the end): the text of its deliveries since its last
    requeue, `deliveries` being its count as the read found it. None as for `text_streamed`: no text yet, not
    all of it held, or Redis out of reach."""
    return text_streamed(turn_id, since=first_delivery_since_requeue(deliveries))


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
    own_from: int = 0
    """Where the text the call wrote begins (`Streamed.own_from`)."""
    links: Links = ()
    """The `continue` entries that lead to it (`Streamed.links`)."""

    @property
    def delivery(self) -> int:
        """The delivery that made the call (`attempt_number`)."""
        return self.number // _ATTEMPTS_PER_DELIVERY

    @property
    def index(self) -> int:
        """The call's place in its delivery (`attempt_number`): 0 for its first model, 1 after a fallback."""
        return self.number % _ATTEMPTS_PER_DELIVERY

    @property
    def streamed_text(self) -> bool:
        """Whether its readers were sent text of it (held by the stream, or lacking from it)."""
        return bool(self.text or self.missing)

    @property
    def own_text(self) -> str:
        """What of its text the call wrote (the stream holds): not the earlier calls' text it went on after."""
        return self.text[max(self.own_from - self.missing, 0):]

    @property
    def own_missing(self) -> int:
        """How many characters of what the call wrote the stream lacks."""
        return max(self.missing - self.own_from, 0)


def attempts_streamed(turn_id: int, *, up_to: int) -> dict[int, list[StreamedAttempt]] | None:
    """The calls each delivery up to `up_to` made, as far as its stream tells, by delivery, each's in order; None
    when Redis cannot be reached.

    A call that streamed text was made. One that streamed none was made when it is its delivery's last and its
    `status` entry named its model: that entry is written as the call starts (`TurnStream.attempt_started`), so
    the delivery stopped (its worker died) before the call streamed text (waiting for its first token, or
    repeating what readers held). An earlier call that streamed
    none ended before the next began, which could be a refusal the provider bills nothing for: not taken."""
    read = _read_stream(turn_id)
    if read is None:
        return None
    by_delivery: dict[int, list[StreamedAttempt]] = {}
    last = {attempt.delivery: attempt for attempt in read.values()}  # in order: each delivery's last call
    for attempt in read.values():
        started_unseen = last[attempt.delivery] is attempt and attempt.model is not None
        if attempt.delivery <= up_to and (attempt.streamed_text or started_unseen):
            by_delivery.setdefault(attempt.delivery, []).append(attempt)
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
            if read.payload.get("restart") is True:
                attempt.restarted, attempt.links = True, ()
        elif read.kind == "delta":
            _add_text(attempt, read.start, read.text, at_ms)
        elif read.kind == "continue":
            followed = found.get(read.payload["from"])
            _continue_text(attempt, followed, read.start, read.payload["own_from"])
            attempt.links = (*(followed.links if followed is not None else ()), (read.payload["from"], read.start))
    return dict(sorted(found.items()))


def _continue_text(attempt: StreamedAttempt, followed: StreamedAttempt | None, length: int,
                   own_from: int | None) -> None:
    """A `continue` entry: the attempt's text begins with the first `length` characters of the one its readers
    followed (or lacks them, when the stream no longer holds them whole), and what the call wrote begins at
    `own_from` (that attempt's own, for an entry of a release that did not write it)."""
    if followed is not None and not followed.missing and len(followed.text) >= length:
        attempt.text = followed.text[:length]
    else:
        attempt.missing = length
    attempt.own_from = own_from if own_from is not None else (followed.own_from if followed is not None else 0)


def _add_text(attempt: StreamedAttempt, start: int, piece: str, at_ms: int) -> None:
    held = attempt.missing + len(attempt.text)
    if start > held:
        attempt.missing += start - held
        held = start
    attempt.text += piece[held - start:]
    if attempt.first_text_ms is None:
        attempt.first_text_ms = at_ms
