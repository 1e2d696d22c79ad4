"""Is this process able to serve: can it reach the database and Redis right now, and does the database
hold agentq's schema?"""

from __future__ import annotations

from dataclasses import dataclass

import psycopg.errors
from sqlalchemy import select, text
from sqlalchemy.exc import DBAPIError, OperationalError, ProgrammingError

from app.db import get_engine
from app.models import User
from app.redis_client import get_redis

NO_SCHEMA = "error: the database has no agentq schema; run `agentq db init`"


def schema_missing(error: BaseException) -> bool:
    """A query that failed because agentq's tables are not there: a database never initialised, or (on the
    SQLite default, a path relative to the working directory) a process started in another directory,
    which then opens an empty file. A setup error, to be said as such rather than as a brief outage."""
    if not isinstance(error, DBAPIError):
        return False
    if isinstance(error.orig, psycopg.errors.UndefinedTable):
        return True
    return isinstance(error, OperationalError) and "no such table" in str(error.orig)


@dataclass(frozen=True, slots=True)
class Readiness:
    checks: dict[str, str]

    @property
    def ready(self) -> bool:
        return all(v == "ok" for v in self.checks.values())

    @property
    def summary(self) -> str:
        failing = [f"{k} ({v.removeprefix('error: ')})" for k, v in self.checks.items() if v != "ok"]
        return f"Not ready: {', '.join(failing)}." if failing else "Ready."


def check() -> Readiness:
    checks = {"database": _database()}
    try:
        get_redis().ping()
        checks["redis"] = "ok"
    except Exception as exc:
        checks["redis"] = f"error: {type(exc).__name__}"
    return Readiness(checks)


def _database() -> str:
    try:
        with get_engine().connect() as connection:
            connection.execute(text("SELECT 1"))
            try:
                connection.execute(select(User.id).limit(1))
            except (OperationalError, ProgrammingError) as exc:
                if schema_missing(exc):
                    return NO_SCHEMA
                raise
    except Exception as exc:
        return f"error: {type(exc).__name__}"
    return "ok"
