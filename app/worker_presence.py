"""Which worker processes are alive and what each is doing, for operators (`GET /api/admin/workers`).

Dramatiq's own heartbeats say only that a broker lives, for the requeue of a dead one's messages. An operator
asks more: where each process runs, how many runs it holds out of its threads, and whether it takes new
ones: not while it is stopping, nor while it is cut off from its database (`app.database_reach`), which
otherwise shows only as a warning in that process's log. Each worker process publishes its presence to Redis
every `PRESENCE_SECONDS`, kept for `PRESENCE_TTL_SECONDS`, so a process that died leaves the list on its own
within that time, and one that stops leaves it as its last step. A Redis out of reach is waited out: the
process publishes again at its next period.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime
from enum import StrEnum
from typing import cast

from app.models.base import utc_now
from app.outages import log_failure
from app.redis_client import get_redis, key

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
    """Random, made at the process's start: a pid repeats across hosts and over time."""
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


def publish(presence: WorkerPresence) -> None:
    """The presence, and its id in the index; ids whose presence has expired are dropped from the index here."""
    seen_ms = int(presence.seen_at.timestamp() * 1000)
    ttl_ms = int(PRESENCE_TTL_SECONDS * 1000)
    body = json.dumps({"id": presence.id, "host": presence.host, "pid": presence.pid, "threads": presence.threads,
                       "running": presence.running, "state": presence.state.value,
                       "started_at": presence.started_at.isoformat(), "seen_at": presence.seen_at.isoformat()})
    pipe = get_redis().pipeline(transaction=False)
    pipe.set(_presence_key(presence.id), body, px=ttl_ms)
    pipe.zadd(_index_key(), {presence.id: seen_ms})
    pipe.zremrangebyscore(_index_key(), "-inf", seen_ms - ttl_ms)
    pipe.execute()


def withdraw(ident: str) -> None:
    pipe = get_redis().pipeline(transaction=False)
    pipe.delete(_presence_key(ident))
    pipe.zrem(_index_key(), ident)
    pipe.execute()


def live_workers() -> list[WorkerPresence]:
    """Every worker process whose presence has not expired, by host and pid."""
    client = get_redis()
    idents = cast(list[bytes], client.zrange(_index_key(), 0, -1))
    bodies = cast(list[bytes | None], client.mget([_presence_key(i.decode()) for i in idents])) if idents else []
    return sorted((_presence(json.loads(body)) for body in bodies if body is not None),
                  key=lambda presence: (presence.host, presence.pid))


def _presence(fields: dict[str, object]) -> WorkerPresence:
    return WorkerPresence(
        id=str(fields["id"]), host=str(fields["host"]), pid=int(cast(int, fields["pid"])),
        threads=int(cast(int, fields["threads"])), running=int(cast(int, fields["running"])),
        state=WorkerState(str(fields["state"])), started_at=datetime.fromisoformat(str(fields["started_at"])),
        seen_at=datetime.fromisoformat(str(fields["seen_at"])))


class PresenceLoop:
    """A worker process's publisher: its presence every `PRESENCE_SECONDS`, read from `state` and `running`
    at each period, on a daemon thread; withdrawn when it stops."""

    def __init__(self, threads: int, state: Callable[[], WorkerState], running: Callable[[], int]) -> None:
        now = utc_now()
        self._presence = WorkerPresence(uuid.uuid4().hex, socket.gethostname(), os.getpid(), threads, 0,
                                        WorkerState.TAKING_RUNS, now, now)
        self._state = state
        self._running = running
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="presence", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Its last step as the process leaves: off the list at once rather than after its time to live."""
        self._stop.set()
        self._thread.join(timeout=PRESENCE_SECONDS)
        try:
            withdraw(self._presence.id)
        except Exception as error:
            log_failure(log, error, "withdrawing this worker process's presence (it expires by itself)")

    def _run(self) -> None:
        while True:
            try:
                publish(replace(self._presence, running=self._running(), state=self._state(), seen_at=utc_now()))
            except Exception as error:
                log_failure(log, error, "publishing this worker process's presence")
            if self._stop.wait(PRESENCE_SECONDS):
                return
