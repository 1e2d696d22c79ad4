"""Finding work that fell between the cracks and sending it again. Runs in every worker process.

Five cracks, one sweep every `AGENTQ_RECOVERY_INTERVAL_SECONDS`:
- a turn accepted while its Dramatiq message could not be sent (Redis down, API process killed
  after the commit): still `pending`, its outbox mark empty (the send failed) or older than
  `AGENTQ_STALE_PENDING_SECONDS`; or, for the few sweeps after `AGENTQ_ENQUEUE_GRACE_SECONDS` (and for a
  worker process's first sweep, however old), without the receipt its send leaves in Redis
  (`app.dispatch.receipt_key`): its process died before sending it, and it is sent within seconds, not
  minutes (a pending turn with a receipt waits in a queue);
- every `pending` turn after Redis lost its data (its queues went with it), and every `processing`
  one a failed delivery handed to its Dramatiq retry (a lease without a token), noticed because the
  epoch key kept in Redis is gone, or names another run of the Redis server (`app.redis_epoch`: one that
  restarted from a snapshot older than its last messages keeps an old epoch key but not those
  messages); it is set again, to this run, once a sweep has re-sent them all,
  and only if Redis kept the mark that sweep left before sending: lost again meanwhile, it lost the
  re-sent messages too, and the next sweep sends them again);
- a `processing` turn whose lease ran out: its worker died, so another takes it over without waiting
  for Dramatiq's own redelivery; a failed delivery that handed its turn to Dramatiq's retry left an
  expiry as long as a pending turn's message is trusted (`app.deliveries.retry_hand_over`), so its
  retry is not raced by the sweep's message, even behind a backlog;
- a `processing` turn whose worker process has left the workers' list (`app.worker_presence`: its lease token
  names it, `app.lease_tokens`) and has not renewed its lease for two renewal periods
  (`app.silent_holders`): its lease is ended then, 20 s after its last renewal with the default 30 s lease
  rather than 30 s, and the turn is sent again; the delivery that takes it over records the dead worker's
  calls as from a lease that ran out. A holder still listed keeps its lease until it runs out (it is alive,
  its renewals held up), and one alive after all renews its lease back unless a delivery took the turn first;
- a `processing` turn whose worker still renews its lease but is stuck: once it has run longer than
  the agent's timeout for each of its models plus `AGENTQ_TURN_GRACE_SECONDS`, counted from its first
  delivery, its lease is revoked (the stuck run stops at its next write) and the turn is sent again, to
  a delivery that finds the deadline passed and ends it as `error` (as it ends one delivered more than
  `AGENTQ_MAX_DELIVERIES` times). That deadline is written with the lease (`turns.deadline_at`, kept by
  later deliveries: `app.deliveries.delivery_deadline`), so the sweep's query returns only what is
  due: a sweep's cost does not grow with the turns in flight, only with the pending ones sent in the few
  seconds after the enqueue grace, whose receipts it looks up (none unless turns wait in a queue; a
  worker process's first sweep, every pending one younger than the stale-pending rule).
And two bounds, which every API process applies too: a run (a turn or an admin test run) still `pending`
`AGENTQ_MAX_PENDING_SECONDS` after it was accepted (or requeued), behind a backlog or with no worker
serving its queue, is ended as `error` instead of being sent (`app.pending_bound`); and a `processing`
run no delivery holds, one `AGENTQ_LEASE_SECONDS` past its deadline, is ended as `error` rather than
left for a delivery a backlog may hold back (`app.deadline_bound`).
Sending is idempotent (a worker that finds a turn finished or owned does nothing), and a
compare-and-set on `enqueued_at` keeps several sweepers from sending the same turn twice. The last three
cracks take a lease from its holder, which a sweep does only once the database has answered it for a
renewal period (`RecoveryLoop`): after an outage, live holders renew first.
"""

from __future__ import annotations

import logging
import random
import threading
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import cache
from typing import Any, NamedTuple

import redis
from sqlalchemy import ColumnElement, DateTime, and_, bindparam, false, not_, or_, select, true

from app import outbox
from app.claims import lease_not_held, lease_over
from app.clock import lease_now
from app.config import get_settings
from app.db import transaction
from app.deadline_bound import deadline_cutoff, end_past_deadline, unheld_past_deadline
from app.dispatch import receipt_key_of_send, receipt_look_seconds
from app.failure_logs import OUTAGE_REPEAT_SECONDS, log_failure, said_again
from app.in_flight import answer_in_flight, in_flight, status_is
from app.models import ConversationMessage, DebugRun, Turn, table
from app.models.base import utc_now
from app.pending_bound import end_pending_too_long, pending_cutoff, waited_too_long
from app.prepared import Prepared
from app.redis_client import get_redis
from app.redis_epoch import leave_sweep_mark, mark_epoch, redis_at_sweep
from app.run_kinds import DEBUG_RUN, TURN, RunKind
from app.silent_holders import end_silent_lease, renewed_by, runs_of_gone_holders, silent_lease
from app.takeover_gate import TakeoverGate
from app.turn_status import TurnStatus

