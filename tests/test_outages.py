"""Which errors count as a backing service out of reach: those are waited out (a delivery's retries, a
stream reader), so a real bug must not be among them."""

from __future__ import annotations

import sqlite3

import psycopg
import pytest
import redis
import sqlalchemy.exc

from app.config import get_settings
from app.deliveries import retry_failed
from app.outages import is_outage
from tests.support import free_port


def _wrapped(error: Exception) -> sqlalchemy.exc.OperationalError:
    return sqlalchemy.exc.OperationalError("SELECT 1", {}, error)


def test_a_refused_connection_is_an_outage_and_is_retried_longer() -> None:
    with pytest.raises(psycopg.OperationalError) as refused:
        psycopg.connect(f"host=127.0.0.1 port={free_port()} user=postgres connect_timeout=2")
    assert is_outage(refused.value) and is_outage(_wrapped(refused.value))
    assert is_outage(_wrapped(psycopg.errors.AdminShutdown())) and is_outage(redis.ConnectionError())
    settings = get_settings()
    assert settings.outage_retries > settings.max_retries
    assert [retry_failed(n, _wrapped(refused.value)) for n in (settings.max_retries, settings.outage_retries - 1,
                                                                 settings.outage_retries)] == [True, True, False]


@pytest.mark.parametrize("error", [
    _wrapped(psycopg.errors.DeadlockDetected()), _wrapped(psycopg.errors.QueryCanceled()),
    _wrapped(psycopg.errors.LockNotAvailable()), _wrapped(sqlite3.OperationalError("no such table: turns")),
    redis.AuthenticationError(), ValueError("a bug"),
], ids=["deadlock", "statement timeout", "lock not available", "sqlite missing table", "redis auth", "bug"])
def test_a_statement_or_a_bug_that_fails_is_not_an_outage(error: Exception) -> None:
    assert not is_outage(error)
    retries = get_settings().max_retries
    assert [retry_failed(n, error) for n in (retries - 1, retries)] == [True, False]
