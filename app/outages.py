"""Whether an error means a backing service is out of reach (down, restarting, failing over, its pool
exhausted) rather than that the work or the statement is wrong: what waits an outage out (a delivery's
retries, a stream reader, a finished run's settlement: `waiting_out_outages`) must not also wait out a
real bug.

`OperationalError` alone is too wide for that: it also covers a statement timeout, a deadlock, a lock
not available, and on SQLite a missing table. Only a connection that failed or was lost counts, and on
SQLite a database file whose write lock another process held past the busy timeout (the embedded
database's one writer at a time: an operator's `sqlite3` shell in a transaction, a long outside write),
which is out of reach for as long as that lasts. A missing table is told apart too (`schema_missing`):
a setup error, for readiness and the API to name.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import dramatiq.errors
import psycopg
import psycopg.errors
import redis
import sqlalchemy.exc

from app.db import database_location
from app.errors import DatabaseAwaitsUpgrade, DatabaseNotCreated

log = logging.getLogger(__name__)
T = TypeVar("T")

_SERVER_GOING_AWAY = frozenset({"57P01", "57P02", "57P03", "53300"})
"""PostgreSQL's admin shutdown, crash shutdown, cannot connect now (starting up), too many connections."""


def _under_the_broker(error: BaseException) -> BaseException:
    """The Redis client's error under Dramatiq's `BrokerConnectionError` (its broker raises `ConnectionClosed` from
    it): a send during a Redis restart is an outage as any other Redis call in it is, said in one line."""
    if isinstance(error, dramatiq.errors.BrokerConnectionError) and error.__cause__ is not None:
        return error.__cause__
    return error


def is_outage(error: BaseException) -> bool:
    error = _under_the_broker(error)
    if isinstance(error, redis.AuthenticationError):
        return False
    if isinstance(error, (redis.ConnectionError, redis.TimeoutError, sqlalchemy.exc.TimeoutError,
                          dramatiq.errors.BrokerConnectionError)):
        return True
    if isinstance(error, sqlalchemy.exc.DBAPIError):
        if error.connection_invalidated:
            return True
        if error.orig is not None:
            error = error.orig
    if isinstance(error, psycopg.OperationalError):
        state = error.sqlstate
        return state is None or state.startswith("08") or state in _SERVER_GOING_AWAY
    if isinstance(error, sqlite3.OperationalError):
        return getattr(error, "sqlite_errorcode", 0) & 0xFF == sqlite3.SQLITE_BUSY
    return False


def is_database_outage(error: BaseException) -> bool:
    """An outage of the database, what a worker process stops fetching for (`app.database_reach`): not one of
    Redis, since a process that cannot reach Redis fetches nothing anyway, nor a wait for a connection of a
    full pool (`sqlalchemy.exc.TimeoutError`), since the database answers that busy process's other
    connections, and its probe would wait in the same queue."""
    error = _under_the_broker(error)
    return is_outage(error) and not isinstance(error, (redis.RedisError, sqlalchemy.exc.TimeoutError,
                                                       dramatiq.errors.BrokerConnectionError))


_REFUSED_SETTINGS = ("database \"", "role \"", "password authentication failed", "no pg_hba.conf entry")
"""The start of what PostgreSQL says, at connection, of a database or a role that does not exist or a login it
does not accept: its reply carries no SQLSTATE to libpq's caller, so its text is what tells them apart."""


def refused_by_configuration(error: BaseException) -> bool:
    """The server answered, and refused what DATABASE_URL asks of it: no wait mends that, the operator must. A
    worker started so would wait it out at every sweep as an outage, and a command call it one."""
    cause = _driver_error(error)
    if not isinstance(cause, psycopg.OperationalError) or cause.sqlstate is not None:
        return False
    said = str(cause).partition("FATAL:")[2].strip()
    return said.startswith(_REFUSED_SETTINGS)


def schema_missing(error: BaseException) -> bool:
    """A query that failed because agentq's tables are not there: a database never initialised, or (on the
    SQLite default, a path relative to the working directory) a process started in another directory,
    which then opens an empty file, or a SQLite file `db init` has not made (`DatabaseNotCreated`). A setup
    error, to be said as such rather than as a brief outage."""
    if isinstance(error, DatabaseNotCreated):
        return True
    if not isinstance(error, sqlalchemy.exc.DBAPIError):
        return False
    if isinstance(error.orig, psycopg.errors.UndefinedTable):
        return True
    return isinstance(error, sqlalchemy.exc.OperationalError) and "no such table" in str(error.orig)