log = logging.getLogger(__name__)


@dataclass
class RecoveryReport:
    """What a sweep sent, and what kept it from sending, for its loop and its tests. The runs it ends (waiting too
    long for a worker, or past their deadline under no lease) are not here: each end is logged as it is written
    (`app.unheld_ends.abandon`)."""

    sent: list[int] = field(default_factory=list)
    debug_sent: list[int] = field(default_factory=list)
    redis_lost: bool = False
    unsent: int = 0
    receipts_unchecked: bool = False
    """Redis could not be asked for the receipts of the runs due unless it held them (they were not sent)."""


def _claim_send(kind: RunKind, ident: int, seen: datetime | None) -> datetime | None:
    """Compare-and-set the outbox mark so only one sweeper sends this run now; the new mark, which names
    the message, or None when another sweeper took it."""
    marked = utc_now()
    with transaction() as session:
        claimed = kind.claim_outbox_mark(session, ident, seen, marked)
    return marked if claimed else None


@dataclass(frozen=True, slots=True)
class _Conditions:
    due: ColumnElement[bool]
    """Sent again now: pending and never sent (or sent before the stale-pending bound), processing under a lease
    that ran out, or past its deadline under a live one (`overdue`); with Redis's data lost, also the runs
    handed to a retry, which Redis no longer holds."""
    overdue: ColumnElement[bool]
    """Stuck runs, whose live lease is revoked before they are sent again (a run handed to its retry holds
    no lease to revoke)."""
    unconfirmed: ColumnElement[bool]
    """Pending runs sent a little while ago, due unless their send left its receipt in Redis."""
    past_deadline: ColumnElement[bool]
    """Runs past their deadline by the bound's margin that no delivery holds: ended, not sent
    (`app.deadline_bound`)."""
    silent: ColumnElement[bool]
    """Runs held by a lease its holder has not renewed for a while: due if that holder has left the workers' list
    too (`app.silent_holders`)."""


def _due(status: ColumnElement[str], enqueued_at: ColumnElement[datetime | None], created_at: ColumnElement[datetime],
         lease_token: ColumnElement[str | None], lease_expires_at: ColumnElement[datetime | None],
         deadline_at: ColumnElement[datetime | None], *, redis_lost: bool, take_over: bool) -> _Conditions:
    """The five cracks as conditions on a run's columns (a turn's, or an admin test run's), so the
    database returns only what is due, or due unless Redis holds its send's receipt; without `take_over`,
    no run held by a lease (expired or overdue) is."""
    now = bindparam("now", type_=DateTime(timezone=True))
    unsent_before = bindparam("unsent_before", type_=DateTime(timezone=True))
    pending, processing = status_is(status, TurnStatus.PENDING), status_is(status, TurnStatus.PROCESSING)
    unsent = true() if redis_lost else or_(
        and_(enqueued_at.is_(None), created_at < unsent_before),
        enqueued_at < bindparam("stale_before", type_=DateTime(timezone=True)))
    unconfirmed = false() if redis_lost else and_(
        pending, enqueued_at < unsent_before,
        enqueued_at >= bindparam("receipts_since", type_=DateTime(timezone=True)))
    over = lease_over(lease_expires_at, now)
    not_just_sent = or_(enqueued_at.is_(None), enqueued_at <= bindparam("sent_before", type_=DateTime(timezone=True)))
    handed_over = and_(processing, lease_token.is_(None))
    held = not_(lease_not_held(lease_token, lease_expires_at, now))
    overdue = and_(processing, held, deadline_at < now) if take_over else false()
    expired = and_(processing, over, not_just_sent) if take_over else false()
    silent = and_(processing, silent_lease(lease_token, lease_expires_at, now)) if take_over else false()
    due = or_(and_(pending, unsent), expired, overdue, silent)
    past_deadline = unheld_past_deadline(status, lease_token, lease_expires_at, deadline_at) if take_over else false()
    return _Conditions(due=or_(due, handed_over) if redis_lost else due, overdue=overdue,
                       unconfirmed=and_(unconfirmed, not_(due)), past_deadline=past_deadline, silent=silent)


