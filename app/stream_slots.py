"""How many answer streams each user holds open in this API process.

An open stream holds one of the process's server threads for as long as its client stays (gunicorn's
threaded worker), so without a bound one user's tabs, or a client reconnecting in a loop without
closing, could take every thread and stall the API for everyone. The bound is per process because
threads are: a user may hold `AGENTQ_MAX_STREAMS_PER_USER` streams in each API process. A slot is
freed when the server closes the response: at the stream's end, or when a write to a client that
went away fails (at the latest with the next heartbeat).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from app.errors import TooManyStreams


class StreamSlots:
    """Open answer streams by user, in this process: a stream holds one of its server threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: dict[int, int] = {}

    def take(self, user_id: int, limit: int) -> Callable[[], None]:
        """Take one of the user's slots, or refuse; the returned function frees it (once, however often called)."""
        with self._lock:
            held = self._held.get(user_id, 0)
            if held >= limit:
                raise TooManyStreams(limit)
            self._held[user_id] = held + 1
        freed = False

        def free() -> None:
            nonlocal freed
            with self._lock:
                if freed:
                    return
                freed = True
                left = self._held[user_id] - 1
                if left:
                    self._held[user_id] = left
                else:
                    del self._held[user_id]

        return free


stream_slots = StreamSlots()
