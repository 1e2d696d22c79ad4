"""Statements every turn runs: built with SQLAlchemy Core, compiled once, run on the driver's cursor.

Why: a turn runs about fifteen statements, and through SQLAlchemy's execution path (cache key,
compiled-cache lookup, parameter processing, result set-up) each cost this machine about twice what
the driver itself spends (`make bench`: 150 µs against 70 µs a statement). A `Prepared` statement is
still one Core statement on the models' tables, compiled by SQLAlchemy; on PostgreSQL it then runs
on the psycopg cursor of the session's own connection, inside the session's transaction, and
psycopg prepares it server-side after a few runs. Driver errors come out as SQLAlchemy's exceptions
(an `IntegrityError` stays an `IntegrityError`) and a lost connection invalidates the pool, as
SQLAlchemy itself would. On SQLite, the embedded default, the statement runs through SQLAlchemy unchanged:
its type processing is what turns SQLite's text dates and float numbers into datetimes and Decimals.

Compiling refuses what the driver could not do alone (expanding IN lists, binds or results that
need SQLAlchemy's type processing, Python-side defaults other than plain callables), so the fast
path can never quietly differ from the normal one; `tests/test_prepared.py` runs each statement
both ways and compares.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from psycopg.rows import namedtuple_row
from sqlalchemy import Boolean, DateTime, Float, Integer, Numeric, String
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session
from sqlalchemy.sql import ClauseElement

Params = Mapping[str, Any]

_PLAIN_TYPES = (Integer, String, DateTime, Boolean)
"""Types whose values psycopg reads exactly as SQLAlchemy's PostgreSQL dialect hands them back.
(Binds are checked by asking the type for a bind processor; Boolean's only coerces to bool.)"""


class NotPreparable(TypeError):
    """The statement needs SQLAlchemy at execution time; build it differently or run it normally."""


class Rows:
    """The outcome of one run: its rows (named tuples) and how many rows it changed."""

    __slots__ = ("rowcount", "rows")

    def __init__(self, rows: list[Any], rowcount: int) -> None:
        self.rows = rows
        self.rowcount = rowcount

    def __iter__(self) -> Iterator[Any]:
        return iter(self.rows)

    def first(self) -> Any | None:
        return self.rows[0] if self.rows else None

    def one(self) -> Any:
        if len(self.rows) != 1:
            raise LookupError(f"expected one row, got {len(self.rows)}")
        return self.rows[0]

    def scalar(self) -> Any | None:
        return self.rows[0][0] if self.rows else None

    def scalars(self) -> list[Any]:
        return [row[0] for row in self.rows]


@dataclass(frozen=True, slots=True)
class _DriverForm:
    sql: str
    fixed: dict[str, Any]
    """Binds whose value is part of the statement (`values(kind="charge")`)."""
    defaults: tuple[tuple[str, Callable[[], Any]], ...]
    """Columns SQLAlchemy would fill in Python (`default=` / `onupdate=`) when no value is given."""


def _read_plainly(type_: Any) -> bool:
    """psycopg returns NUMERIC as Decimal and DOUBLE PRECISION as float: what the type asks for, or not."""
    if isinstance(type_, Float):
        return not type_.asdecimal
    if isinstance(type_, Numeric):
        return bool(type_.asdecimal)
    return isinstance(type_, _PLAIN_TYPES)


def _python_default(column: Any, attribute: str) -> Callable[[], Any]:
    default = getattr(column, attribute)
    if default is not None and default.is_scalar:
        value = default.arg
        return lambda: value
    if default is not None and default.is_callable:
        function = default.arg
        return lambda: function(None)
    raise NotPreparable(f"column {column} has a {attribute} SQLAlchemy must compute")


def _driver_form(statement: ClauseElement, dialect: Dialect) -> _DriverForm:
    compiled = statement.compile(dialect=dialect)
    defaults = tuple((column.key, _python_default(column, "default")) for column in compiled.insert_prefetch) + tuple(
        (column.key, _python_default(column, "onupdate")) for column in compiled.update_prefetch)
    computed = {name for name, _ in defaults}
    fixed: dict[str, Any] = {}
    for name, bind in compiled.binds.items():
        if bind.expanding or bind.callable is not None:
            raise NotPreparable(f"bind {name!r} is an expanding or callable parameter")
        processes = bind.type.dialect_impl(dialect).bind_processor(dialect) is not None
        if processes and not isinstance(bind.type, Boolean):
            raise NotPreparable(f"bind {name!r} of type {bind.type!r} needs SQLAlchemy's type processing")
        if not bind.required and name not in computed:
            fixed[name] = bind.value
    for column in getattr(statement, "exported_columns", ()):
        if not _read_plainly(column.type):
            raise NotPreparable(f"result column {column} of type {column.type!r} needs SQLAlchemy's type processing")
    return _DriverForm(compiled.string, fixed, defaults)


class Prepared:
    """One Core statement, run through `__call__(session, params)` on the session's transaction.

    `params` is one mapping, or a sequence of mappings to run the statement once for each (no rows
    are returned then; a loop of executes, since psycopg's `executemany` sets up a pipeline that
    costs more than the one or two rows a turn writes)."""

    __slots__ = ("_forms", "statement")

    def __init__(self, statement: ClauseElement) -> None:
        self.statement = statement
        self._forms: dict[str, _DriverForm] = {}

    def _form(self, dialect: Dialect) -> _DriverForm:
        form = self._forms.get(dialect.name)
        if form is None:
            form = self._forms[dialect.name] = _driver_form(self.statement, dialect)
        return form

    def __call__(self, session: Session, params: Params | Sequence[Params] | None = None) -> Rows:
        connection = session.connection()
        dialect = connection.dialect
        if dialect.name != "postgresql":
            result = session.execute(self.statement, params)  # type: ignore[arg-type]
            return Rows(list(result) if result.returns_rows else [], result.rowcount)
        return self._run_on_driver(connection, dialect, params)

    def _run_on_driver(self, connection: Any, dialect: Dialect, params: Params | Sequence[Params] | None) -> Rows:
        form = self._form(dialect)
        many = params is not None and not isinstance(params, Mapping)
        batch = [self._complete(form, p) for p in params] if many else [self._complete(form, params)]  # type: ignore[union-attr]
        driver_connection = connection.connection.driver_connection
        cursor = driver_connection.cursor(row_factory=namedtuple_row)
        try:
            if many:
                changed = 0
                for values in batch:
                    cursor.execute(form.sql, values)
                    changed += cursor.rowcount
                return Rows([], changed)
            cursor.execute(form.sql, batch[0])
            return Rows(cursor.fetchall() if cursor.description is not None else [], cursor.rowcount)
        except dialect.loaded_dbapi.Error as exc:
            lost = dialect.is_disconnect(exc, driver_connection, cursor)
            if lost:
                connection.invalidate(exc)
                connection.engine.dispose()
            raise DBAPIError.instance(form.sql, batch, exc, dialect.loaded_dbapi.Error,
                                      connection_invalidated=lost, dialect=dialect) from exc
        finally:
            cursor.close()

    @staticmethod
    def _complete(form: _DriverForm, params: Params | None) -> dict[str, Any]:
        values = {**form.fixed, **(params or {})}
        for name, default in form.defaults:
            if name not in values:
                values[name] = default()
        return values


__all__ = ["NotPreparable", "Prepared", "Rows"]