class _Cutoffs(NamedTuple):
    """The moments one sweep judges runs by, all from the database's clock; named as the due-runs queries' binds."""

    now: datetime
    unsent_before: datetime
    """A run committed before this and never sent is due (its own process had `enqueue_grace_seconds` to send it)."""
    receipts_since: datetime
    """A run sent since this, and before `unsent_before`, is due unless its send left a receipt in Redis."""
    stale_before: datetime
    """A pending run sent before this is due again (`stale_pending_seconds`)."""
    sent_before: datetime
    """A run whose lease ran out is due only if it was not sent again since this (a lease ago)."""
    renewed_by: datetime
    """A lease that expires before this went unrenewed (`app.silent_holders.renewed_by`)."""
    pending_before: datetime
    """A run pending since before this waited too long and is ended (`app.pending_bound`)."""
    deadline_before: datetime
    """A run past a deadline before this that no delivery holds is ended (`app.deadline_bound`)."""


def _cutoffs(now: datetime, *, first_sweep: bool) -> _Cutoffs:
    settings = get_settings()
    unsent_before = now - timedelta(seconds=settings.enqueue_grace_seconds)
    return _Cutoffs(now=now, unsent_before=unsent_before,
                    receipts_since=unsent_before - timedelta(seconds=receipt_look_seconds(first_sweep=first_sweep)),
                    stale_before=now - timedelta(seconds=settings.stale_pending_seconds),
                    sent_before=now - timedelta(seconds=settings.lease_seconds),
                    renewed_by=renewed_by(now), pending_before=pending_cutoff(now),
                    deadline_before=deadline_cutoff(now))


class _DueRuns(NamedTuple):
    turns: Prepared
    runs: Prepared


@cache
def _due_runs(redis_lost: bool, take_over: bool) -> _DueRuns:
    turns, messages, runs = table(Turn), table(ConversationMessage), table(DebugRun)
    turn = _due(messages.c.status, turns.c.enqueued_at, turns.c.created_at, turns.c.lease_token,
                turns.c.lease_expires_at, turns.c.deadline_at, redis_lost=redis_lost, take_over=take_over)
    turn_too_long = waited_too_long(messages.c.status, messages.c.updated_at)  # ended, not sent
    run = _due(runs.c.status, runs.c.enqueued_at, runs.c.created_at, runs.c.lease_token,
               runs.c.lease_expires_at, runs.c.deadline_at, redis_lost=redis_lost, take_over=take_over)
    run_too_long = waited_too_long(runs.c.status, runs.c.updated_at)
    return _DueRuns(
        turns=Prepared(
            select(turns.c.assistant_message_id.label("ident"), turns.c.enqueued_at, turns.c.lease_token,
                   turn.overdue.label("overdue"), turn.silent.label("silent"), turn.unconfirmed.label("unconfirmed"),
                   turn_too_long.label("waited_too_long"), turn.past_deadline.label("past_deadline"))
            .join_from(turns, messages, messages.c.id == turns.c.assistant_message_id)
            .where(answer_in_flight(messages), or_(turn.due, turn.unconfirmed, turn_too_long, turn.past_deadline))),
        runs=Prepared(
            select(runs.c.id.label("ident"), runs.c.enqueued_at, runs.c.lease_token, run.overdue.label("overdue"),
                   run.silent.label("silent"), run.unconfirmed.label("unconfirmed"),
                   run_too_long.label("waited_too_long"), run.past_deadline.label("past_deadline"))
            .where(in_flight(runs.c.status), or_(run.due, run.unconfirmed, run_too_long, run.past_deadline))),
    )


def _revoke_overdue(kind: RunKind, ident: int, token: str | None) -> bool:
    if token is None:
        return False
    with transaction() as session:
        revoked = kind.revoke_lease(session, ident, token)
    if revoked:
        log.warning("%s %s ran past its timeout and grace; its lease is revoked and it is sent again",
                    kind.label, ident)
    return revoked


def _without_receipt(rows: list[Any], kind: RunKind, report: RecoveryReport) -> list[Any]:
    """The due rows, and the unconfirmed ones whose send left no receipt in Redis (one round trip for all).
    Redis unreachable: only the due ones (a send would fail as well), and the report says so."""
    unconfirmed = [row for row in rows if row.unconfirmed]
    if not unconfirmed:
        return rows
    try:
        pipe = get_redis().pipeline(transaction=False)
        for row in unconfirmed:
            pipe.exists(receipt_key_of_send(kind.actor, row.ident, row.enqueued_at))
        received = pipe.execute()
    except redis.RedisError:
        report.receipts_unchecked = True
        return [row for row in rows if not row.unconfirmed]
    lost = {row.ident for row, found in zip(unconfirmed, received, strict=True) if not found}
    return [row for row in rows if not row.unconfirmed or row.ident in lost]


def _judged_silent(row: Any) -> bool:
    """A run due only because its lease went unrenewed (one also overdue is revoked as overdue)."""
    return bool(row.silent) and not row.overdue


