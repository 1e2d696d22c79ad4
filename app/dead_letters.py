"""Dead letters: messages whose retries ran out, recorded, listed and purged on the broker's own data.

The broker says which messages are dead (`app.dead_letter_queue` reads its keys); the `dead_letters`
table adds what the broker cannot keep (the final error and retry count, recorded by the worker at
the nack) and the integer id of the contract. A dead message the worker could not record (the
database was down) is adopted from its body when listed, and a requeue works from the row even if
Redis has lost the entry (`app.dead_letter_requeue`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import redis
from dramatiq.common import q_name
from sqlalchemy import Select, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, defer

from app.db import in_batches, transaction
from app.dead_letter_queue import BrokerEntry, dead_messages, holds_entry, take_entry, with_bodies
from app.dispatch import Delivered
from app.errors import (
    NotFound,
    ServiceUnavailable,
)
from app.models import DeadLetter
from app.outages import in_one_line
from app.paging import PAGE_OF_A_WHOLE_LIST, check_cursor, every_row, moment_cursor, older_than, page_of
from app.redis_client import redis_location
from app.run_kinds import run_id_of, statuses_of_runs

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class DeadLetterView:
    row: DeadLetter
    run_status: str | None
    in_broker: bool | None
    """False when the broker no longer holds the message (Redis lost it); None when Redis is unreachable."""


@dataclass(frozen=True, slots=True)
class DeadLetterPage:
    items: list[DeadLetterView]
    next_cursor: str | None


def error_summary(trace: str | None) -> str | None:
    """The `Type: message` line of the last exception in a formatted traceback.

    Not simply the last line: SQLAlchemy and psycopg append the SQL, its parameters and a link. Nor the line
    after the last indented one: PostgreSQL's message points at the SQL with an indented caret, and the
    `HINT:` after it was taken for the error. It is the first line after the last frame (`  File …` and its
    indented source lines) that is not indented.
    """
    lines = (trace or "").rstrip().splitlines()
    if not lines:
        return None
    last_frame = max((i for i, line in enumerate(lines) if line.startswith('  File "')), default=-1)
    return next((line for line in lines[last_frame + 1:] if line and not line[0].isspace()), lines[-1])


def death_cause(trace: str | None) -> str:
    """A dead letter's `error`, which is never empty: a message that died with no traceback (one that ran out
    of retries by a middleware, or whose options were lost) still says so."""
    return error_summary(trace) or "unknown error"


class _Purged(Exception):
    """The broker no longer holds the message whose row was about to be written."""


def _store(session: Session, values: dict[str, Any], *, overwrite: bool) -> None:
    """Insert the row of a dead message, or (from the worker, which knows best) overwrite its error.

    A new row is written only while the broker still holds the message, checked after the insert and
    before the commit: a purge takes the message out of the broker before it deletes the row, so a
    listing or a late worker that raced it cannot bring back a letter the operator purged."""
    query = select(DeadLetter).where(DeadLetter.redis_message_id == values["redis_message_id"]).with_for_update()
    existing = session.scalar(query)
    if existing is None:
        try:
            with session.begin_nested():
                session.add(DeadLetter(**values))
                session.flush()
                if not holds_entry(values["queue"], values["redis_message_id"]):
                    raise _Purged
            return
        except _Purged:
            return
        except IntegrityError:
            existing = session.scalar(query)
    if existing is not None and overwrite:
        existing.retries, existing.error, existing.traceback = values["retries"], values["error"], values["traceback"]


def record_death(message: Delivered) -> None:
    """Called by the worker as the broker dead-letters `message`: keep its final error and retry count."""
    trace = message.options.get("traceback")
    attempts = int(message.options.get("retries", 0))
    args = list(message.args)
    with transaction() as session:
        _store(session, {
            "redis_message_id": message.options["redis_message_id"], "queue": q_name(message.queue_name),
            "actor": message.actor_name, "args": args, "run_id": run_id_of(message.actor_name, args),
            "retries": max(attempts - 1, 0), "error": death_cause(trace), "traceback": trace,
        }, overwrite=True)


def _adopt(session: Session, entry: BrokerEntry) -> None:
    """A dead message no worker recorded: what its body says (the state of its last enqueue) must do."""
    message = entry.message
    actor = message.actor_name if message else "unknown"
    args = list(message.args) if message else []
    options = message.options if message else {}
    error = death_cause(options.get("traceback"))
    _store(session, {
        "redis_message_id": entry.redis_message_id, "queue": entry.queue, "actor": actor, "args": args,
        "run_id": run_id_of(actor, args), "retries": int(options.get("retries", 0)),
        "error": f"{error} (from the broker's copy; the last attempt was not recorded)",
        "traceback": options.get("traceback"), "dead_at": entry.dead_at,
    }, overwrite=False)


def _reconcile() -> set[str] | None:
    """Adopt dead messages without a row and drop broker entries already requeued; the ids the broker holds.

    None when Redis is unreachable: the rows alone are listed then.
    """
    try:
        dead = dead_messages()
        with transaction() as session:  # not their tracebacks: what a listing returns it reads afterwards
            known = {row.redis_message_id: row for batch in in_batches(dead) for row in session.execute(
                select(DeadLetter.redis_message_id, DeadLetter.queue, DeadLetter.requeued_at)
                .where(DeadLetter.redis_message_id.in_(batch)))}
        # Only these bodies are read: a listing read every letter's, tracebacks and all, at each look.
        entries = with_bodies([message for ident, message in dead.items() if ident not in known])
    except redis.RedisError as exc:
        log.warning("Redis at %s could not be read (%s); dead letters are listed from the database alone",
                    redis_location(), in_one_line(exc))
        return None
    if entries:
        with transaction() as session:
            for entry in entries:
                _adopt(session, entry)
    for ident, row in known.items():
        if row.requeued_at is not None:
            take_entry(row.queue, ident)
    return {ident for ident in dead if ident not in known or known[ident].requeued_at is None}


def open_dead_letters(held: dict[str, set[str]]) -> dict[str, int]:
    """How many dead letters each queue has, as `list_dead_letters` lists them, given the ids its broker holds:
    the open rows (a requeue works from the row, even once Redis lost the entry) and the entries no row
    records yet (the next listing adopts them); an entry whose row was requeued is none."""
    columns = (DeadLetter.queue, DeadLetter.redis_message_id)
    with transaction() as session:
        open_rows = session.execute(select(*columns).where(DeadLetter.requeued_at.is_(None))).all()
        recorded = {row.redis_message_id for row in open_rows}
        for batch in in_batches(set().union(*held.values())):
            recorded.update(session.scalars(select(DeadLetter.redis_message_id)
                                            .where(DeadLetter.redis_message_id.in_(batch))))
    counts = {queue: len(ids - recorded) for queue, ids in held.items()}
    for row in open_rows:
        counts[row.queue] = counts.get(row.queue, 0) + 1
    return counts


def _views(rows: list[DeadLetter], in_broker: set[str] | None) -> list[DeadLetterView]:
    with transaction() as session:
        statuses = statuses_of_runs(session, [(row.actor, row.run_id) for row in rows])
    return [
        DeadLetterView(row, statuses.get((row.actor, row.run_id)),
                       None if in_broker is None else row.redis_message_id in in_broker)
        for row in rows
    ]


def list_dead_letters(limit: int, cursor: str | None = None) -> DeadLetterPage:
    """A page of the open dead letters, the most recent first; `next_cursor` gives the next."""
    return _page(_reconcile(), limit, cursor)


def every_dead_letter(cursor: str | None = None) -> Iterator[DeadLetterView]:
    """Every open dead letter (after `cursor`), the most recent first, read a page at a time after one
    reconciliation with the broker: tens of thousands of them are listed without all of their rows in memory
    at once."""
    if cursor:
        check_cursor(cursor)
    in_broker = _reconcile()

    def read(after: str | None) -> tuple[list[DeadLetterView], str | None]:
        page = _page(in_broker, PAGE_OF_A_WHOLE_LIST, after)
        return page.items, page.next_cursor

    return every_row(read, cursor or None)


def page_query(limit: int, cursor: str | None) -> Select[DeadLetter]:
    """The open letters after `cursor`, one more than a page, without their tracebacks: only one letter's detail
    shows those, and they run to tens of kilobytes."""
    query = (select(DeadLetter).options(defer(DeadLetter.traceback)).where(DeadLetter.requeued_at.is_(None))
             .order_by(DeadLetter.dead_at.desc(), DeadLetter.id.desc()).limit(limit + 1))
    return query.where(older_than(DeadLetter.dead_at, DeadLetter.id, cursor)) if cursor else query


def _page(in_broker: set[str] | None, limit: int, cursor: str | None) -> DeadLetterPage:
    with transaction() as session:
        rows, next_cursor = page_of(list(session.scalars(page_query(limit, cursor))), limit,
                                    lambda row: moment_cursor(row.dead_at, row.id))
    return DeadLetterPage(_views(rows, in_broker), next_cursor)


def open_letter(dead_letter_id: int, row: DeadLetter | None) -> DeadLetter:
    """The row of a dead letter that is still one, or its 404: a letter is open until requeued, and a requeued
    one is gone to its readers as a purged one is, and says so, for a show, a requeue and a purge alike (a
    second requeue read as a race lost, and a purge of a requeued letter as an id never given)."""
    if row is None:
        raise NotFound(f"Dead letter {dead_letter_id} does not exist.")
    if row.requeued_at is not None:
        raise NotFound(f"Dead letter {dead_letter_id} was requeued already; its run went back to the queue and it "
                       "is no longer a dead letter.")
    return row


def lock_open_letter(session: Session, dead_letter_id: int) -> DeadLetter:
    """The open dead letter's row, locked for the change a requeue or a purge makes, or its 404 (`open_letter`)."""
    return open_letter(dead_letter_id, session.scalar(
        select(DeadLetter).where(DeadLetter.id == dead_letter_id).with_for_update()))


def get_dead_letter(dead_letter_id: int) -> DeadLetterView:
    in_broker = _reconcile()
    with transaction() as session:
        row = open_letter(dead_letter_id, session.get(DeadLetter, dead_letter_id))
    return _views([row], in_broker)[0]


def purge(dead_letter_id: int) -> None:
    """Forget a dead letter for good: out of the broker first, then its row; its run stays as it ended."""
    with transaction() as session:
        row = lock_open_letter(session, dead_letter_id)
        try:
            take_entry(row.queue, row.redis_message_id)
        except redis.RedisError as exc:
            raise ServiceUnavailable("Redis is unreachable; the dead letter was kept.") from exc
        session.delete(row)


def purge_all() -> list[int]:
    purged = []
    for view in every_dead_letter():
        try:
            purge(view.row.id)
        except NotFound:
            continue
        purged.append(view.row.id)
    return purged


__all__ = ["DeadLetterPage", "DeadLetterView", "death_cause", "error_summary", "every_dead_letter", "get_dead_letter",
           "list_dead_letters", "open_dead_letters", "purge", "purge_all", "record_death"]
