"""The places of one worker process: its worker threads, shared by the consumers of all its work queues.

Dramatiq gives each queue's consumer a prefetch of its own (here the threads, `cli.main`), while one pool
of threads runs what every consumer fetched. With two queues a process took up to twice its threads in
messages: a turn fetched while every thread ran the other queue's runs waited for one of them to end,
however many other workers idled, and at a stop for the whole shutdown grace. Counted together, a
process fetches only what a thread is free to start, and leaves the rest in Redis for the others. (A
consumer Dramatiq replaced after a lost connection leaves the count with the runs it handed out, which
are acknowledged through its successor: for as long as those run, the process may take that many more.)
"""

from __future__ import annotations

import threading
from typing import Protocol


class Holder(Protocol):
    @property
    def outstanding_message_count(self) -> int:
        """Messages fetched and not yet acknowledged: in the consumer's cache, queued or running."""


class SharedPlaces:
    """The consumers that share the places, and the condition a freed place is announced on. `changed` is
    held while a consumer counts the free places and fetches into them, so that two consumers do not both
    fill the same place."""

    def __init__(self) -> None:
        self.changed = threading.Condition()
        self._holders: list[Holder] = []

    def join(self, holder: Holder) -> None:
        with self.changed:
            self._holders.append(holder)

    def leave(self, holder: Holder) -> None:
        with self.changed:
            if holder in self._holders:
                self._holders.remove(holder)
            self.changed.notify_all()

    def taken(self) -> int:
        return sum(holder.outstanding_message_count for holder in self._holders)

    def freed(self) -> None:
        """A message was acknowledged: a consumer waiting for a place looks again."""
        with self.changed:
            self.changed.notify_all()
