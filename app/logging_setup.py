"""Logging for `agentq web` and `agentq worker`: one format, and the id of the run a line is about.

With `AGENTQ_LOG_JSON=true` every record is one JSON object on one line (for a log shipper);
otherwise a plain line. `run_context` puts a run's id in a context variable for the duration of
the run, so every line logged while it runs, from any module, carries `turn_id` without passing it;
an admin test run's lines carry its `debug_log_id` the same way, and an API request's lines its
`request_id` (`web.request_ids`).
Dramatiq's CLI configures logging in each worker process itself, so the worker calls
`configure_logging` again once the process has booted.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime

from dramatiq.middleware import Retries

from app.config import get_settings
from app.failure_logs import OUTAGE_REPEAT_SECONDS, said_again
from app.outages import in_one_line, is_outage

_turn_id: ContextVar[int | None] = ContextVar("agentq_turn_id", default=None)
_debug_run_id: ContextVar[int | None] = ContextVar("agentq_debug_run_id", default=None)
_request_id: ContextVar[str | None] = ContextVar("agentq_request_id", default=None)

PLAIN_FORMAT = "[%(asctime)s] [PID %(process)d] [%(threadName)s] [%(name)s] [%(levelname)s] %(about)s%(message)s"


@contextmanager
def run_context(turn_id: int | None, debug_run_id: int | None) -> Iterator[None]:
    """A turn's or an admin test run's lines, for the duration of the block."""
    tokens = _turn_id.set(turn_id), _debug_run_id.set(debug_run_id)
    try:
        yield
    finally:
        _turn_id.reset(tokens[0])
        _debug_run_id.reset(tokens[1])


def log_as_run(turn_id: int | None, debug_run_id: int | None) -> None:
    """For what cannot wrap a run in `run_context`: the broker's hooks around a delivery, which start and end
    it in separate calls, so that Dramatiq's own lines about it (its failure, its retry) name the run."""
    _turn_id.set(turn_id)
    _debug_run_id.set(debug_run_id)


def log_as_request(request_id: str | None) -> None:
    """The API request this thread answers from now on (None once it is answered): set and cleared by the
    request's own hooks (`web.request_ids`), which Flask calls separately; and, in a worker, the request that
    sent the delivery this thread runs (`app.message_outcomes`)."""
    _request_id.set(request_id)


def logged_request_id() -> str | None:
    """The request this thread's lines name now, which a message it sends carries on to the worker's."""
    return _request_id.get()


class ContextIdsFilter(logging.Filter):
    """Stamps each record with the API request this thread answers and the turn, or the admin test run, it
    runs (each None when there is none), and, for the plain format, says them before the message."""

    def filter(self, record: logging.LogRecord) -> bool:
        turn_id, debug_run_id, request_id = _turn_id.get(), _debug_run_id.get(), _request_id.get()
        record.turn_id, record.debug_log_id, record.request_id = turn_id, debug_run_id, request_id
        record.about = ((f"[request {request_id}] " if request_id is not None else "")
                        + (f"[turn {turn_id}] " if turn_id is not None
                           else f"[test run {debug_run_id}] " if debug_run_id is not None else ""))
        return True


FAILED_DELIVERY = "Failed to process message"
"""How Dramatiq's worker threads start the line of a delivery that raised (whether it is retried is decided
after it, and said by the Retries middleware's own line)."""


MIDDLEWARE_FAILED = "Unexpected failure in "
"""How Dramatiq starts its CRITICAL line, with a traceback, for a middleware's hook that raised: the Retries
middleware's, when Redis did not take a retry's send for as long as the retry owns its run
(`app.deliveries.send_retry`)."""
ONE_LINE_IN_AN_OUTAGE = (FAILED_DELIVERY, MIDDLEWARE_FAILED)
"""The starts of Dramatiq's lines, with a traceback, that an outage makes one warning line."""
RETRY_NOT_SENT = ("; the retry was not sent: its message stays with this worker, and Redis gives it back to its queue "
                  "once the worker has stopped (if it lives on, the recovery sweep sends the run after "
                  "AGENTQ_STALE_PENDING_SECONDS)")
"""What an operator reads after the Retries middleware's failure (`workers.consumer.RefillingConsumer.ack` leaves
that message unacknowledged)."""


