"""Sending a committed run to the workers, or leaving it marked for recovery.

Every caller sends only after its transaction committed. A send that fails (Redis down) empties the
run's outbox mark (`enqueued_at`), which is what the recovery sweep looks for: the run is sent as soon
as Redis is back, never stranded. This is the one place that rule lives.
"""

from __future__ import annotations

import logging

from sqlalchemy import update

from app import dispatch
from app.db import transaction
from app.models import DebugRun, Turn

log = logging.getLogger(__name__)


def send_turn(turn_id: int) -> bool:
    if dispatch.send_turn(turn_id):
        return True
    _leave_for_recovery(Turn, turn_id)
    return False


def send_debug_run(run_id: int) -> bool:
    if dispatch.send_debug_run(run_id):
        return True
    _leave_for_recovery(DebugRun, run_id)
    return False


def _leave_for_recovery(model: type[Turn] | type[DebugRun], ident: int) -> None:
    column = Turn.assistant_message_id if model is Turn else DebugRun.id
    try:
        with transaction() as session:
            session.execute(update(model).where(column == ident).values(enqueued_at=None)
                            .execution_options(synchronize_session=False))
    except Exception:
        log.warning("could not clear the outbox mark of %s %s; the stale-pending sweep sends it",
                    model.__tablename__, ident, exc_info=True)
