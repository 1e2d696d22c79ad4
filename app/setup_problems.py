"""Failures that no wait mends but a setup step does: a database with no agentq schema or one that predates
this release (`agentq db init`), a login the server refuses (DATABASE_URL), a password or a database number Redis
refuses (REDIS_URL).
Told apart here once, for the API's answers, `/readyz`, a worker's start, the commands and the background loops
alike; everything else a failure can be is an outage (`app.outages`) or a bug.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass

import psycopg
import psycopg.errors
import redis
import sqlalchemy.exc

from app.errors import DatabaseAwaitsUpgrade, DatabaseNotCreated
from app.outages import driver_error, under_the_broker

_REFUSED_SETTINGS = ("database \"", "role \"", "password authentication failed", "no pg_hba.conf entry")
"""The start of what PostgreSQL says, at connection, of a database or a role that does not exist or a login it
does not accept: its reply carries no SQLSTATE to libpq's caller, so its text is what tells them apart."""


def refused_by_configuration(error: BaseException) -> bool:
    """The server answered, and refused what DATABASE_URL asks of it: no wait mends that, the operator must. A
    worker started so would wait it out at every sweep as an outage, and a command call it one."""
    cause = driver_error(error)
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


_REFUSED_DATABASE_NUMBER = "DB index is out of range"
"""What Redis answers a connection's SELECT of a database number past its `databases` setting: an error with no
class of its own in the Redis client, told by its text."""


def redis_refuses_url(error: BaseException) -> bool:
    """Redis answered and refused what REDIS_URL gives: its password, or a password it does not ask for, or a
    database number it does not have. Each comes at the connection's start, before any command (a send's error is
    the Redis client's under Dramatiq's: `under_the_broker`)."""
    error = under_the_broker(error)
    if isinstance(error, redis.AuthenticationError):
        return True
    return isinstance(error, redis.ResponseError) and str(error).startswith(_REFUSED_DATABASE_NUMBER)


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
    of_redis: bool = False
    """A setting of Redis's (REDIS_URL) to mend, not the database's."""


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
    if redis_refuses_url(error):
        return SetupProblem("invalid_configuration", "Redis refuses the password or the database number REDIS_URL "
                                                     "gives, or asks for a password it does not give: mend REDIS_URL",
                            "Redis refuses what REDIS_URL gives", of_redis=True)
    return None