def lacks_a_column(error: BaseException) -> bool:
    """A statement of this release named a column the database lacks: one `agentq db init` did not upgrade."""
    if not isinstance(error, sqlalchemy.exc.DBAPIError):
        return False
    if isinstance(error.orig, psycopg.errors.UndefinedColumn):
        return True
    return isinstance(error.orig, sqlite3.OperationalError) and ("no such column" in str(error.orig)
                                                                 or "has no column named" in str(error.orig))


def _driver_error(error: BaseException) -> BaseException:
    """The driver's own error under SQLAlchemy's wrapper (`orig`), which carries what the server said."""
    return getattr(error, "orig", None) or error


def in_one_line(error: BaseException) -> str:
    """What an operator needs of a driver's error (the server refused, the database does not exist): its
    first line, not SQLAlchemy's statement and parameters and background link, which split one log record
    over several lines of a plain log."""
    cause = _driver_error(_under_the_broker(error))
    text = str(cause).strip()
    return f"{type(cause).__name__}: {text.splitlines()[0]}" if text else type(cause).__name__


def warn_of(logger: logging.Logger, error: BaseException, message: str, *args: object) -> None:
    """A warning about a step that failed and that something else makes good (the recovery sweep, a lease
    running out): a backing service out of reach said in one line, which an outage repeats for every run;
    anything else with its traceback, which a bug needs."""
    if is_outage(error):
        logger.warning(message + " (%s)", *args, in_one_line(error))
    else:
        logger.warning(message, *args, exc_info=error)


@dataclass(frozen=True, slots=True)
class SetupProblem:
    """A failure that no wait mends but a setup step does."""

    code: str
    """The error code a command fails with: `invalid_configuration` for a setting to mend, `schema_incomplete`
    for columns to add, `service_unavailable` for a schema not made yet (a deployment's `db init` may be
    running)."""
    step: str
    """What the operator must do, as a clause: "the database has no agentq schema: run `agentq db init`"."""
    check: str
    """The same in a few words, as `/readyz` names a failing check."""


NO_SCHEMA = "the database has no agentq schema; run `agentq db init`"
PREDATES_RELEASE = "the database predates this release; run `agentq db init`"


def setup_problem(error: BaseException) -> SetupProblem | None:
    """The setup step `error` calls for, if any: the one place that tells a setup step from an outage or a bug,
    for the API's answers, `/readyz`, a worker's start, the commands and the background loops alike."""
    if isinstance(error, DatabaseNotCreated):
        return SetupProblem("service_unavailable", "the SQLite file does not exist: run `agentq db init` to create it",
                            NO_SCHEMA)
    if schema_missing(error):
        return SetupProblem("service_unavailable", "the database has no agentq schema: run `agentq db init` against "
                                                   "it (a SQLite path is relative to the directory a command runs in)",
                            NO_SCHEMA)
    if isinstance(error, DatabaseAwaitsUpgrade):
        return SetupProblem("schema_incomplete", "the SQLite file was written by an earlier release and awaits its "
                                                 "upgrade: run `agentq db init` against it", PREDATES_RELEASE)
    if lacks_a_column(error):
        return SetupProblem("schema_incomplete", "the database predates this release: run `agentq db init` against "
                                                 "it to upgrade it", PREDATES_RELEASE)
    if refused_by_configuration(error):
        return SetupProblem("invalid_configuration", "the database refuses the database, role or password "
                                                     "DATABASE_URL names: mend DATABASE_URL",
                            "the database refuses the database, role or password DATABASE_URL names")
    return None


SETUP_PROBLEM_REPEAT_SECONDS = 60.0
"""How often a background loop says again the same setup problem, which fails each of its rounds alike."""

_setup_problem_said: dict[tuple[str, str], float] = {}

OUTAGE_REPEAT_SECONDS = 30.0
"""How often a background loop says again that a backing service is still out of reach: the lease keeper's
loops try twice a second, and said at each try a 40 s outage was 80 lines a process."""

_outage_said: dict[tuple[str, str], tuple[float, int]] = {}
"""For each logger and loop, when it last said an outage and how many failed rounds it has not said since."""


