"""Creating or upgrading the schema: `schema.sql` on PostgreSQL, the models on SQLite.

Every statement of `schema.sql` is idempotent, so `agentq db init` is safe to run twice and from
several machines at once (an advisory lock serialises them); a column added after a release is
added to an older database by its `ALTER TABLE … ADD COLUMN IF NOT EXISTS` (and again to one it was
dropped from by hand; a column of the first release is not, having no such statement), and a status CHECK
whose list is not this release's is replaced. On SQLite the models create what is missing, and a column a table
lacks is added to it when it is nullable or has a default; a file written before money was kept in millionths
there has its amounts converted once, and a table is rebuilt where SQLite cannot alter it in place
(`app.sqlite_rebuilds`): one made before its ids were never to be given again, one whose status CHECK holds another
list than this release's.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from sqlalchemy import Column, Connection, Engine, Numeric, Table, inspect, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.schema import CreateColumn

from app.config import get_settings
from app.connection_bounds import answers_within
from app.db import database_location, get_engine
from app.errors import AgentqError
from app.key_variables import models_refused_now
from app.models import Base
from app.money import MILLIONTHS
from app.setup_problems import lacks_a_column
from app.sqlite_rebuilds import rebuilt_for_ids_never_reused, rebuilt_for_this_releases_statuses
from app.sqlite_upgrades import mark_money_in_millionths, money_in_millionths

SCHEMA_FILE = Path(__file__).parent / "schema.sql"
"""The top-level `schema.sql`, through `app/schema.sql` (a link to it, so that an installed package holds a copy)."""
_LOCK_ID = 0x61676E74


@dataclass(frozen=True, slots=True)
class SchemaReport:
    """What `agentq db init` did, printed as its JSON line."""

    database: str
    """Where: a SQLite path made absolute, any other URL without its password (`app.db.database_location`)."""
    applied: str
    """`schema.sql` on PostgreSQL, `models` on SQLite."""
    added_columns: list[str] = field(default_factory=list)
    """The `table.column`s an existing table lacked and this run added (a table made whole is not listed)."""
    converted_money_columns: int = 0
    """On SQLite, the money columns of an older file converted to millionths (once)."""
    rebuilt_tables: list[str] = field(default_factory=list)
    """On SQLite, the tables of an older file rebuilt (once, rows and ids kept) as the models declare them, which
    SQLite cannot alter in place: so that their ids are never given again, or that their status CHECK takes every
    status of this release."""
    refused_key_variables: list[dict[str, Any]] = field(default_factory=list)
    """Live models whose `api_key_env` names a variable that `AGENTQ_MODEL_KEY_VARIABLES`, as this process
    has it, does not allow (`app.key_variables.models_refused_now`)."""


class SchemaIncomplete(AgentqError):
    """The database lacks columns of this release that `db init` cannot add: run it, or mend them by hand."""

    code = "schema_incomplete"


def init_schema() -> SchemaReport:
    engine = get_engine(create=True)
    if engine.dialect.name == "postgresql":
        try:
            # A change may take minutes on a large table (an index built, a column added under its lock, which
            # AGENTQ_SCHEMA_LOCK_TIMEOUT_SECONDS bounds on the server): no bound on the server's answer here.
            with answers_within(None), engine.begin() as connection:
                connection.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": _LOCK_ID})
                connection.exec_driver_sql(f"SET LOCAL lock_timeout = {_lock_timeout_ms()}")
                absent = _absent(schema_gaps(connection))  # under the lock: what another run added is not ours
                indexes = set(connection.execute(text(
                    "SELECT indexname FROM pg_indexes WHERE schemaname = current_schema()")).scalars())
                for statement in schema_statements(SCHEMA_FILE.read_text()):
                    if not _done_already(statement, absent, indexes):
                        connection.exec_driver_sql(statement)
                still_missing = missing_columns(connection)
                added = sorted({name for name in absent if "." in name} - set(still_missing))
        except DBAPIError as exc:
            if isinstance(exc.orig, psycopg.errors.LockNotAvailable):
                waited = get_settings().schema_lock_timeout_seconds
                raise SchemaLocked(
                    f"`db init` waited {waited:g} s for a table that other sessions are using (an open transaction, a "
                    "dump; pg_stat_activity names them) and changed nothing; run it again once they end.") from None
            if lacks_a_column(exc):  # an index of schema.sql on a column dropped by hand (its index went with it)
                _check_complete(engine, missing_columns(engine))
            raise
        _check_complete(engine, still_missing, added)
        return SchemaReport(database_location(), SCHEMA_FILE.name, added_columns=added,
                            refused_key_variables=_refused_key_variables(engine))
    fresh = not inspect(engine).get_table_names()
    Base.metadata.create_all(engine)
    added = _add_missing_columns(engine)
    rebuilt = rebuilt_for_ids_never_reused(engine) + rebuilt_for_this_releases_statuses(engine)
    _replace_indexes(engine)
    _check_complete(engine, missing_columns(engine), added)
    converted = _money_in_millionths(engine, fresh)
    return SchemaReport(database_location(), "models", added_columns=added, converted_money_columns=converted,
                        rebuilt_tables=rebuilt, refused_key_variables=_refused_key_variables(engine))


class SchemaLocked(AgentqError):
    """`db init` could not take a table other sessions held within AGENTQ_SCHEMA_LOCK_TIMEOUT_SECONDS."""

    code = "schema_locked"


def schema_statements(sql: str) -> list[str]:
    """`schema.sql`'s statements, one by one: each ends with a semicolon at the end of its line, outside a
    `$$`-quoted body (a `DO` block's statements end so too, and run with it)."""
    chunks, lines, in_body = [], [], False
    for line in sql.splitlines():
        lines.append(line)
        in_body ^= line.count("$$") % 2 == 1
        if not in_body and _ENDS_A_STATEMENT.search(line):
            chunks.append("\n".join(lines))
            lines = []
    chunks.append("\n".join(lines))
    return [chunk.strip() for chunk in chunks
            if any(line.strip() and not line.strip().startswith("--") for line in chunk.splitlines())]


_ENDS_A_STATEMENT = re.compile(r";[ \t]*$")


_ADDS_A_COLUMN = re.compile(r"^ALTER TABLE (\w+) ADD COLUMN IF NOT EXISTS (\w+)", re.MULTILINE)
_CREATES_AN_INDEX = re.compile(r"^CREATE (?:UNIQUE )?INDEX IF NOT EXISTS (\w+)", re.MULTILINE)


def _done_already(statement: str, absent: set[str], indexes: set[str]) -> bool:
    """Whether the statement adds a column or an index the database already has (`absent`: the tables and the
    `table.column`s it lacks; `indexes`: those it has). PostgreSQL takes the table's lock before it finds there
    is nothing to do: ACCESS EXCLUSIVE for an `ADD COLUMN IF NOT EXISTS`, which waits for every transaction
    using the table (a long report, a `pg_dump`), SHARE for a `CREATE INDEX IF NOT EXISTS`, which waits for every
    transaction that wrote to it; every new query of the table waits behind either. A `db init` of a release
    that changed nothing held up every turn until then. Such statements are not run; the others of `schema.sql`
    (`CREATE TABLE IF NOT EXISTS`, `DROP INDEX IF EXISTS` of one gone already) take no lock when there is
    nothing to do. Every column `schema.sql` adds is a model's (`tests/test_schema.py`)."""
    if (adds := _ADDS_A_COLUMN.search(statement)) is not None:
        return adds[1] not in absent and f"{adds[1]}.{adds[2]}" not in absent
    if (creates := _CREATES_AN_INDEX.search(statement)) is not None:
        return creates[1] in indexes
    return False


def _lock_timeout_ms() -> int:
    """What a change to a table waits for the table at most: while it waits, every query of that table waits
    behind it, turns' claims and settlements included."""
    return max(int(get_settings().schema_lock_timeout_seconds * 1000), 1)


def _absent(gaps: list[tuple[Table, Column[Any] | None]]) -> set[str]:
    """`schema_gaps` as names: a table the database lacks whole, and `table.column` for a column of one it has."""
    return {table.name if column is None else f"{table.name}.{column.name}" for table, column in gaps}


def _check_complete(engine: Engine, missing: list[str], added: list[str] | None = None) -> None:
    """Every column of the models is there once `db init` has run. It adds a column where it can (on
    PostgreSQL where `schema.sql` adds it to an older table, on SQLite where it may be empty or has a default),
    and answering success when it could not left the worker refusing to start until `db init` ran, which it
    just had. `missing` is what the database still lacks once `db init` has run."""
    if not missing:
        return
    definition = "schema.sql" if engine.dialect.name == "postgresql" else "the models (app/models)"
    where_it_can = {"postgresql": "schema.sql adds it to an older table (ADD COLUMN IF NOT EXISTS, for the columns "
                                  "releases added since the first)",
                    "sqlite": "it may be empty or has a default"}
    done = f" (this run added {', '.join(added)})" if added else ""
    raise SchemaIncomplete(f"The database {database_location()} still lacks {', '.join(missing)} after `db init`"
                           f"{done}: it adds a missing column only where {where_it_can[engine.dialect.name]}; "
                           f"restore it as {definition} defines it.")


def _refused_key_variables(engine: Engine) -> list[dict[str, Any]]:
    with engine.connect() as connection:
        return [asdict(model) for model in models_refused_now(connection)]


REPLACED_INDEXES = ("idx_conversation_messages_role_status", "idx_dead_letters_open")
"""Indexes of earlier releases that a later one replaced (schema.sql drops them on PostgreSQL)."""


def _replace_indexes(engine: Engine) -> None:
    """On a SQLite file of an earlier release: the models' indexes it lacks (`create_all` makes those of the
    tables it creates only), and none of those they replaced."""
    with engine.begin() as connection:
        for table in Base.metadata.sorted_tables:
            for index in table.indexes:
                index.create(connection, checkfirst=True)
        for name in REPLACED_INDEXES:
            connection.exec_driver_sql(f"DROP INDEX IF EXISTS {name}")


def _money_in_millionths(engine: Engine, fresh: bool) -> int:
    """Convert the amounts of a SQLite file written when money was a NUMERIC there, once; the number of
    columns converted (none for a file already converted, or new)."""
    with engine.begin() as connection:
        driver = connection.connection.driver_connection
        assert driver is not None, "a pooled connection holds its driver's"
        if money_in_millionths(driver):
            return 0
        columns = [] if fresh else [(table.name, column.name) for table in Base.metadata.sorted_tables
                                    for column in table.columns if isinstance(column.type, Numeric)]
        for table, column in columns:
            connection.exec_driver_sql(f"UPDATE {table} SET {column} = CAST(ROUND({column} * {MILLIONTHS}) "
                                       f"AS INTEGER) WHERE {column} IS NOT NULL")
        mark_money_in_millionths(driver)
    return len(columns)


def schema_gaps(bind: Engine | Connection) -> list[tuple[Table, Column[Any] | None]]:
    """The models' columns the database lacks, each with its table; a table it lacks whole, as (table, None).
    What `agentq db init` adds on SQLite and reports adding on either database, and what a worker refuses to
    start without."""
    inspector = inspect(bind)
    tables = set(inspector.get_table_names())
    gaps: list[tuple[Table, Column[Any] | None]] = []
    for table in Base.metadata.sorted_tables:
        if table.name not in tables:
            gaps.append((table, None))
            continue
        present = {column["name"] for column in inspector.get_columns(table.name)}
        gaps += [(table, column) for column in table.columns if column.name not in present]
    return gaps


def missing_columns(bind: Engine | Connection) -> list[str]:
    """`schema_gaps` as an operator reads them: `table.column`, or `table.*` for a table missing whole."""
    return [f"{table.name}.{'*' if column is None else column.name}" for table, column in schema_gaps(bind)]


def _add_missing_columns(engine: Engine) -> list[str]:
    added = []
    gaps = schema_gaps(engine)
    with engine.begin() as connection:
        for table, column in gaps:
            if column is not None and (column.nullable or column.server_default is not None):
                ddl = CreateColumn(column).compile(dialect=engine.dialect)
                connection.exec_driver_sql(f"ALTER TABLE {table.name} ADD COLUMN {ddl}")
                added.append(f"{table.name}.{column.name}")
    return added
