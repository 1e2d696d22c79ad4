"""Statements every turn runs: built with SQLAlchemy Core, compiled once, run on the driver's cursor.

Why: a turn runs about fifteen statements, and through SQLAlchemy's execution path (cache key,
compiled-cache lookup, parameter processing, result set-up) each cost this machine about twice what
the driver itself spends (`make bench`: 150 µs against 70 µs a statement). A `Prepared` statement is
still one Core statement on the models' tables, compiled by SQLAlchemy; on PostgreSQL it then runs
on the psycopg cursor of the unit's own connection (a session's or a plain one), inside its transaction, and
psycopg prepares it server-side after a few runs. Driver errors come out as SQLAlchemy's exceptions
(an `IntegrityError` stays an `IntegrityError`) and a lost connection invalidates the pool, as
SQLAlchemy itself would. On SQLite, the embedded default, the statement runs through SQLAlchemy unchanged:
its type processing is what turns SQLite's text dates and float numbers into datetimes and Decimals.

Compiling refuses what the driver could not do alone (expanding IN lists, binds or results that
need SQLAlchemy's type processing, Python-side defaults other than plain callables), so the fast
path can never quietly differ from the normal one; `tests/test_prepared.py` reads rows of every
column type a hot statement returns both ways and compares them, and proves the refusals.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, cast

from psycopg.rows import namedtuple_row
from sqlalchemy import Boolean, DateTime, Float, Integer, Numeric, String
from sqlalchemy.engine import Connection, Dialect
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session
from sqlalchemy.sql import ClauseElement
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.expression import Executable

from app.connection_bounds import connection_lost

Params = Mapping[str, Any]
Unit = Session | Connection
"""Where statements run: an ORM session, or a plain connection (`app.db.plain_transaction`)."""

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
    compiled = cast(SQLCompiler, statement.compile(dialect=dialect))
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
    """One Core statement, run by `__call__(unit, params)`: at once on a unit, or queued on a `Batch`.

    `params` is one mapping, or a sequence of mappings to run the statement once for each (no rows
    are returned then; single executes, since psycopg's `executemany` sets up a pipeline of its
    own that costs more than the one or two rows a turn writes)."""

    __slots__ = ("_forms", "statement")

    def __init__(self, statement: ClauseElement) -> None:
        self.statement = statement
        self._forms: dict[str, _DriverForm] = {}

    def _form(self, dialect: Dialect) -> _DriverForm:
        form = self._forms.get(dialect.name)
        if form is None:
            form = self._forms[dialect.name] = _driver_form(self.statement, dialect)
        return form

    def __call__(self, unit: Unit | Batch, params: Params | Sequence[Params] | None = None) -> Rows:
        if isinstance(unit, Batch):
            return unit.add(self, params)
        return _run(unit, [(self, params)])[0]


class Batch:
    """Statements sent to the database together, then the checks on their outcomes, in one transaction.

    Why: each statement of a turn is a round trip, and on a busy machine every round trip is two
    context switches and a wait for a core. On PostgreSQL a batch goes out in psycopg's pipeline
    mode, one round trip for all its statements (`make bench`: for six statements, a third less
    client CPU and 40 % less server CPU). So statements in a batch cannot use each other's results
    in Python; SQL can (a statement sees what the ones before it changed). `then(check)` runs a
    check once the results are in, before the transaction commits: a guard that matched nothing
    raises there and the whole transaction rolls back. On SQLite the statements run one by one.

    Use it as `with plain_transaction() as connection, Batch(connection) as batch:`; results are read after
    the `with` (a `Rows` returned by a queued statement is filled in when the batch is sent), and
    nothing else may run on the unit inside it, or it would run before the queued statements.
    """

    def __init__(self, unit: Unit) -> None:
        self.unit = unit
        self._queued: list[tuple[Prepared, Params | Sequence[Params] | None, Rows]] = []
        self._checks: list[Callable[[], None]] = []

    def add(self, prepared: Prepared, params: Params | Sequence[Params] | None) -> Rows:
        pending = Rows([], -1)
        self._queued.append((prepared, params, pending))
        return pending

    def then(self, check: Callable[[], None]) -> None:
        self._checks.append(check)

    def send(self) -> None:
        queued, self._queued = self._queued, []
        results = _run(self.unit, [(prepared, params) for prepared, params, _ in queued]) if queued else []
        for (_, _, pending), result in zip(queued, results, strict=True):
            pending.rows, pending.rowcount = result.rows, result.rowcount
        checks, self._checks = self._checks, []
        for check in checks:
            check()

    def __enter__(self) -> Batch:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        if exc_type is None:
            self.send()


def then(unit: Unit | Batch, check: Callable[[], None]) -> None:
    """Run `check` on a statement's outcome: now on a unit, once the results are in on a batch."""
    if isinstance(unit, Batch):
        unit.then(check)
    else:
        check()


