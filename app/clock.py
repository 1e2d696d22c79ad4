"""The clock that leases are written and judged by: the database server's.

A lease is written by the worker that holds it and judged by others: the claim of a redelivered
message, the recovery sweep of any worker process, the handler of a dead message, often on other
machines. Judged by each machine's own clock, a worker whose clock runs a lease ahead of the
others' would take over every live turn and call its model a second time; judged by the database's,
the machines' clocks do not matter to who runs a turn. On PostgreSQL that is `clock_timestamp()`,
the time the statement reads the row (a claim that waited for a row lock reads it again when the
lock holder changed the row; when it did not, the time is from before the wait, which only makes a
lease look alive longer). SQLite is embedded, so every process using it runs on one machine, with
one clock: there the time is this process's.

Leases and deadlines are written with it. A message's timestamps are the writer's clock, as is the
outbox mark (`enqueued_at`) that tells the sweep when a turn was last sent; the sweep measures every
mark against the database's time too (one reference for all its cutoffs, whichever machine sweeps),
so a writer's skewed clock only makes a re-send come early (a duplicate message, which the claim
makes harmless) or late by the skew.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import DateTime, select
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.functions import FunctionElement

from app.models.base import optional_utc, utc_now
from app.prepared import Unit


class DatabaseNow(FunctionElement[datetime]):
    """The database server's time, as a column of a query; NULL where the server has no clock of its own."""

    type = DateTime(timezone=True)
    inherit_cache = True


@compiles(DatabaseNow)
def _no_server_clock(element: DatabaseNow, compiler: Any, **kw: Any) -> str:
    return "NULL"


@compiles(DatabaseNow, "postgresql")
def _server_clock(element: DatabaseNow, compiler: Any, **kw: Any) -> str:
    return "clock_timestamp()"


def lease_time(read: datetime | None) -> datetime:
    """The time a `DatabaseNow` column read, or this process's where the database has none."""
    return optional_utc(read) or utc_now()


def lease_now(unit: Unit) -> datetime:
    """The time to judge and write leases by, read in a statement of its own."""
    return lease_time(unit.execute(select(DatabaseNow())).scalar())


def lease_expiry(judged_at: datetime, lease_seconds: float) -> datetime:
    """When a lease taken or renewed at `judged_at` (the time it was read by) runs out."""
    return judged_at + timedelta(seconds=lease_seconds)