def _send_due(rows: list[Any], kind: RunKind, now: datetime, sent: list[int], report: RecoveryReport) -> None:
    """Send each due run again (an overdue one once its lease is revoked, a silent one once its lease is ended, if
    its holder is gone), unless another sweeper just did."""
    due = _without_receipt(rows, kind, report)
    gone = runs_of_gone_holders([row for row in due if _judged_silent(row)])
    for row in due:
        ident = row.ident
        if row.overdue and not _revoke_overdue(kind, ident, row.lease_token):
            continue
        if _judged_silent(row) and (ident not in gone or not end_silent_lease(kind, ident, row.lease_token, now)):
            continue
        marked = _claim_send(kind, ident, row.enqueued_at)
        if marked is not None:
            if row.unconfirmed:
                log.warning("%s %s was committed, but its send left no receipt in Redis (its process died before "
                            "sending it?); sending it now", kind.label, ident)
            if outbox.send(kind, ident, marked):
                sent.append(ident)
            else:
                report.unsent += 1


def _end_or_send(rows: list[Any], kind: RunKind, cutoffs: _Cutoffs, sent: list[int], report: RecoveryReport, *,
                 redis_reachable: bool) -> None:
    """End the rows that waited too long (`app.pending_bound`) or are past their deadline under no lease
    (`app.deadline_bound`), and send the others that are due, unless Redis did not answer as the sweep began."""
    end_pending_too_long(kind, [row.ident for row in rows if row.waited_too_long], cutoffs.pending_before)
    end_past_deadline(kind, [row.ident for row in rows if row.past_deadline], cutoffs.deadline_before)
    due = [row for row in rows if not (row.waited_too_long or row.past_deadline)]
    if redis_reachable:
        _send_due(due, kind, cutoffs.now, sent, report)
    else:
        report.unsent += len(due)


def _say_unsent_while_redis_is_away(report: RecoveryReport) -> None:
    """Each due run's send, tried while Redis was away, failed alike: two transactions and a send a run, at
    every sweep, a line each (and, with a Redis that hangs rather than refuses, a socket timeout each, which
    held the sweep, and the leases it takes over, for minutes). The sweep sends none then, and says so at
    most every `OUTAGE_REPEAT_SECONDS`."""
    if report.unsent and (since := said_again(log.name, "the recovery sweep's sends", "sweeps")) is not None:
        log.warning("Redis is out of reach: %d due runs are left for a sweep that reaches it, said at most every "
                    "%g s%s", report.unsent, OUTAGE_REPEAT_SECONDS, since)


def recover_once(*, first_sweep: bool = False, gate: TakeoverGate | None = None) -> RecoveryReport:
    """One sweep; a worker process's first looks further back for runs without a receipt
    (`app.dispatch.receipt_look_seconds`). Unless its `gate` is open once the database has answered this
    sweep, it leaves every run held by a lease to its holder, expired or overdue (no gate: it is open)."""
    redis_now = redis_at_sweep()
    lost_run = redis_now.lost_run
    report = RecoveryReport(redis_lost=lost_run is not None, receipts_unchecked=not redis_now.reachable)
    sweep_mark = leave_sweep_mark(lost_run) if lost_run is not None else None
    with transaction() as session:
        now = gate.database_now(session) if gate is not None else lease_now(session)
        due = _due_runs(report.redis_lost, gate is None or gate.open)
        cutoffs = _cutoffs(now, first_sweep=first_sweep)
        binds = cutoffs._asdict()
        turns, runs = due.turns(session, binds).rows, due.runs(session, binds).rows
    _end_or_send(turns, TURN, cutoffs, report.sent, report, redis_reachable=redis_now.reachable)
    _end_or_send(runs, DEBUG_RUN, cutoffs, report.debug_sent, report, redis_reachable=redis_now.reachable)
    if not redis_now.reachable:
        _say_unsent_while_redis_is_away(report)
    if report.redis_lost and report.unsent == 0:
        mark_epoch(sweep_mark)
    if report.sent or report.debug_sent:
        log.info("recovery re-sent turns %s and test runs %s (redis lost data: %s)",
                 report.sent, report.debug_sent, report.redis_lost)
    return report


class RecoveryLoop:
    """The sweep on a timer, in a daemon thread, with jitter so processes do not sweep in step.

    It takes no lease over (an expired one, or one past its deadline), and ends no run past its deadline,
    until its `app.takeover_gate.TakeoverGate` opens: the database has answered its sweeps for a lease renewal
    period, in which a live holder renews its own lease after an outage.
    """

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="recovery", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        interval = get_settings().recovery_interval_seconds
        first_sweep = True
        gate = TakeoverGate()
        while not self._stop.wait(interval * random.uniform(0.5, 1.0)):
            try:
                report = recover_once(first_sweep=first_sweep, gate=gate)
            except Exception as error:
                gate.failed(error)
                log_failure(log, error, "the recovery sweep")
                continue
            first_sweep = report.receipts_unchecked and first_sweep


__all__ = ["RecoveryLoop", "RecoveryReport", "recover_once"]
