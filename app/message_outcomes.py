"""What happens around each delivery of a worker and when a message dies: the run's id on every log line of the
delivery, a failure's mark on the process's reach of its database, a given-up run's reason in its dead letter, and
a dead message's record and its run's end. The broker's middleware calls these (`workers.middleware`).
"""

from __future__ import annotations

import logging
import textwrap
import traceback

from sqlalchemy.orm import Session

from app import dead_letter_requeue, dead_letters
from app.database_reach import reach
from app.deliveries import RunGivenUp
from app.dispatch import REQUEST_ID_OPTION, Delivered
from app.logging_setup import log_as_request, log_as_run, run_context
from app.run_kinds import RunKind, run_of
from app.unheld_ends import abandon

log = logging.getLogger(__name__)


def delivery_started(message: Delivered) -> None:
    """Until the delivery ends, this thread's log lines, Dramatiq's own about it included (its failure, its
    retry), carry its run's id, and the id of the API request that sent it, when one did: an operator following
    a request finds the worker's lines of its turn by the same id."""
    log_as_run(*_logged_ids(run_of(message.actor_name, message.args)))
    request_id = message.options.get(REQUEST_ID_OPTION)
    log_as_request(request_id if isinstance(request_id, str) else None)


def _logged_ids(run: tuple[RunKind, int] | None) -> tuple[int | None, int | None]:
    """A message's run's ids as log lines carry them; none for a message that carries no run."""
    return (None, None) if run is None else run[0].log_ids(run[1])


def delivery_ended() -> None:
    log_as_run(None, None)
    log_as_request(None)


def delivery_failed(message: Delivered, exception: BaseException) -> None:
    """A run given up (`RunGivenUp`) is dead-lettered with no retry, and Dramatiq writes what a dead letter
    names (the options' `traceback`, and `retries` counting the failure that ends them) only for a failure its
    retry policy judges: the reason and the count are written as it writes them, for
    `dead_letters.record_death` to keep. The traceback of the last failure Dramatiq retried, if any, is
    kept after the reason, indented: a run that failed the same way at every delivery until it was given up
    showed only "gave up after 5 deliveries", and not what had failed. A failure that says the database is
    out of reach stops this process fetching until it answers (`app.database_reach`)."""
    reach.failed(exception)
    if isinstance(exception, RunGivenUp):
        earlier = message.options.get("traceback")
        reason = "".join(traceback.format_exception_only(exception))
        if isinstance(earlier, str) and earlier.strip():
            reason += "The last failure retried before it:\n" + textwrap.indent(earlier, "    ")
        message.options["retries"] = int(message.options.get("retries", 0)) + 1
        message.options["traceback"] = reason


def message_died(message: Delivered) -> None:
    """The broker dead-lettered `message` (its retries ran out): keep the record operators list and
    requeue from, and end its run at once rather than at the recovery sweep, as `error` (`cancelled` for a
    turn whose stop was accepted). Neither step may fail the broker's nack: a record that could not be
    written is adopted from the broker when the dead letters are listed, and a run left in flight is sent
    again by the recovery sweep (after `app.deliveries.retry_hand_over`), whose delivery ends it as
    `error` if its deadline has passed, and runs it otherwise."""
    run = run_of(message.actor_name, message.args)
    with run_context(*_logged_ids(run)):
        _message_died(message, run)


def _message_died(message: Delivered, run: tuple[RunKind, int] | None) -> None:
    try:
        dead_letters.record_death(message)
    except Exception:
        log.exception("could not record dead letter %s; listing adopts it from the broker", message.message_id)
    if run is None:
        return
    kind, ident = run
    last_error = dead_letters.death_cause(message.options.get("traceback"))
    reason = f"retries exhausted after {message.options.get('retries', 0)} attempts"

    def requeued(session: Session) -> bool:
        return dead_letter_requeue.requeued(session, message.options["redis_message_id"])

    said = last_error if kind.error_shown_whole else last_error.split(": ", 1)[0]
    try:
        abandon(kind, ident, f"{reason}: {said}", unless=requeued)
    except Exception:
        log.exception("could not end run %s after its message died; the recovery sweep sends it again later", ident)