def said_again(source: str, doing: str, counted: str = "rounds") -> str | None:
    """None while `doing`'s failure was said by `source` (a logger's name) within `OUTAGE_REPEAT_SECONDS` (this
    one counted, unsaid); else the clause that counts the `counted` not said since it was (empty for none), and
    it is said now."""
    key, now = (source, doing), time.monotonic()
    said_at, unsaid = _outage_said.get(key, (float("-inf"), 0))
    if now - said_at < OUTAGE_REPEAT_SECONDS:
        _outage_said[key] = (said_at, unsaid + 1)
        return None
    _outage_said[key] = (now, 0)
    return f"; {unsaid} more {counted} failed alike since this was last said" if unsaid else ""


def warn_of_repeated(logger: logging.Logger, error: BaseException, doing: str, meanwhile: str) -> None:
    """A failure a busy loop meets at each round alike while it lasts (a Redis outage or failover, a full Redis),
    with what is made of it `meanwhile`: one warning line, said again at most every `OUTAGE_REPEAT_SECONDS` with
    the count of rounds not said. A process's stream publisher said every failed batch: 800 lines in 12 s of
    a Redis restart."""
    if (since := said_again(logger.name, doing)) is not None:
        logger.warning("%s failed (%s); %s, said at most every %g s%s", doing, in_one_line(error), meanwhile,
                       OUTAGE_REPEAT_SECONDS, since)


def warn_of_sparingly(logger: logging.Logger, error: BaseException, message: str, *args: object) -> None:
    """`warn_of` for a step that every run meets alike while a backing service is out of reach (a send while
    Redis is away: each request's, and each pending run's at every recovery sweep, a line each): the outage
    said in one line, naming the run that met it first, and again at most every `OUTAGE_REPEAT_SECONDS` with
    the count of runs not said (`message`, the template, tells one step from another); anything else said as
    `warn_of` says it, with its traceback."""
    if not is_outage(error):
        warn_of(logger, error, message, *args)
    elif (since := said_again(logger.name, message, "runs")) is not None:
        logger.warning(message + " (%s); every run that meets this is said at most every %g s%s", *args,
                       in_one_line(error), OUTAGE_REPEAT_SECONDS, since)


def log_failure(logger: logging.Logger, error: BaseException, doing: str) -> None:
    """A background loop's failed round (a sweep, a lease renewal), logged by what it means: a setup step not
    taken (no schema, a refused login) as one error line saying the step, at most once a minute for each
    logger, since every round until the step is taken fails alike and a traceback a second would bury it; a
    backing service out of reach as a warning, which the next round waits out, said again at most every
    `OUTAGE_REPEAT_SECONDS` with the count of rounds it did not say; anything else, which would
    repeat at every round (a bug), as an error with its traceback. The setup step is looked for first: a
    login the server refuses carries no SQLSTATE, which `is_outage` takes for a connection that failed."""
    if (problem := setup_problem(error)) is not None:
        key, now = (logger.name, problem.step), time.monotonic()
        if now - _setup_problem_said.get(key, float("-inf")) >= SETUP_PROBLEM_REPEAT_SECONDS:
            _setup_problem_said[key] = now
            logger.error("%s failed: %s. %s (the database at %s); every round fails alike until then, said again "
                         "at most once a minute", doing, problem.step, in_one_line(error), database_location())
    elif is_outage(error):
        if (since := said_again(logger.name, doing)) is None:
            return
        logger.warning("%s failed, a backing service is out of reach (%s); trying again, said at most every %g s%s",
                       doing, in_one_line(error), OUTAGE_REPEAT_SECONDS, since)
    else:
        logger.error("%s failed, and not for an outage: it will fail again until this is fixed", doing,
                     exc_info=error)


def waiting_out_outages(write: Callable[[], T], *, for_seconds: float, what: str) -> T:
    """`write()`, tried again while it fails because a backing service is out of reach, for up to
    `for_seconds`; any other error, or the outage outlasting that, is raised.

    For a write whose only alternative is to throw work away: a worker that finished an answer while the
    database was down would otherwise raise, and the delivery that retries its turn would call the model
    again (paid twice). The pauses stay short (a second at most) so that the write lands as soon as the
    database is back, ahead of a recovery sweep that would take the run over (`app.recovery` gives live
    holders that moment)."""
    give_up_at = time.monotonic() + for_seconds
    pause, tries = 0.1, 0
    while True:
        try:
            written = write()
        except Exception as error:
            if not is_outage(error) or time.monotonic() + pause > give_up_at:
                raise
            if tries == 0:
                log.warning("%s: a backing service is out of reach (%s); waiting it out", what, type(error).__name__)
            tries += 1
            time.sleep(pause)
            pause = min(pause * 2, 1.0)
            continue
        if tries:
            log.info("%s: done after %d tries", what, tries + 1)
        return written