CONSUMER_LOST_REDIS = "Consumer encountered a connection error"
"""How Dramatiq's consumer threads start their line, at CRITICAL, for a Redis connection lost (a restart, an
outage): the consumer starts again by itself three seconds later."""
CONSUMER_RESTARTS = "Restarting consumer in"
"""How a Dramatiq consumer thread starts the INFO line it writes before each of those starts."""
ACK_NOT_WRITTEN = "Failed to post_process_message("
"""How Dramatiq's worker threads start the warning, three lines long, they write each time an ack or a nack
fails for a lost connection (Redis out of reach or refusing writes), every five seconds until it is written."""


def _starts_with(record: logging.LogRecord, start: str | tuple[str, ...]) -> bool:
    return isinstance(record.msg, str) and record.msg.startswith(start)


def _is_consumer_lost_redis(record: logging.LogRecord) -> bool:
    return _starts_with(record, CONSUMER_LOST_REDIS)


def _is_consumer_restart(record: logging.LogRecord) -> bool:
    return _starts_with(record, CONSUMER_RESTARTS)


def _is_ack_not_written(record: logging.LogRecord) -> bool:
    return _starts_with(record, ACK_NOT_WRITTEN) and isinstance(record.args, tuple) and len(record.args) == 3


def _is_outage_traceback(record: logging.LogRecord) -> bool:
    error = record.exc_info[1] if record.exc_info else None
    return error is not None and _starts_with(record, ONE_LINE_IN_AN_OUTAGE) and is_outage(error)


def _ack_not_written_in_one_line(record: logging.LogRecord) -> bool:
    """Dramatiq's three-line warning, as one line said sparingly."""
    if (since := said_again(ACK_NOT_WRITTEN, "a thread's ack", "tries")) is None:
        return False
    assert isinstance(record.args, tuple)
    message, error, every = record.args
    record.msg = ("the ack or nack of %s could not be written (%s); each is tried again every %s s until Redis "
                  "takes it, said at most every %g s%s")
    record.args = (message, in_one_line(error) if isinstance(error, BaseException) else error, every,
                   OUTAGE_REPEAT_SECONDS, since)
    return True


def _outage_traceback_as_warning(record: logging.LogRecord) -> bool:
    """The line without its traceback, naming the outage, and saying where a retry that was not sent goes."""
    assert record.exc_info is not None and record.exc_info[1] is not None
    error = record.exc_info[1]
    said = record.getMessage().rstrip(".")
    unsent = isinstance(record.args, tuple) and any(isinstance(arg, Retries) for arg in record.args)
    record.levelno, record.levelname = logging.WARNING, "WARNING"
    record.msg, record.args = "%s: %s (a backing service is out of reach)%s", (
        said, in_one_line(error), RETRY_NOT_SENT if unsent else "")
    record.exc_info, record.exc_text = None, None
    return True


LogRule = tuple[Callable[[logging.LogRecord], bool], Callable[[logging.LogRecord], bool]]
"""Which records a rule is for, and how it rewrites one: False drops the record."""


