"""Ending the runs that a look of the recovery sweep or of an API process's loop found held by no worker.

The two bounds that need no delivery (`app.pending_bound`: waiting too long; `app.deadline_bound`: past the
deadline) find their runs by one query, then end each in a transaction of its own, judged again under the
run's lock (`abandon`: `app.unowned_end.abandon_turn`, `app.debug_runner.abandon_run`), so a worker that claimed the run
since the look, or another process ending it at once, changes nothing twice.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from datetime import datetime

from sqlalchemy import ColumnElement, Table, select
from sqlalchemy.orm import Session

from app.debug_runner import abandon_run
from app.in_flight import answer_in_flight
from app.models import ConversationMessage, DebugRun, Turn, table
from app.outages import log_failure
from app.prepared import Prepared
from app.run_kinds import TEST_RUN, TURN, RunKind
from app.turn_status import TurnStatus
from app.unowned_end import abandon_turn

log = logging.getLogger(__name__)


def ids_found(turn: Callable[[Table, Table], ColumnElement[bool]],
              test_run: Callable[[Table], ColumnElement[bool]]) -> dict[RunKind, Prepared]:
    """A look's query for each kind: the ids of the turns in flight for which `turn(turns, messages)` holds (a
    turn's status is on its answer's row), and of the test runs for which `test_run(runs)` does."""
    turns, messages, runs = table(Turn), table(ConversationMessage), table(DebugRun)
    return {
        TURN: Prepared(select(turns.c.assistant_message_id)
                       .join_from(turns, messages, messages.c.id == turns.c.assistant_message_id)
                       .where(answer_in_flight(messages), turn(turns, messages))),
        TEST_RUN: Prepared(select(runs.c.id).where(test_run(runs))),
    }


def abandon(kind: RunKind, ident: int, reason: str, *, pending_before: datetime | None = None,
            deadline_before: datetime | None = None,
            unless: Callable[[Session], bool] | None = None) -> TurnStatus | None:
    """End a run of `kind` that no worker holds, as `error` with `reason` (`cancelled` for a turn whose user had
    asked it to stop): `abandon_turn`'s and `abandon_run`'s terms. The status written, None when not ended."""
    end = abandon_turn if kind is TURN else abandon_run
    return end(ident, reason, pending_before=pending_before, deadline_before=deadline_before, unless=unless)


def end_unheld(kind: RunKind, idents: Iterable[int], reason: str, found: str, *,
               pending_before: datetime | None = None, deadline_before: datetime | None = None) -> list[int]:
    """End each run of `kind` (`abandon`) if its lock finds it still as the look `found` it (pending since before
    `pending_before`, or processing past a deadline before `deadline_before`); the ids it ended. One that cannot
    be ended now (the database away for a moment) is left to the next look, and the others are still ended."""
    ended = []
    for ident in idents:
        try:
            status = abandon(kind, ident, reason, pending_before=pending_before, deadline_before=deadline_before)
        except Exception as error:
            log_failure(log, error, f"ending {kind.label} {ident}, {found}")
            continue
        if status is not None:
            ended.append(ident)
            log.warning("%s %s ended as %s: %s", kind.label, ident, status.value, reason)
    return ended


__all__ = ["abandon", "end_unheld", "ids_found"]
