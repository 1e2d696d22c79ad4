"""Creating or upgrading the schema: `schema.sql` on PostgreSQL, the models on SQLite.

Every statement of `schema.sql` is idempotent, so `agentq db init` is safe to run twice and from
several machines at once (an advisory lock serialises them); a column added after a release is
added to an older database by its `ALTER TABLE … ADD COLUMN IF NOT EXISTS`. On SQLite the models
create what is missing, and a column a table lacks is added to it when it is nullable or has a default;
a file written before money was kept in millionths there has its amounts converted once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import Engine, Numeric, inspect, text
from sqlalchemy.schema import CreateColumn

from app.db import database_location, get_engine
from app.models import Base
from app.money import MILLIONTHS

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
    """On SQLite, the `table.column`s an older file lacked."""
    converted_money_columns: int = 0
    """On SQLite, the money columns of an older file converted to millionths (once)."""


def init_schema() -> SchemaReport:
    engine = get_engine()
    if engine.dialect.name == "postgresql":
        sql = SCHEMA_FILE.read_text()
        with engine.begin() as connection:
            connection.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": _LOCK_ID})
            connection.exec_driver_sql(sql)
        return SchemaReport(database_location(), SCHEMA_FILE.name)
    fresh = not inspect(engine).get_table_names()
    Base.metadata.create_all(engine)
    added = _add_missing_columns(engine)
    converted = _money_in_millionths(engine, fresh)
    return SchemaReport(database_location(), "models", added, converted)


SQLITE_MONEY_IN_MILLIONTHS = 1
"""`PRAGMA user_version` of a SQLite file whose money is whole millionths (`app.models.base.Millionths`)."""


def _money_in_millionths(engine: Engine, fresh: bool) -> int:
    """Convert the amounts of a SQLite file written when money was a NUMERIC there, once; the number of
    columns converted (none for a file already converted, or new)."""
    with engine.begin() as connection:
        if connection.exec_driver_sql("PRAGMA user_version").scalar_one() >= SQLITE_MONEY_IN_MILLIONTHS:
            return 0
        columns = [] if fresh else [(table.name, column.name) for table in Base.metadata.sorted_tables
                                    for column in table.columns if isinstance(column.type, Numeric)]
        for table, column in columns:
            connection.exec_driver_sql(f"UPDATE {table} SET {column} = CAST(ROUND({column} * {MILLIONTHS}) "
                                       f"AS INTEGER) WHERE {column} IS NOT NULL")
        connection.exec_driver_sql(f"PRAGMA user_version = {SQLITE_MONEY_IN_MILLIONTHS}")
    return len(columns)


def _add_missing_columns(engine: Engine) -> list[str]:
    existing = {name: {c["name"] for c in inspect(engine).get_columns(name)} for name in Base.metadata.tables}
    added = []
    with engine.begin() as connection:
        for name, table in Base.metadata.tables.items():
            for column in table.columns:
                if column.name not in existing[name] and (column.nullable or column.server_default is not None):
                    ddl = CreateColumn(column).compile(dialect=engine.dialect)
                    connection.exec_driver_sql(f"ALTER TABLE {name} ADD COLUMN {ddl}")
                    added.append(f"{name}.{column.name}")
    return added
