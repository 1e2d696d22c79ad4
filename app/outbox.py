"""Sending a committed run to the workers, or leaving it marked for recovery.

Every caller sends only after its transaction committed. A send that fails (Redis down) empties the
run's outbox mark (`enqueued_at`), which is what the recovery sweep looks for: the run is sent as soon
as Redis is back, never stranded. This is the one place that rule lives.
"""

from __future__ import annotations

import logging
from datetime import datetime

from sqlalchemy import update

from app.db import transaction
from app.run_kinds import RunKind

log = logging.getLogger(__name__)


def send(kind: RunKind, ident: int, enqueued_at: datetime | None) -> bool:
    """Send a committed run, or leave it marked for recovery; False then. `enqueued_at` is the outbox mark
    the caller's transaction wrote for this send, which names its message (`app.dispatch.message_id`);
    None for a send that wrote none."""
    if kind.send(ident, enqueued_at):
        return True
    leave_for_recovery(kind, ident)
    return False


def leave_for_recovery(kind: RunKind, ident: int) -> None:
    """The run is not sent now (the send failed, or Redis already failed to answer its request): the
    recovery sweep sends it as soon as Redis answers."""
    try:
        with transaction() as session:
            session.execute(update(kind.model).where(kind.key == ident).values(enqueued_at=None)
                            .execution_options(synchronize_session=False))
    except Exception:
        log.warning("could not clear the outbox mark of %s %s; the recovery sweep sends it when it finds no "
                    "receipt of its send, or by the stale-pending rule",
                    kind.label, ident, exc_info=True)
