"""How many answer streams each user holds open in this API process.

An open stream holds one of the process's server threads for as long as its client stays (gunicorn's
threaded worker), so without a bound one user's tabs, or a client reconnecting in a loop without
closing, could take every thread and stall the API for everyone. The bound is per process because
threads are: a user may hold `AGENTQ_MAX_STREAMS_PER_USER` streams in each API process. Users together
may hold three quarters of the process's threads (`streams_for`): the rest serve every other request
(a POST, a read, a health check), which many users' streams, each within its bound, left waiting. A slot is
freed when the server closes the response: at the stream's end, or when a write to a client that
went away fails (at the latest with the next heartbeat).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from app.errors import TooManyStreams


def streams_for(threads: int) -> int:
    """How many answer streams a process serving requests on `threads` threads may hold: a quarter of them
    (at least one) is kept for every other request; a process of one thread keeps none, or it would serve no
    stream at all."""
    return max(1, threads - max(1, threads // 4))


class StreamSlots:
    """Open answer streams by user, in this process: a stream holds one of its server threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: dict[int, int] = {}
        self._total = 0
        self._most: int | None = None

    def hold_at_most(self, streams: int) -> None:
        """Called by the API process once it knows its thread count; until then (a test's app) no total bound."""
        self._most = streams

    def take(self, user_id: int, limit: int) -> Callable[[], None]:
        """Take one of the user's slots, or refuse; the returned function frees it (once, however often called)."""
        with self._lock:
            held = self._held.get(user_id, 0)
            if held >= limit:
                raise TooManyStreams.for_user(limit)
            if self._most is not None and self._total >= self._most:
                raise TooManyStreams.server_full(self._most)
            self._held[user_id] = held + 1
            self._total += 1
        freed = False

        def free() -> None:
            nonlocal freed
            with self._lock:
                if freed:
                    return
                freed = True
                self._total -= 1
                left = self._held[user_id] - 1
                if left:
                    self._held[user_id] = left
                else:
                    del self._held[user_id]

        return free


stream_slots = StreamSlots()
