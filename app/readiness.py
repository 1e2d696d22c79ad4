"""Is this process able to serve: can it reach the database and Redis right now, and does the database
hold agentq's schema?"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.exc import DBAPIError

from app.db import get_engine
from app.models import User
from app.outages import schema_missing
from app.redis_client import get_redis

NO_SCHEMA = "error: the database has no agentq schema; run `agentq db init`"


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
        with get_engine().connect() as connection:  # one query proves the database is reached and set up
            connection.execute(select(User.id).limit(1))
    except DBAPIError as exc:
        return NO_SCHEMA if schema_missing(exc) else f"error: {type(exc).__name__}"
    except Exception as exc:
        return f"error: {type(exc).__name__}"
    return "ok"
