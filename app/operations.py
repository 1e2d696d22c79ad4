"""What operators look at: queue depths from the broker's own Redis keys, turns in flight and recent failures
from the database."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import redis
from sqlalchemy import Row, func, select
from sqlalchemy.exc import SQLAlchemyError

from app.broker_keys import broker_key, dead_ids_key, delayed_bodies_key
from app.config import get_settings
from app.db import transaction
from app.dead_letter_queue import message_id_of
from app.dead_letters import open_dead_letters
from app.errors import DatabaseNotCreated
from app.in_flight import answer_in_flight
from app.models import ConversationMessage, DebugRun, table
from app.models.base import utc_now
from app.outages import in_one_line, is_outage
from app.queues import QUEUES
from app.redis_client import get_redis
from app.setup_problems import schema_missing
from app.turn_status import IN_FLIGHT_VALUES, UNSUCCESSFUL
from app.worker_presence import WorkerState, live_workers


@dataclass(frozen=True, slots=True)
class QueueDepth:
    """A queue's counts; None where the service that holds them is out of reach (Redis for the messages
    waiting, and for the dead letters as well when the database is out of reach too)."""

    name: str
    ready: int | None
    delayed: int | None
    dead: int | None


@dataclass
class QueueSnapshot:
    queues: list[QueueDepth] = field(default_factory=list)
    turns_by_status: dict[str, int] = field(default_factory=dict)
    test_runs_by_status: dict[str, int] = field(default_factory=dict)
    """Admin test runs pending and processing: they share the workers with turns (the `debug` queue)."""
    worker_processes: dict[str, int] = field(default_factory=dict)
    """The worker processes alive, by state (`app.worker_presence`), every state counted; empty while Redis is
    out of reach."""
    redis_error: str | None = None
    database_error: str | None = None
    """Set, and the turn counts left empty, when the database could not be read and the caller said it
    could do without (`/metrics`)."""


def queue_snapshot(*, database_required: bool = True) -> QueueSnapshot:
    """Delayed messages are counted from the `.DQ.msgs` bodies: a worker moves the ids of `.DQ` into its
    own unacked set as soon as it sees them, so the list itself is nearly always empty. Dead letters are
    counted as they are listed (`app.dead_letters.open_dead_letters`): from the database's rows alone
    while Redis is out of reach, from the broker's alone while the database is.

    Without `database_required`, a database out of reach leaves the turn counts out instead of failing
    the whole snapshot: a scrape of /metrics during an outage, when its counters matter most, still
    answers them."""
    snapshot = QueueSnapshot()
    depths: dict[str, tuple[int | None, int | None]] = dict.fromkeys(QUEUES, (None, None))
    held: dict[str, set[str]] = {queue: set() for queue in QUEUES}  # the broker's dead messages, by queue
    try:
        pipe = get_redis().pipeline(transaction=False)
        for queue in QUEUES:
            pipe.llen(broker_key(queue))
            pipe.hlen(delayed_bodies_key(queue))
            pipe.zrange(dead_ids_key(queue), 0, -1)
        counts = pipe.execute()
        for index, queue in enumerate(QUEUES):
            ready, delayed, dead = counts[index * 3: index * 3 + 3]
            depths[queue] = (int(ready), int(delayed))
            held[queue] = {ident for member in dead if (ident := message_id_of(member, queue)) is not None}
        states = Counter(presence.state for presence in live_workers())
        snapshot.worker_processes = {state.value: states[state] for state in WorkerState}
    except redis.RedisError as exc:
        snapshot.redis_error = in_one_line(exc)
    dead_letters: dict[str, int | None] = {queue: None if snapshot.redis_error else len(ids)
                                           for queue, ids in held.items()}
    try:
        snapshot.turns_by_status, snapshot.test_runs_by_status = _runs_in_flight()
        dead_letters.update(open_dead_letters(held))
    except (SQLAlchemyError, DatabaseNotCreated) as exc:
        if database_required or not (is_outage(exc) or schema_missing(exc)):
            raise
        snapshot.database_error = in_one_line(exc)
    snapshot.queues = [QueueDepth(queue, *depths[queue], dead_letters[queue]) for queue in QUEUES]
    return snapshot


def _runs_in_flight() -> tuple[dict[str, int], dict[str, int]]:
    """Turns and admin test runs pending and processing, each counted on the index that finds them (the
    answers in flight; the test runs by status)."""
    messages, runs = table(ConversationMessage), table(DebugRun)
    with transaction() as session:
        turns = session.execute(
            select(messages.c.status, func.count()).where(answer_in_flight(messages)).group_by(messages.c.status)
        ).all()
        test_runs = session.execute(
            select(runs.c.status, func.count()).where(runs.c.status.in_(IN_FLIGHT_VALUES)).group_by(runs.c.status)
        ).all()
    return _every_status_counted(turns), _every_status_counted(test_runs)


def _every_status_counted(rows: Sequence[Row[str, int]]) -> dict[str, int]:
    counts = dict.fromkeys(IN_FLIGHT_VALUES, 0)
    counts.update({status: count for status, count in rows})
    return counts


@dataclass(frozen=True, slots=True)
class RecentFailure:
    message_id: int
    conversation_id: int
    status: str
    error_message: str | None
    updated_at: datetime


@dataclass
class FailureReport:
    since: datetime
    counts: dict[str, int]
    latest: list[RecentFailure]


def recent_failures(hours: float = 24, limit: int = 20) -> FailureReport:
    """Turns that ended in a failure status within the last `hours`: counts by status and the latest few."""
    since = utc_now() - timedelta(hours=hours)
    failed = [s.value for s in UNSUCCESSFUL]
    recent = (ConversationMessage.role == "assistant", ConversationMessage.status.in_(failed),
              ConversationMessage.updated_at >= since)
    with transaction() as session:
        counts = dict(session.execute(
            select(ConversationMessage.status, func.count()).where(*recent).group_by(ConversationMessage.status)
        ).all())
        latest = [RecentFailure(*row) for row in session.execute(
            select(ConversationMessage.id, ConversationMessage.conversation_id, ConversationMessage.status,
                   ConversationMessage.error_message, ConversationMessage.updated_at)
            .where(*recent).order_by(ConversationMessage.updated_at.desc()).limit(limit)
        ).all()]
    return FailureReport(since, {s: counts.get(s, 0) for s in failed}, latest)


_scrape_read = threading.Lock()
_scrape_snapshot: tuple[float, QueueSnapshot] | None = None


def scrape_snapshot() -> QueueSnapshot:
    """The snapshot a scrape of /metrics answers: one read per `AGENTQ_METRICS_SNAPSHOT_SECONDS` (1 s) and
    process, whatever the scrape rate.

    /metrics needs no key, and each read counts every queue and its dead letters (tens of thousands of ids
    at worst) in the database and Redis: a client scraping in a loop cost one such read per request. One
    read at a time: a scrape that comes while another reads answers the last snapshot, so a read that waits
    out an outage (the pool's timeout, Redis's) holds up only its own scrape, and the scrapes of a process
    that has no snapshot yet, which wait for its first."""
    global _scrape_snapshot
    last = _scrape_snapshot
    if last is not None and time.monotonic() - last[0] < get_settings().metrics_snapshot_seconds:
        return last[1]
    if last is None:
        _scrape_read.acquire()  # nothing to answer yet: wait for the first read
    elif not _scrape_read.acquire(blocking=False):
        return last[1]
    try:
        if _scrape_snapshot is not last and _scrape_snapshot is not None:
            return _scrape_snapshot[1]  # read by the scrape this one waited for
        snapshot = queue_snapshot(database_required=False)
        _scrape_snapshot = (time.monotonic(), snapshot)
        return snapshot
    finally:
        _scrape_read.release()
