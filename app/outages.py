"""Errors that mean a backing service is out of reach (down, restarting, its pool exhausted), not that the
work or the request is wrong: what waits an outage out instead of failing tells them apart with these."""

from __future__ import annotations

import psycopg
import redis
import sqlalchemy.exc

OUTAGES = (sqlalchemy.exc.OperationalError, sqlalchemy.exc.TimeoutError, psycopg.OperationalError,
           redis.ConnectionError, redis.TimeoutError)
"""The database's or Redis's: a run can be neither claimed nor settled, a stored answer not read, until
the service is back."""
