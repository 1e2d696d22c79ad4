"""The two kinds of run the workers execute, a user's turn and an admin test run, described as data.

Much of what surrounds a run does not care which kind it is: sending it and leaving it to recovery
when the send fails (`app.outbox`), the recovery sweep, lease renewal (`app.leases`), a stuck or
failed delivery giving up its lease, dead letters and a stopping worker's hand-back. Those places
look the kind up here, by its actor's name when all they have is a Dramatiq message, instead of
branching on it. What does differ (a turn's conversation lock, user slot, reservation and charge)
stays with each kind's state machine, `app.turn_state` and `app.debug_run_state`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from sqlalchemy import update
from sqlalchemy.orm import InstrumentedAttribute, Session

from app import dispatch
from app.db import transaction
from app.models import ConversationMessage, DebugRun, Turn

log = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class RunKind:
    label: str
    """What logs and operators call a run of this kind."""
    actor: str
    queue: str
    model: type[Turn] | type[DebugRun]
    key: InstrumentedAttribute[int]
    """The column that names a run of this kind in `model` (a turn is named by its answer's message id)."""
    status_key: InstrumentedAttribute[int]
    status: InstrumentedAttribute[str]
    """Where a run's status is kept: a turn's on its answer message, which the API reads."""

    def send(self, ident: int) -> bool:
        """Enqueue a run's message; False when the broker could not take it (see `app.outbox`)."""
        return dispatch.enqueue(self.queue, self.actor, ident)

    def revoke_lease(self, session: Session, ident: int, token: str) -> bool:
        """Take a run from the delivery holding lease `token`: its lease keeper finds the lease gone and stops
        it, and the write that would end the run is refused (the lease guards it). False when `token` no
        longer holds it."""
        return session.execute(
            update(self.model).where(self.key == ident, self.model.lease_token == token)
            .values(lease_token=None, lease_expires_at=None)
            .execution_options(synchronize_session=False)
        ).rowcount == 1

    def give_up_lease(self, ident: int, token: str) -> None:
        """A delivery that failed lets Dramatiq's retry take the run over at once instead of waiting for the
        lease to run out; if even that fails, the lease runs out by itself."""
        try:
            with transaction() as session:
                self.revoke_lease(session, ident, token)
        except Exception:
            log.warning("could not give up the lease of %s %s; it runs out by itself", self.label, ident)


TURN = RunKind("turn", dispatch.RUN_TURN, dispatch.TURNS_QUEUE, Turn, Turn.assistant_message_id,
               ConversationMessage.id, ConversationMessage.status)
TEST_RUN = RunKind("test run", dispatch.RUN_DEBUG, dispatch.DEBUG_QUEUE, DebugRun, DebugRun.id,
                   DebugRun.id, DebugRun.status)
KINDS = (TURN, TEST_RUN)


def kind_of(actor: str) -> RunKind | None:
    """The kind of run a message of `actor` carries; None for a message that is not a run."""
    return next((kind for kind in KINDS if kind.actor == actor), None)
