"""Making again, rows and ids kept, a table of an older SQLite file that SQLite cannot alter in place as the models
now declare it (`agentq db init`, after `create_all`, which leaves a table that exists as it is).

A table is made anew beside the old one, the rows copied, the old one dropped and the new one given its name;
its indexes go with the old table, and `app.schema` makes them again.
"""

from __future__ import annotations

from sqlalchemy import CheckConstraint, Connection, Engine, MetaData, Table
from sqlalchemy.schema import CreateTable

from app.models import Base
from app.models.conversations import ALL_STATUSES_SQL
from app.sqlite_engine import pragma_for_a_while

__all__ = ["rebuilt_for_ids_never_reused", "rebuilt_for_this_releases_statuses"]


def rebuilt_for_ids_never_reused(engine: Engine) -> list[str]:
    """Rebuild each table the models declare `sqlite_autoincrement` that a SQLite file made before that has
    without it (SQLite cannot add it in place). No other table refers to these, so foreign keys stay on."""
    rebuilt = []
    with engine.begin() as connection:
        for table in Base.metadata.sorted_tables:
            declared = table.dialect_options["sqlite"]["autoincrement"]
            if declared and "AUTOINCREMENT" not in _made_as(connection, table).upper():
                _rebuild(connection, table)
                rebuilt.append(table.name)
    return rebuilt


def rebuilt_for_this_releases_statuses(engine: Engine) -> list[str]:
    """Rebuild each table whose status CHECK a SQLite file holds with another list than the models'
    (`app.turn_status.TurnStatus`): SQLite cannot alter a CHECK and `create_all` leaves a table that exists as it
    is, so every write of a status added since failed it. Other tables refer to these (a turn to its messages):
    foreign keys are off meanwhile, as in SQLite's own procedure for such a change (dropping the old table fails
    under a reference to one of its rows otherwise), and every reference holds again once the new table has the
    old one's name and ids. A second `db init` waits for the write lock (`BEGIN IMMEDIATE`) and finds the list
    up to date."""
    rebuilt = []
    with (engine.connect() as connection, pragma_for_a_while(connection, "foreign_keys", "OFF", "ON"),
          connection.begin()):
        for table in Base.metadata.sorted_tables:
            made_as = _made_as(connection, table)
            if any(check not in made_as for check in _status_checks(table)):
                _rebuild(connection, table)
                rebuilt.append(table.name)
    return rebuilt


def _status_checks(table: Table) -> list[str]:
    """The table's CHECKs of the statuses' list, as SQLAlchemy writes them in a SQLite table's statement."""
    return [f"CONSTRAINT {check.name} CHECK ({check.sqltext})" for check in table.constraints
            if isinstance(check, CheckConstraint) and str(check.sqltext) == ALL_STATUSES_SQL]


def _made_as(connection: Connection, table: Table) -> str:
    """The statement a SQLite file keeps for the table: as it made it, with the columns added since."""
    return str(connection.exec_driver_sql("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = ?",
                                          (table.name,)).scalar_one())


def _rebuild(connection: Connection, table: Table) -> None:
    """Make a SQLite table again as the models declare it, as the module's docstring says. The new table is
    declared beside the tables it refers to: its foreign keys are written with their names."""
    beside = MetaData()
    for referred in {key.column.table for key in table.foreign_keys}:
        referred.to_metadata(beside)
    staging = table.to_metadata(beside, name=f"{table.name}__rebuilt")
    connection.execute(CreateTable(staging))
    columns = ", ".join(column.name for column in table.columns)
    connection.exec_driver_sql(f"INSERT INTO {staging.name} ({columns}) SELECT {columns} FROM {table.name}")
    connection.exec_driver_sql(f"DROP TABLE {table.name}")
    connection.exec_driver_sql(f"ALTER TABLE {staging.name} RENAME TO {table.name}")