class OutageFailureFilter(logging.Filter):
    """Dramatiq says an outage the deployment rides out as a failure, at every try, often with a traceback;
    an operator read hundreds of lines, and was paged on CRITICAL, for nothing lost. Here each is one line:

    - a delivery an outage failed is retried for minutes (`app.deliveries.retry_failed`): a warning without its
      traceback (a database restart with a hundred runs queued wrote a hundred tracebacks at every retry);
    - a middleware's hook an outage failed (the Retries middleware's send of a retry), said at CRITICAL with a
      traceback: the same warning, saying where the unsent retry's run goes;
    - a consumer's lost Redis connection, said at CRITICAL by every consumer every 3 s though each starts again
      by itself (four queues wrote 88 lines in 30 s): a warning, once a process and again at most every
      `OUTAGE_REPEAT_SECONDS` with the count of tries not said;
    - the line about a consumer's next try after a lost connection: not written;
    - an ack or a nack Redis did not take, a three-line warning every 5 s until it is written: one line, said
      at most every `OUTAGE_REPEAT_SECONDS`.
    """

    def __init__(self) -> None:
        super().__init__()
        self._reconnecting: set[int | None] = set()
        """The consumer threads whose last line was a lost connection, whose next-try line is not written."""
        self._rules: tuple[LogRule, ...] = (
            (_is_consumer_lost_redis, self._consumer_lost_redis_as_warning),
            (_is_consumer_restart, self._restart_after_lost_redis_dropped),
            (_is_ack_not_written, _ack_not_written_in_one_line),
            (_is_outage_traceback, _outage_traceback_as_warning),
        )

    def filter(self, record: logging.LogRecord) -> bool:
        for matches, rewrite in self._rules:
            if matches(record):
                return rewrite(record)
        return True

    def _consumer_lost_redis_as_warning(self, record: logging.LogRecord) -> bool:
        """Said once for all this process's consumers, and again sparingly."""
        self._reconnecting.add(record.thread)
        if (since := said_again(CONSUMER_LOST_REDIS, "the consumers' connection to Redis", "tries")) is None:
            return False
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        record.msg += (f" (Redis is out of reach; each of this process's consumers tries again every 3 s, said "
                       f"at most every {OUTAGE_REPEAT_SECONDS:g} s{since})")
        return True

    def _restart_after_lost_redis_dropped(self, record: logging.LogRecord) -> bool:
        """A restart after another failure (a bug's) is still written."""
        if record.thread not in self._reconnecting:
            return True
        self._reconnecting.discard(record.thread)
        return False


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat().replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "process": record.process,
            "thread": record.threadName,
        }
        for field in ("request_id", "turn_id", "debug_log_id"):
            if (ident := getattr(record, field, None)) is not None:
                payload[field] = ident
        if record.exc_info:
            payload["exception"] = self.formatException(record.exc_info)
        return json.dumps(payload, ensure_ascii=False, default=str)


def configure_logging() -> None:
    """Replace the root logger's handlers with one on stderr (as it is now) in agentq's format."""
    settings = get_settings()
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(ContextIdsFilter())
    handler.addFilter(OutageFailureFilter())
    handler.setFormatter(JsonFormatter() if settings.log_json else logging.Formatter(PLAIN_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(settings.log_level.upper())
    # A library's warning (SQLAlchemy's, say) was a bare line on stderr, which broke a JSON log's one object
    # a line; it is a WARNING record of the `py.warnings` logger instead.
    logging.captureWarnings(True)
    quiet_chatty_libraries()


def write_to_inherited_stderr() -> None:
    """Send this process's lines to the stderr it inherited, not to the pipe through which Dramatiq's parent
    writes its children's lines: a worker process whose group's parent died outright (SIGKILL, the OOM
    killer) goes on to finish or hand back its runs, and every line about them went into a pipe no one read,
    so an operator saw turns claimed that never ended. Lines of several processes may interleave there."""
    if sys.__stderr__ is None:
        return
    sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__
    for handler in logging.getLogger().handlers:
        if type(handler) is logging.StreamHandler:
            handler.setStream(sys.__stderr__)


CHATTY = ("httpx", "httpx2", "httpcore", "httpcore2", "openai")


def quiet_chatty_libraries() -> None:
    """The HTTP clients log a line per upstream request at INFO: a cost on every turn, and noise.

    Attempts are recorded in `model_attempts` and the metrics; their warnings still show.
    """
    for name in CHATTY:
        logging.getLogger(name).setLevel(logging.WARNING)


def gunicorn_logconfig() -> dict[str, object]:
    """The same handler for gunicorn's own loggers, as the `logconfig_dict` it applies in every process."""
    settings = get_settings()
    formatter: dict[str, object] = {"()": JsonFormatter} if settings.log_json else {"format": PLAIN_FORMAT}
    handler = {"class": "logging.StreamHandler", "formatter": "agentq", "filters": ["run_ids"],
               "stream": "ext://sys.stderr"}
    gunicorn_logger = {"level": settings.log_level.upper(), "handlers": ["agentq"], "propagate": False}
    access_logger = {**gunicorn_logger, "level": "INFO" if settings.access_log else "WARNING"}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"run_ids": {"()": ContextIdsFilter}},
        "formatters": {"agentq": formatter},
        "handlers": {"agentq": handler},
        "root": {"level": settings.log_level.upper(), "handlers": ["agentq"]},
        "loggers": {"gunicorn.error": gunicorn_logger, "gunicorn.access": access_logger,
                    **{name: {"level": "WARNING"} for name in CHATTY}},
    }


__all__ = ["JsonFormatter", "configure_logging", "gunicorn_logconfig", "log_as_request", "log_as_run",
           "logged_request_id", "run_context"]
