"""Is this process able to serve: can it reach the database and Redis right now, does the database hold
agentq's schema, and does Redis take writes?"""

from __future__ import annotations

from dataclasses import dataclass

import redis
from sqlalchemy import select

from app.config import get_settings
from app.connection_bounds import answers_within
from app.db import database_location, get_engine
from app.errors import AgentqError
from app.models import User
from app.redis_client import get_redis, key, redis_location
from app.schema import SchemaIncomplete, missing_columns
from app.setup_problems import SetupProblem, setup_problem
from app.sqlite_engine import lock_waits_within


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


READINESS_PROBE_TTL_MS = 60_000
"""How long the key `/readyz` writes lives: one small key, rewritten at each probe, gone once probes stop."""


def check() -> Readiness:
    return Readiness({"database": _database()[0], "redis": _redis()})


def require_setup() -> None:
    """Refuse to start a worker against a database without agentq's tables (never initialised, or a
    relative SQLite path opened from another directory): it would take every turn off the queue only to
    dead-letter it, and leave its message pending. Nor against one a release's new columns were not added
    to (workers deployed before `agentq db init` ran): every claim would fail the same way. Nor against a
    server that refuses the database, role or password it is given, nor against a SQLite file whose amounts
    `db init` has not yet converted (`app.sqlite_upgrades`), nor against a Redis that refuses what REDIS_URL
    gives (a worker so started fetched nothing, and said so once a minute). A database or a Redis out of reach
    is let through: the worker rides that out like any outage."""
    engine = get_engine()
    try:
        state, problem = _database()
        missing = missing_columns(engine) if state == "ok" else []
    finally:  # the worker group's parent serves nothing: no connection of its own to keep open
        engine.dispose()
    if problem is not None:
        raise AgentqError(f"No worker starts on the database {database_location()}, whose turns it could not run: "
                          f"{problem.step}.", code=problem.code)
    if missing:
        raise SchemaIncomplete(f"The database {database_location()} lacks the columns {', '.join(missing)} of this "
                               "release: run `agentq db init` against it to upgrade it.")
    if (problem := _redis_setup_problem()) is not None:
        raise AgentqError(f"No worker starts on Redis at {redis_location()}, from which it takes its turns: "
                          f"{problem.step}.", code=problem.code)


def _redis_setup_problem() -> SetupProblem | None:
    """The setup step Redis's answer to a PING calls for, if any (an outage calls for none). The connection is
    closed after it: the worker group's parent serves nothing (its children forget the pool as they fork)."""
    client = get_redis()
    try:
        client.ping()
    except redis.RedisError as exc:
        return setup_problem(exc)
    finally:
        client.connection_pool.disconnect()
    return None


def _redis() -> str:
    """A write, not a ping: a Redis at its `maxmemory` under `noeviction`, or a replica after a failover, answers
    PING and refuses every write, and an API behind it sends no turn (each POST's turn waits for the recovery
    sweep) and takes no conversation's lock; a load balancer should send its requests to another."""
    try:
        get_redis().set(key("readiness"), "1", px=READINESS_PROBE_TTL_MS)
    except Exception as exc:
        return f"error: {type(exc).__name__}"
    return "ok"


def _database() -> tuple[str, SetupProblem | None]:
    """The database check as `/readyz` shows it, and the setup step its failure calls for, if any. A probe
    answers within moments or not at all: a server that does not answer its query within the connect timeout
    fails it, as one that does not accept the connection does."""
    bound = get_settings().db_connect_timeout_seconds
    try:
        with (answers_within(bound), get_engine().connect() as connection,
              lock_waits_within(connection, bound)):  # one query proves the database is reached and set up
            connection.execute(select(User.id).limit(1))
    except Exception as exc:
        problem = setup_problem(exc)
        return f"error: {problem.check if problem else type(exc).__name__}", problem
    return "ok", None
