"""Is this process able to serve: can it reach the database and Redis right now, and does the database
hold agentq's schema?"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.exc import DBAPIError

from app.db import database_location, get_engine
from app.errors import AgentqError, DatabaseAwaitsUpgrade, DatabaseNotCreated, InvalidConfiguration
from app.models import User
from app.outages import refused_by_configuration, schema_missing
from app.redis_client import get_redis
from app.schema import SchemaIncomplete, missing_columns

NO_SCHEMA = "error: the database has no agentq schema; run `agentq db init`"
AWAITS_UPGRADE = "error: the database predates this release; run `agentq db init`"
REFUSED = "error: the database refuses the database, role or password DATABASE_URL names"


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


class SchemaMissing(AgentqError):
    status = 503
    code = "service_unavailable"


def require_schema() -> None:
    """Refuse to start a worker against a database without agentq's tables (never initialised, or a
    relative SQLite path opened from another directory): it would take every turn off the queue only to
    dead-letter it, and leave its message pending. Nor against one a release's new columns were not added
    to (workers deployed before `agentq db init` ran): every claim would fail the same way. Nor against a
    server that refuses the database, role or password it is given, nor against a SQLite file whose amounts
    `db init` has not yet converted (`app.sqlite_upgrades`). A database out of reach is let through:
    the worker rides that out like any outage."""
    # A setting no wait mends (`InvalidConfiguration`), or a SQLite file `db init` has not made
    # (`DatabaseNotCreated`), stops the worker here, not as a state.
    engine = get_engine()
    try:
        state = _database()
        missing = missing_columns(engine) if state == "ok" else []
    finally:  # the worker group's parent serves nothing: no connection of its own to keep open
        engine.dispose()
    if state == REFUSED:
        raise InvalidConfiguration(f"The database at {database_location()} refuses the database, role or password "
                                   "DATABASE_URL names: mend it first (no wait will, and the worker would take "
                                   "turns off the queue it cannot run).")
    if state == NO_SCHEMA:
        raise SchemaMissing(f"The database {database_location()} has no agentq schema: run `agentq db init` "
                            "against it first (a SQLite path is relative to the directory a command runs in).")
    if state == AWAITS_UPGRADE:
        raise SchemaIncomplete(f"The database {database_location()} predates this release and awaits its one-time "
                               "upgrade: run `agentq db init` against it to upgrade it.")
    if missing:
        raise SchemaIncomplete(f"The database {database_location()} lacks the columns {', '.join(missing)} of this "
                               "release: run `agentq db init` against it to upgrade it.")


def _database() -> str:
    try:
        with get_engine().connect() as connection:  # one query proves the database is reached and set up
            connection.execute(select(User.id).limit(1))
    except DatabaseAwaitsUpgrade:
        return AWAITS_UPGRADE
    except (DatabaseNotCreated, DBAPIError) as exc:
        if schema_missing(exc):
            return NO_SCHEMA
        return REFUSED if refused_by_configuration(exc) else f"error: {type(exc).__name__}"
    except Exception as exc:
        return f"error: {type(exc).__name__}"
    return "ok"