Statements = list[tuple[Prepared, Params | Sequence[Params] | None]]


def _run(unit: Unit, statements: Statements) -> list[Rows]:
    """SQLite's values need SQLAlchemy's type processing; PostgreSQL's are read as they are by psycopg."""
    connection = unit if isinstance(unit, Connection) else unit.connection()
    if connection.dialect.name != "postgresql":
        return _run_through_sqlalchemy(connection, statements)
    return _run_on_psycopg(connection, statements)


def _run_through_sqlalchemy(connection: Connection, statements: Statements) -> list[Rows]:
    results = []
    for prepared, params in statements:
        result = connection.execute(cast(Executable, prepared.statement), params)
        results.append(Rows(list(result) if result.returns_rows else [], result.rowcount))
    return results


class _DriverRun(NamedTuple):
    """One statement as psycopg runs it: its SQL, once for each parameter set."""

    sql: str
    param_sets: list[dict[str, Any]]
    many: bool
    """Given a sequence of parameter sets (an executemany): only the count of rows changed is returned."""


def _driver_run(form: _DriverForm, params: Params | Sequence[Params] | None) -> _DriverRun:
    return _DriverRun(form.sql, [_complete(form, p) for p in _param_sets(params)], _many(params))


def _run_on_psycopg(connection: Connection, statements: Statements) -> list[Rows]:
    """On the unit's own psycopg connection, inside its transaction: one statement run once alone, more in
    psycopg's pipeline, one round trip for them all."""
    dialect = connection.dialect
    runs = [_driver_run(prepared._form(dialect), params) for prepared, params in statements]
    driver = connection.connection.driver_connection
    assert driver is not None, "a pooled connection holds its driver's"
    cursors: list[list[Any]] = []
    try:
        if len(runs) == 1 and len(runs[0].param_sets) == 1:
            cursors = [_execute(driver, runs[0].sql, runs[0].param_sets)]
        else:
            with driver.pipeline():
                cursors = [_execute(driver, run.sql, run.param_sets) for run in runs]
        return [_rows(run_cursors, run.many) for run_cursors, run in zip(cursors, runs, strict=True)]
    except dialect.loaded_dbapi.Error as exc:
        raise _as_sqlalchemy_error(connection, driver, runs, exc) from exc
    finally:
        for run_cursors in cursors:
            for cursor in run_cursors:
                cursor.close()


def _rows(cursors: list[Any], many: bool) -> Rows:
    if many:
        return Rows([], sum(cursor.rowcount for cursor in cursors))
    cursor = cursors[0]
    return Rows(cursor.fetchall() if cursor.description is not None else [], cursor.rowcount)


def _as_sqlalchemy_error(connection: Connection, driver: Any, runs: list[_DriverRun],
                         error: Exception) -> BaseException:
    """The error SQLAlchemy would have raised, so that callers catch one kind (an `IntegrityError` stays one);
    a lost connection is invalidated and the pool emptied, as SQLAlchemy does."""
    dialect = connection.dialect
    lost = connection_lost(error, driver)
    if lost:
        connection.invalidate(error)
        connection.engine.dispose()
    return DBAPIError.instance(
        "; ".join(run.sql for run in runs), [run.param_sets for run in runs], error, dialect.loaded_dbapi.Error,
        connection_invalidated=lost, dialect=dialect)


def _many(params: Params | Sequence[Params] | None) -> bool:
    return params is not None and not isinstance(params, Mapping)


def _param_sets(params: Params | Sequence[Params] | None) -> list[Params | None]:
    """A statement's parameter sets: each of an executemany's, else its one (or none)."""
    if params is None or isinstance(params, Mapping):
        return [params]
    return list(params)


def _execute(driver: Any, sql: str, batch: list[dict[str, Any]]) -> list[Any]:
    cursors = []
    for values in batch:
        cursor = driver.cursor(row_factory=namedtuple_row)
        cursors.append(cursor)
        cursor.execute(sql, values)
    return cursors


def _complete(form: _DriverForm, params: Params | None) -> dict[str, Any]:
    values = {**form.fixed, **(params or {})}
    for name, default in form.defaults:
        if name not in values:
            values[name] = default()
    return values


__all__ = ["Batch", "NotPreparable", "Prepared", "Rows", "Unit", "then"]
