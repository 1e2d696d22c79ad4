"""The two kinds of run the workers execute, a user's turn and an admin test run: what each is (its table,
columns, actor and queue), and the writes every kind makes alike on its own table (its outbox mark, a lease
given up or taken back, the fallback's mark, the hand-over to a retry, its end written through an outage).

Much of what surrounds a run does not care which kind it is: sending it and leaving it to recovery
when the send fails (`app.outbox`), the recovery sweep, lease renewal (`app.leases`), a stuck or
failed delivery giving up its lease, a dead letter's run status and its re-send, a stopping worker's
hand-back. Those places take the kind from here (by its actor's name when all they have is a Dramatiq
message) instead of naming tables, columns and queues themselves. What does differ (a turn's
conversation lock, user slot, reservation, charge and live stream) stays with each kind's state
machine and runner, which the few places that need it still choose between.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

from sqlalchemy import ColumnElement, exists, null, select, true, tuple_, update
from sqlalchemy.orm import InstrumentedAttribute, Session

from app import dispatch, queues
from app.claims import LeaseLost
from app.clock import DatabaseNow, lease_expiry, lease_now, lease_time
from app.config import get_settings
from app.db import in_batches, rows_changed, transaction
from app.deliveries import fallback_mark_wait, outage_wait_seconds, retry_hand_over
from app.failure_logs import warn_of
from app.logging_setup import run_context
from app.models import ConversationMessage, DebugRun, Turn
from app.models.base import LARGEST_ID
from app.outages import waiting_out_outages
from app.turn_status import TurnStatus

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RenewedLease:
    """A lease the keeper's renewal found still held, and whether its run's user asked it to stop meanwhile: the
    renewal reads the stop with the lease, so a stop needs no look of its own."""

    ident: int
    token: str
    stop_asked: bool


@dataclass(frozen=True, eq=False)
class RunKind:
    """One kind of run; compared by identity (`kind is TURN`)."""

    label: str
    """What logs and operators call a run of this kind."""
    actor: str
    """The Dramatiq actor that runs it; its message's only argument is the run's id."""
    queue: str
    model: type[Turn] | type[DebugRun]
    """The table holding the run's outbox mark, lease and delivery count."""
    key: InstrumentedAttribute[int]
    """The column of `model` that is the run's id (a turn's id is its answer message's)."""
    status_row_id: InstrumentedAttribute[int]
    status: InstrumentedAttribute[str]
    """The run's status, and the id column of the row that holds it: a turn's is on its answer message,
    which the API reads, not on `model`."""
    stop_requested_at: InstrumentedAttribute[datetime | None] | None
    """The column a user's stop of the run is recorded in (`app.turn_state.request_stop`), which the lease
    keeper's renewal reads; None for an admin test run, which no one stops."""
    streams_live: bool
    """Its answer is streamed to readers as it comes (a turn's Redis Stream, `app.live_stream`); an admin test
    run's output is written once, at its end."""
    error_shown_whole: bool
    """Its reader sees a failure's whole message: an admin's test run does; a turn's user reads only the
    exception's type, since its message can hold SQL, a host or a file path (its dead letter keeps it for the
    operators)."""

    def log_ids(self, ident: int) -> tuple[int | None, int | None]:
        """The run's ids as log lines carry them (`app.logging_setup.run_context`): a turn's, or a test run's."""
        return (ident, None) if self.model is Turn else (None, ident)

    def log_context(self, ident: int) -> AbstractContextManager[None]:
        """Lines logged in the block name the run (`[turn N]`, `[test run N]`), as a worker's lines do."""
        return run_context(*self.log_ids(ident))

    def send(self, ident: int, enqueued_at: datetime | None) -> bool:
        """Enqueue a run's message, named after the outbox mark written for it; False when the broker could
        not take it (see `app.outbox`)."""
        return dispatch.enqueue(self.queue, self.actor, ident, enqueued_at)

    def claim_outbox_mark(self, session: Session, ident: int, seen: datetime | None, mark: datetime) -> bool:
        """Set the run's outbox mark to `mark` if it is still `seen`, so that of two sweepers only one sends
        the run again; False for the other."""
        still_seen = self.model.enqueued_at.is_(None) if seen is None else self.model.enqueued_at == seen
        return self._write_outbox_mark(session, ident, mark, still_seen)

    def clear_outbox_mark(self, session: Session, ident: int) -> None:
        """The run was not sent: the recovery sweep sends it once Redis answers (`app.outbox`)."""
        self._write_outbox_mark(session, ident, None, true())

    def _write_outbox_mark(self, session: Session, ident: int, mark: datetime | None,
                           condition: ColumnElement[bool]) -> bool:
        """The run's `updated_at` is left as it is: it says when the run's status last changed, which the
        pending bound reads (`app.pending_bound`), and a send is no change of status."""
        return rows_changed(session, update(self.model).where(self.key == ident, condition)
                            .values(enqueued_at=mark, updated_at=self.model.updated_at)
                            .execution_options(synchronize_session=False)) == 1

    def revoke_lease(self, session: Session, ident: int, token: str, *, swept_after: datetime | None = None,
                     handed_back: bool = False) -> bool:
        """Take a run from the delivery holding lease `token`: its lease keeper finds the lease gone and stops
        it, and the write that would end the run is refused (the lease guards it). False when `token` no
        longer holds it. Any delivery's claim may take the run over at once; the recovery sweep sends it
        again only after `swept_after` (at once without it). A delivery `handed_back` by its worker's graceful
        stop is counted apart (`Turn.handed_back`)."""
        counted = {"handed_back": self.model.handed_back + 1} if handed_back else {}
        return rows_changed(session, update(self.model).where(self.key == ident, self.model.lease_token == token)
                            .values(lease_token=None, lease_expires_at=swept_after, **counted)
                            .execution_options(synchronize_session=False)) == 1

    def end_lease_now(self, session: Session, ident: int, token: str, now: datetime, *,
                      unrenewed_before: datetime) -> bool:
        """Run out lease `token` at `now`, its token kept, if it still expires before `unrenewed_before` (its
        holder has not renewed it since it was judged silent: `app.silent_holders`). The next claim takes the run
        over from it as from a lease that ran out by itself (a turn's takeover records the holder's calls:
        `app.interrupted_calls`), and a holder alive after all renews it back as it would such a lease. False
        when `token` no longer holds it, or was renewed."""
        return rows_changed(session, update(self.model).where(
            self.key == ident, self.model.lease_token == token, self.model.lease_expires_at < unrenewed_before)
            .values(lease_expires_at=now).execution_options(synchronize_session=False)) == 1

    def renew_leases(self, session: Session, pairs: Sequence[tuple[int, str]], expires: datetime) -> list[RenewedLease]:
        """Move on to `expires` the lease of each run still held by its token of `pairs` (run, lease token): those
        not renewed were taken over, or ended. Each renewed lease says whether the run's stop was asked for."""
        # The column itself, judged here: SQLite (3.40) evaluates `cancel_requested_at IS NOT NULL` in a RETURNING
        # clause as true on a NULL, which stopped every turn at its first renewal there.
        stop_asked = self.stop_requested_at if self.stop_requested_at is not None else null()
        rows = session.execute(update(self.model).where(tuple_(self.key, self.model.lease_token).in_(pairs))
                               .values(lease_expires_at=expires)
                               .returning(self.key, self.model.lease_token, stop_asked.label("stop_asked"))
                               .execution_options(synchronize_session=False)).all()
        return [RenewedLease(ident, cast(str, token), asked is not None)  # matched by its token: never null
                for ident, token, asked in rows]

    def take_back_lease(self, session: Session, ident: int, token: str, delivery: int) -> bool:
        """The delivery that held lease `token` until a hand-back revoked it (`app.leases.LeaseKeeper.ending`) takes
        it again, its model calls having ended on their own: only while the run is still processing and no other
        delivery has claimed it since (any claim writes a token of its own and counts one more delivery). True
        also when the revocation never committed (the token is still `token`). The rows are locked first, as a
        claim locks them: a run ended meanwhile by an unheld end (its deadline passed) is then seen ended, where
        a status read beside the UPDATE could be older than the row it changes. The hand-back it undoes is not
        counted (`Turn.handed_back`)."""
        row = session.execute(select(self.model.lease_token, self.model.deliveries, self.status,
                                     DatabaseNow().label("now"))
                              .where(self.key == ident, self.status_row_id == self.key).with_for_update()).first()
        if row is None or row.status != TurnStatus.PROCESSING or row.deliveries != delivery \
                or row.lease_token not in (None, token):
            return False
        undone = {"handed_back": self.model.handed_back - 1} if row.lease_token is None else {}
        expires = lease_expiry(lease_time(row.now), get_settings().lease_seconds)
        session.execute(update(self.model).where(self.key == ident)
                        .values(lease_token=token, lease_expires_at=expires, **undone)
                        .execution_options(synchronize_session=False))
        return True

    def write_end(self, ident: int, stamp: datetime, write: Callable[[], None], *, what: str) -> None:
        """`write()`, a run's settlement stamped `stamp`, with a database outage waited out (the models were
        paid for: `app.outages.waiting_out_outages`). An outage can cut the connection after the server
        committed the end and before its reply came back; the next try then finds the lease given up and
        is refused as `LeaseLost`, as it is after a takeover. The stamp tells the two apart: a run ended
        with it was ended by this settlement, which is then done."""

        def once() -> None:
            try:
                write()
            except LeaseLost:
                if not self.ended_with(ident, stamp):
                    raise
                log.info("%s %s: its end had been written before the connection to the database dropped",
                         self.label, ident)

        waiting_out_outages(once, for_seconds=outage_wait_seconds(), what=what)

    def ended_with(self, ident: int, stamp: datetime) -> bool:
        """Whether the run's lease was given up by an end stamped `stamp` (its `updated_at`)."""
        with transaction() as session:
            return bool(session.scalar(select(exists().where(
                self.key == ident, self.model.lease_token.is_(None), self.model.updated_at == stamp))))

    def mark_fell_back(self, ident: int, token: str, *, ends_by: float | None, stop: threading.Event) -> bool:
        """The delivery holding lease `token` switches the run to its fallback: a delivery that takes the run
        over (its worker died during the fallback's call) reads this with its claim and calls the fallback
        alone, where it called the primary that had just failed again, switching twice in one run (the
        contract's guarantee 6). Written before the fallback's call, a round trip of a millisecond or two, so
        that a worker killed during that call has left it. A database out of reach is waited out first, within
        the delivery's model time (`app.deliveries.fallback_mark_wait`): called without its mark, the fallback
        could be followed by a second switch, and the run could not be settled meanwhile either. A stop ends
        the wait (the caller then stops before the call). A failure that is no outage, or an outage that
        outlasts that wait, is logged and the fallback called all the same: the answer comes before the record.

        False when `token` no longer holds the run (taken over, or handed back meanwhile): the fallback is then
        not called by this delivery, whose answer could not be written anyway."""

        def write() -> bool:
            if stop.is_set():
                return True
            with transaction() as session:
                return rows_changed(session, update(self.model)
                                    .where(self.key == ident, self.model.lease_token == token)
                                    .values(fell_back=True).execution_options(synchronize_session=False)) == 1

        try:
            return waiting_out_outages(write, for_seconds=fallback_mark_wait(ends_by),
                                       what=f"recording that {self.label} {ident} switched to its fallback")
        except Exception as exc:
            warn_of(log, exc, "could not record that %s %s switched to its fallback", self.label, ident)
            return True

    def hand_to_retry(self, ident: int, token: str) -> None:
        """A delivery that failed hands its run to Dramatiq's retry: its lease is revoked, so the retry's claim
        takes the run over at once instead of waiting for the lease to run out, and the sweep leaves it to
        that retry for `app.deliveries.retry_hand_over`. If even that write fails, the lease runs out by
        itself."""
        try:
            with transaction() as session:
                self.revoke_lease(session, ident, token, swept_after=lease_now(session) + retry_hand_over())
        except Exception as exc:
            warn_of(log, exc, "could not give up the lease of %s %s; it runs out by itself", self.label, ident)


