"""The live stream of a turn's answer: what the worker produces, kept in a Redis Stream for readers.

Entries are `delta` (a piece of text, with the attempt it belongs to and its start offset in that
attempt's text), `status` (a status or model change; `restart` is true when a fallback starts over
and the earlier text of the turn is void) and `done`. The stream has a bounded length and expires,
so an abandoned one costs nothing. The database stays the record: a reader arriving after the
stream is gone, or finding a gap in it (Redis lost data mid-turn), is served from the stored
message (see `app.answer_stream`). Publishing is best effort: a Redis failure never fails a turn.
"""

from __future__ import annotations

import json
import logging

import redis

from app import metrics
from app.config import get_settings
from app.fallback import AnswerSink
from app.redis_client import get_redis, key
from app.turn_status import TurnStatus

log = logging.getLogger(__name__)


def stream_key(turn_id: int) -> str:
    return key("turn", turn_id, "stream")


def attempt_number(delivery: int, index: int) -> int:
    """Numbers every attempt of every delivery apart, so text of a run that died is never mistaken for the
    text of the run that took the turn over."""
    return delivery * 100 + index


class TurnStream(AnswerSink):
    def __init__(self, turn_id: int, delivery: int = 0) -> None:
        self.turn_id = turn_id
        self._key = stream_key(turn_id)
        self._broken = False
        self._settings = get_settings()
        self._delivery = delivery
        self._index = -1
        self._attempt = attempt_number(delivery, 0)
        self._offset = 0

    def _add(self, fields: dict[str, str | int], expire: bool = False) -> None:
        if self._broken:
            return
        try:
            client = get_redis()
            if expire:
                pipe = client.pipeline(transaction=False)
                pipe.xadd(self._key, fields, maxlen=self._settings.stream_maxlen, approximate=True)
                pipe.expire(self._key, self._settings.stream_ttl_seconds)
                pipe.execute()
            else:
                client.xadd(self._key, fields, maxlen=self._settings.stream_maxlen, approximate=True)
        except redis.RedisError:
            self._broken = True
            log.warning("live stream of turn %s unavailable; readers fall back to the database", self.turn_id)

    def status(self, status: TurnStatus, model: str | None, restart: bool = False) -> None:
        payload: dict[str, object] = {"status": status.value, "model": model}
        if restart:
            payload["restart"] = True
        self._add({"type": "status", "a": self._attempt, "data": json.dumps(payload)}, expire=True)

    def attempt_started(self, model_name: str, restart: bool) -> None:
        """A fallback, or the first attempt of a delivery that took the turn over, voids earlier text."""
        self._index += 1
        self._attempt = attempt_number(self._delivery, self._index)
        self._offset = 0
        if restart or self._delivery > 1:
            self.status(TurnStatus.PROCESSING, model_name, restart=True)

    def delta(self, text: str) -> None:
        self._add({"type": "delta", "a": self._attempt, "o": self._offset, "data": text})
        self._offset += len(text)

    def finished(self, status: TurnStatus, model: str | None) -> None:
        """The last entry: readers then load the stored message and send `done`."""
        metrics.observe_terminal(status.value)
        payload = {"status": status.value, "model": model}
        self._add({"type": "done", "a": self._attempt, "data": json.dumps(payload)}, expire=True)
