"""Which worker processes are alive and what each is doing, for operators (`GET /api/admin/workers`).

Dramatiq's own heartbeats say only that a broker lives, for the requeue of a dead one's messages. An operator
asks more: where each process runs, how many runs it holds out of its threads, and whether it takes new
ones: not while it is stopping, nor while it is cut off from its database (`app.database_reach`), which
otherwise shows only as a warning in that process's log. Each worker process publishes its presence to Redis
every `PRESENCE_SECONDS`, kept for `PRESENCE_TTL_SECONDS`, so a process that died leaves the list on its own
within that time, and one that stops leaves it as its last step. A Redis out of reach is waited out: the
process publishes again at its next period.

The ids are kept in a set beside the presences: a reader drops those whose presence has expired, and so does
each process as it starts (so the set does not grow with restarts nobody listed). Expiry is Redis's own
clock, not the hosts': a host whose clock is behind would otherwise see its live processes pruned by the
others' publishes.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable, Collection
from dataclasses import dataclass, replace
from datetime import datetime
from enum import StrEnum
from typing import cast

from pydantic import TypeAdapter, ValidationError

from app.failure_logs import log_failure
from app.lease_tokens import this_process
from app.models.base import utc_now
from app.redis_client import get_redis, key, lua_script

log = logging.getLogger(__name__)

PRESENCE_SECONDS = 2.0
PRESENCE_TTL_SECONDS = 3 * PRESENCE_SECONDS
"""Three periods: a process whose publish is late by a period (a busy host, a Redis failover) stays listed."""


class WorkerState(StrEnum):
    TAKING_RUNS = "taking_runs"
    DATABASE_CUT_OFF = "database_cut_off"
    """It takes no new run until its database answers its probe (`app.database_reach`)."""
    STOPPING = "stopping"
    """It takes no new run and finishes, or hands back, those it holds."""


@dataclass(frozen=True, slots=True)
class WorkerPresence:
    id: str
    """Random, made at the process's start (`app.lease_tokens.this_process`), and named in its leases."""
    host: str
    pid: int
    threads: int
    running: int
    """Runs (turns and admin test runs) it holds now, each on one of its threads."""
    state: WorkerState
    started_at: datetime
    seen_at: datetime
    """When it last published, by its own host's clock."""


def _index_key() -> str:
    return key("workers")


def _presence_key(ident: str) -> str:
    return key("worker", ident)


_STORED = TypeAdapter(WorkerPresence)
"""A presence as Redis keeps it, JSON, written and read by pydantic from the dataclass's own fields."""


def listed_since_key() -> str:
    """When Redis began holding the workers' list, by its own clock (`absent_processes`)."""
    return key("workers", "listed-since")


def publish(presence: WorkerPresence) -> None:
    pipe = get_redis().pipeline(transaction=False)
    pipe.set(_presence_key(presence.id), _STORED.dump_json(presence), px=int(PRESENCE_TTL_SECONDS * 1000))
    pipe.sadd(_index_key(), presence.id)
    lua_script("mark_workers_listed")(keys=[listed_since_key()], client=pipe)
    pipe.execute()


def withdraw(ident: str) -> None:
    pipe = get_redis().pipeline(transaction=False)
    pipe.delete(_presence_key(ident))
    pipe.srem(_index_key(), ident)
    pipe.execute()


def live_workers() -> list[WorkerPresence]:
    """Every worker process whose presence has not expired, by host and pid. A presence this release cannot
    read (another release's, during a rolling deploy) is left out, not a failure of every page that lists."""
    client = get_redis()
    idents = [ident.decode() for ident in cast(set[bytes], client.smembers(_index_key()))]
    bodies = cast(list[bytes | None], client.mget([_presence_key(i) for i in idents])) if idents else []
    expired = [ident for ident, body in zip(idents, bodies, strict=True) if body is None]
    if expired:
        client.srem(_index_key(), *expired)
    live = [presence for body in bodies if body is not None and (presence := _readable(body)) is not None]
    return sorted(live, key=lambda presence: (presence.host, presence.pid))


def absent_processes(idents: Collection[str]) -> set[str] | None:
    """Those of `idents` that have no presence in Redis (readable by this release or not: a process of another
    release is alive too); None while the list cannot be taken for whole: Redis has held it for less than a
    presence's time to live (it was flushed, restarted empty, or failed over since), and a live process may not
    have published into it yet. A read only, of each process's own key (`app.silent_holders`)."""
    asked = list(idents)
    pipe = get_redis().pipeline(transaction=False)
    pipe.get(listed_since_key())
    pipe.time()
    pipe.mget([_presence_key(ident) for ident in asked])
    since, (seconds, _), bodies = pipe.execute()
    if since is None or seconds - int(since) < PRESENCE_TTL_SECONDS:
        return None
    return {ident for ident, body in zip(asked, bodies, strict=True) if body is None}


def _readable(body: bytes) -> WorkerPresence | None:
    try:
        return _STORED.validate_json(body)
    except ValidationError:
        log.warning("a worker presence this release cannot read is left out of the list: %r", body[:200])
        return None


class PresenceLoop:
    """A worker process's publisher: its presence every `PRESENCE_SECONDS`, read from `state` and `running`
    at each period, on a daemon thread; withdrawn when it stops."""

    def __init__(self, threads: int, state: Callable[[], WorkerState], running: Callable[[], int]) -> None:
        now = utc_now()
        self._presence = WorkerPresence(this_process(), socket.gethostname(), os.getpid(), threads, 0,
                                        WorkerState.TAKING_RUNS, now, now)
        self._state = state
        self._running = running
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="presence", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, wait_seconds: float = 1.0) -> None:
        """Its last step as the process leaves: off the list at once rather than after its time to live. The
        loop's thread withdraws, after its last publish, so no late publish puts the process back; a Redis that
        hangs holds the process's exit for `wait_seconds` at most (its presence then expires)."""
        self._stop.set()
        self._thread.join(timeout=wait_seconds)

    def _run(self) -> None:
        try:
            live_workers()  # drops the ids of presences expired since the last reader
        except Exception as error:
            log_failure(log, error, "dropping expired worker presences")
        while not self._stop.is_set():
            try:
                publish(replace(self._presence, running=self._running(), state=self._state(), seen_at=utc_now()))
            except Exception as error:
                log_failure(log, error, "publishing this worker process's presence")
            self._stop.wait(PRESENCE_SECONDS)
        try:
            withdraw(self._presence.id)
        except Exception as error:
            log_failure(log, error, "withdrawing this worker process's presence (it expires by itself)")