TURN = RunKind("turn", queues.RUN_TURN, queues.TURNS_QUEUE, Turn, Turn.assistant_message_id,
               ConversationMessage.id, ConversationMessage.status, stop_requested_at=Turn.cancel_requested_at,
               streams_live=True, error_shown_whole=False)
DEBUG_RUN = RunKind("test run", queues.RUN_DEBUG, queues.DEBUG_QUEUE, DebugRun, DebugRun.id,
                    DebugRun.id, DebugRun.status, stop_requested_at=None, streams_live=False,
                    error_shown_whole=True)
KINDS = (TURN, DEBUG_RUN)


def kind_of(actor: str) -> RunKind | None:
    """The kind of run a message of `actor` carries; None for a message that is not a run."""
    return next((kind for kind in KINDS if kind.actor == actor), None)


def run_of(actor: str, args: Sequence[Any]) -> tuple[RunKind, int] | None:
    """The kind and id of the run a message of `actor` with `args` carries; None for any other message,
    one whose argument could be no run's id included (a message not sent by agentq: its id out of a
    BIGINT's range would fail every query it reached, the dead letters' listing among them)."""
    kind = kind_of(actor)
    if kind is None or not args or type(args[0]) is not int or not 1 <= args[0] <= LARGEST_ID:
        return None
    return kind, args[0]


def run_id_of(actor: str, args: Sequence[Any]) -> int | None:
    run = run_of(actor, args)
    return None if run is None else run[1]


RunStatuses = dict[tuple[str, int | None], str]
"""Run statuses by actor and run id: looked up with a message's `(actor, run_id)`, a run id of None (a
message that carries no run) finds none."""


def statuses_of_runs(session: Session, runs: Sequence[tuple[str, int | None]]) -> RunStatuses:
    """The status of each run named by its actor and id (a dead letter's, a waiting retry's), read a thousand
    ids to a statement; a run that no longer exists has none."""
    statuses: RunStatuses = {}
    for kind in KINDS:
        idents = [ident for actor, ident in runs if actor == kind.actor and ident is not None]
        for batch in in_batches(idents):
            for ident, status in session.execute(select(kind.status_row_id, kind.status)
                                                 .where(kind.status_row_id.in_(batch))):
                statuses[(kind.actor, ident)] = status
    return statuses
