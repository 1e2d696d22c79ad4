"""The one-time upgrade an older SQLite file needs before any process but `agentq db init` may open it.

Money was a NUMERIC there, kept as a binary float; it is whole millionths now (`app.models.base.Millionths`),
and `db init` converts an older file's amounts once, marking the file with `PRAGMA user_version`. Read
before that, every balance, reservation and price is a millionth of itself: a turn would be refused as
unaffordable, and an amount written then (a charge, a top-up) would be multiplied again with the rest by
the conversion. So every other process refuses such a file at each new connection (`app.db`): the API
answers 503 naming `db init` until it has run, and serves once it has, without a restart; a worker does
not start."""

from __future__ import annotations

import sqlite3

MONEY_IN_MILLIONTHS = 1
"""`PRAGMA user_version` of a SQLite file whose money is whole millionths."""


def money_in_millionths(connection: sqlite3.Connection) -> bool:
    """The file is marked as keeping money in millionths: converted once, or marked as it was made."""
    return bool(connection.execute("PRAGMA user_version").fetchone()[0] >= MONEY_IN_MILLIONTHS)


def mark_money_in_millionths(connection: sqlite3.Connection) -> None:
    connection.execute(f"PRAGMA user_version = {MONEY_IN_MILLIONTHS}")


def money_awaits_conversion(connection: sqlite3.Connection) -> bool:
    """An agentq file (it has the users table) not yet marked as keeping money in millionths."""
    if money_in_millionths(connection):
        return False
    return connection.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'users'").fetchone() \
        is not None
