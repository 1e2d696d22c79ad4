"""`schema.sql` is the schema: it must equal the models, and applying it must be repeatable."""

from __future__ import annotations

import json
import sqlite3
import subprocess
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import psycopg
import pytest
from sqlalchemy import create_engine, inspect, text

from app.models import Base
from app.turn_status import TurnStatus
from tests.conftest import child_env
from tests.stack import drop_database, scratch_database
from tests.support import ROOT, agentq

if TYPE_CHECKING:
    from pathlib import Path

PG = "postgresql://postgres@127.0.0.1:5432"


def _dump(database: str) -> str:
    out = subprocess.run(["pg_dump", "--schema-only", "--no-owner", "-h", "127.0.0.1", "-U", "postgres", database],
                         check=True, capture_output=True, text=True).stdout
    return "\n".join(line for line in out.splitlines()
                     if line.strip() and not line.startswith(("--", "\\restrict", "\\unrestrict")))


def test_schema_sql_equals_the_models() -> None:
    from_sql, from_models = scratch_database("agentq_schema"), scratch_database("agentq_schema")
    try:
        with psycopg.connect(f"{PG}/{from_sql}", autocommit=True) as conn:
            conn.execute((ROOT / "schema.sql").read_text())
        engine = create_engine(f"postgresql+psycopg://postgres@127.0.0.1:5432/{from_models}")
        Base.metadata.create_all(engine)
        engine.dispose()
        sql_dump, model_dump = _dump(from_sql), _dump(from_models)
        assert "CREATE TABLE public.conversation_messages" in sql_dump
        assert sql_dump == model_dump
    finally:
        drop_database(from_sql)
        drop_database(from_models)


def db_init(url: str) -> subprocess.CompletedProcess[str]:
    """`agentq db init` on `url`, as an operator runs it; it must succeed."""
    result = subprocess.run(agentq("db", "init"), env=child_env(DATABASE_URL=url), capture_output=True, text=True,
                            cwd=ROOT)
    assert result.returncode == 0, result.stderr
    return result


def test_db_init_is_safe_to_run_twice_on_postgresql() -> None:
    name = scratch_database("agentq_schema")
    try:
        for _ in range(2):
            printed = json.loads(db_init(f"postgresql://postgres@127.0.0.1:5432/{name}").stdout)
            assert printed == {"database": f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}",
                               "applied": "schema.sql", "added_columns": [], "converted_money_columns": 0,
                               "rebuilt_tables": [], "refused_key_variables": []}
        engine = create_engine(f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}")
        assert set(inspect(engine).get_table_names()) == set(Base.metadata.tables)
        engine.dispose()
    finally:
        drop_database(name)


def test_db_init_creates_the_sqlite_default(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/agentq.sqlite3"
    for _ in range(2):
        db_init(url)
    engine = create_engine(url)
    inspector = inspect(engine)
    assert set(inspector.get_table_names()) == set(Base.metadata.tables)
    index_names = {i["name"] for i in inspector.get_indexes("conversation_messages")}
    assert {"idx_conversation_messages_status", "idx_conversation_messages_role_status_updated",
            "uq_conversation_messages_in_flight"} <= index_names
    engine.dispose()


def test_db_init_adds_a_later_column_to_an_older_postgresql_database() -> None:
    name = scratch_database("agentq_schema")
    try:
        with psycopg.connect(f"{PG}/{name}", autocommit=True) as conn:
            conn.execute((ROOT / "schema.sql").read_text())
            conn.execute("ALTER TABLE turns DROP COLUMN deadline_at")
        added = json.loads(db_init(f"postgresql://postgres@127.0.0.1:5432/{name}").stdout)["added_columns"]
        assert added == ["turns.deadline_at"]  # it said [] on PostgreSQL, whatever it added
        engine = create_engine(f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}")
        assert "deadline_at" in {c["name"] for c in inspect(engine).get_columns("turns")}
        engine.dispose()
    finally:
        drop_database(name)


def _busy(url: str) -> psycopg.Connection:
    """A session in the middle of a transaction that read and wrote every table, as a turn's settlement with a
    long report or a `pg_dump` beside it: the locks such transactions hold."""
    session = psycopg.connect(url)
    for table in Base.metadata.sorted_tables:
        session.execute(f"SELECT count(*) FROM {table.name}")
        session.execute(f"LOCK TABLE {table.name} IN ROW EXCLUSIVE MODE")
    return session


def test_db_init_with_nothing_to_change_waits_for_no_session_of_a_busy_database() -> None:
    """PostgreSQL locks a table for an `ADD COLUMN IF NOT EXISTS` or a `CREATE INDEX IF NOT EXISTS` before it
    finds the column or the index there: `db init` waited for every open transaction, and every query of those
    tables, turns' claims included, waited behind it. With nothing to add it takes no table's lock."""
    name = scratch_database("agentq_schema")
    try:
        db_init(f"{PG}/{name}")
        with _busy(f"{PG}/{name}"):
            result = subprocess.run(agentq("db", "init"), env=child_env(DATABASE_URL=f"{PG}/{name}"),
                                    capture_output=True, text=True, cwd=ROOT, timeout=60)
            assert result.returncode == 0, result.stderr
            assert json.loads(result.stdout)["added_columns"] == []
    finally:
        drop_database(name)


def test_db_init_that_must_change_a_busy_table_gives_up_after_its_lock_timeout() -> None:
    """A change waits AGENTQ_SCHEMA_LOCK_TIMEOUT_SECONDS for the table, every query of it queued behind, then
    gives up having changed nothing, and says why; run again once the table is free, it makes the change."""
    name = scratch_database("agentq_schema")
    try:
        with psycopg.connect(f"{PG}/{name}", autocommit=True) as conn:
            conn.execute((ROOT / "schema.sql").read_text())
            conn.execute("ALTER TABLE turns DROP COLUMN deadline_at")
        with _busy(f"{PG}/{name}"):
            result = subprocess.run(agentq("db", "init"), capture_output=True, text=True, cwd=ROOT, timeout=60,
                                    env=child_env(DATABASE_URL=f"{PG}/{name}", AGENTQ_SCHEMA_LOCK_TIMEOUT_SECONDS="1"))
        assert (result.returncode, result.stdout) == (1, "")
        assert json.loads(result.stderr)["error"] == {
            "code": "schema_locked",
            "message": "`db init` waited 1 s for a table that other sessions are using (an open transaction, a dump; "
                       "pg_stat_activity names them) and changed nothing; run it again once they end."}
        engine = create_engine(f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}")
        assert "deadline_at" not in {c["name"] for c in inspect(engine).get_columns("turns")}
        engine.dispose()
        assert json.loads(db_init(f"{PG}/{name}").stdout)["added_columns"] == ["turns.deadline_at"]
    finally:
        drop_database(name)


def test_db_init_adds_a_later_column_to_an_older_sqlite_file(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/agentq.sqlite3"
    db_init(url)
    engine = create_engine(url)
    with engine.begin() as connection:
        connection.exec_driver_sql("ALTER TABLE turns DROP COLUMN deadline_at")
    assert json.loads(db_init(url).stdout)["added_columns"] == ["turns.deadline_at"]
    assert "deadline_at" in {c["name"] for c in inspect(engine).get_columns("turns")}
    engine.dispose()


def test_the_look_at_recent_failures_reads_only_its_window(database: str) -> None:
    """The operators' page asks every 3 s for the failures of the last day: on an index of (role, status) the
    database read every failure ever recorded and dropped those older than the window."""
    with psycopg.connect(database.replace("+psycopg", ""), autocommit=True) as conn:
        conn.execute("SET enable_seqscan = off")
        plan = "\n".join(row[0] for row in conn.execute(
            "EXPLAIN SELECT status, count(*) FROM conversation_messages WHERE role = 'assistant' "
            "AND status IN ('error', 'llm_error') AND updated_at >= now() - interval '1 day' GROUP BY status"))
    assert "idx_conversation_messages_role_status_updated" in plan
    index_condition = next(line for line in plan.splitlines() if "Index Cond" in line)
    assert "updated_at >=" in index_condition, plan


def test_a_page_of_dead_letters_is_read_in_the_listing_order_from_an_index(database: str) -> None:
    """A page of the dead letters reads its rows in order from the index, from the cursor on: not all of them
    sorted, nor every row newer than the cursor filtered out one by one."""
    from app.db import transaction
    from app.dead_letters import page_query
    from app.paging import moment_cursor

    with transaction() as session:
        session.execute(text("SET LOCAL enable_seqscan = off"))
        query = page_query(20, moment_cursor(datetime.now(UTC), 5)).compile(dialect=session.get_bind().dialect)
        plan = "\n".join(row[0] for row in session.connection().exec_driver_sql(f"EXPLAIN {query}", query.params))
    assert "Index Scan Backward using idx_dead_letters_open_by_time" in plan, plan
    assert "Index Cond: (ROW(dead_at, id) < ROW(" in plan and "Sort" not in plan, plan


def test_db_init_gives_an_older_sqlite_file_the_indexes_of_this_release(tmp_path: Path) -> None:
    """`create_all` makes the indexes of the tables it creates only: a file of an earlier release kept the index
    this one replaced and never got the new one."""
    path = tmp_path / "older.sqlite3"
    db_init(f"sqlite:///{path}")
    with sqlite3.connect(path) as older:
        older.execute("DROP INDEX idx_conversation_messages_role_status_updated")
        older.execute("CREATE INDEX idx_conversation_messages_role_status ON conversation_messages (role, status)")
        older.execute("DROP INDEX idx_dead_letters_open_by_time")
        older.execute("CREATE INDEX idx_dead_letters_open ON dead_letters (id) WHERE requeued_at IS NULL")
    db_init(f"sqlite:///{path}")
    engine = create_engine(f"sqlite:///{path}")
    names = {i["name"] for table in ("conversation_messages", "dead_letters")
             for i in inspect(engine).get_indexes(table)}
    engine.dispose()
    assert {"idx_conversation_messages_role_status_updated", "idx_dead_letters_open_by_time"} <= names
    assert not {"idx_conversation_messages_role_status", "idx_dead_letters_open"} & names


def _dead_letter(connection: sqlite3.Connection, name: str) -> int:
    return connection.execute("INSERT INTO dead_letters (redis_message_id, queue, actor, args, error) "
                              "VALUES (?, 'q', 'run_turn', '[]', 'died') RETURNING id", (name,)).fetchone()[0]


def test_a_purged_dead_letters_id_is_never_given_again_on_sqlite(tmp_path: Path) -> None:
    """An operator acts on a dead letter by its id and a purge deletes its row: SQLite without AUTOINCREMENT
    gives the next dead letter the id of a purged last one, so a purge retried would delete another message. A
    file made before the table was declared so is rebuilt by `db init`, once, its rows and indexes kept."""
    path = tmp_path / "older.sqlite3"
    db_init(f"sqlite:///{path}")
    with sqlite3.connect(path) as older:
        made_as = older.execute("SELECT sql FROM sqlite_master WHERE name = 'dead_letters'").fetchone()[0]
        older.execute("DROP TABLE dead_letters")
        older.execute(made_as.replace("AUTOINCREMENT", ""))
        assert [_dead_letter(older, name) for name in ("a", "b")] == [1, 2]
    reports = [json.loads(db_init(f"sqlite:///{path}").stdout)["rebuilt_tables"] for _ in range(2)]
    assert reports == [["dead_letters"], []]
    with sqlite3.connect(path) as rebuilt:
        assert rebuilt.execute("SELECT id, redis_message_id FROM dead_letters").fetchall() == [(1, "a"), (2, "b")]
        assert rebuilt.execute("SELECT name FROM sqlite_master WHERE tbl_name = 'dead_letters' AND type = 'index' "
                               "AND name LIKE 'idx_%'").fetchall() == [("idx_dead_letters_open_by_time",)]
        rebuilt.execute("DELETE FROM dead_letters WHERE id = 2")
        assert _dead_letter(rebuilt, "c") == 3


STATUS_TABLES = ("conversation_messages", "admin_debug_logs")
EARLIER_STATUSES = ", ".join(f"'{status}'" for status in TurnStatus if status is not TurnStatus.CANCELLED)
"""The status list of a release before `cancelled` was added."""


def _runs_in_every_status_table(connection: psycopg.Connection | sqlite3.Connection) -> None:
    """An assistant message (id 7) and a test run (id 5) that ended before the upgrade, and an attempt that refers
    to both, each with the rows it refers to."""
    for statement in ("INSERT INTO users (name, api_key_hash) VALUES ('u', 'h')",
                      "INSERT INTO llm_models (name, model, input_price_per_1k, output_price_per_1k) "
                      "VALUES ('m', 'm', 0, 0)",
                      "INSERT INTO agents (name, system_prompt, model_id) VALUES ('a', 'p', 1)",
                      "INSERT INTO conversations (user_id, agent_id) VALUES (1, 1)",
                      "INSERT INTO conversation_messages (id, conversation_id, seq, role, status) "
                      "VALUES (7, 1, 2, 'assistant', 'success')",
                      "INSERT INTO admin_debug_logs (id, agent_id, admin_id, status, input) "
                      "VALUES (5, 1, 1, 'error', 'x')",
                      "INSERT INTO model_attempts (message_id, debug_log_id, model_name, outcome, latency_ms) "
                      "VALUES (7, 5, 'm', 'ok', 1)"):
        connection.execute(statement)


def _cancel_both(connection: psycopg.Connection | sqlite3.Connection) -> None:
    connection.execute("UPDATE conversation_messages SET status = 'cancelled' WHERE id = 7")
    connection.execute("UPDATE admin_debug_logs SET status = 'cancelled' WHERE id = 5")


def test_db_init_gives_an_older_postgresql_database_the_statuses_of_this_release() -> None:
    """`CREATE TABLE IF NOT EXISTS` leaves a table of an earlier release with its status CHECK: every write of a
    status added since (a stop's `cancelled`) failed it, though a fresh database took it. `db init` replaces a
    CHECK whose list is not this release's, rows kept, and leaves one that is alone (the same constraint)."""
    name = scratch_database("agentq_schema")
    checks = ("SELECT conname, oid FROM pg_constraint WHERE conname IN "
              "('ck_conversation_messages_status_known', 'ck_admin_debug_logs_status_known') ORDER BY conname")
    try:
        with psycopg.connect(f"{PG}/{name}", autocommit=True) as conn:
            conn.execute((ROOT / "schema.sql").read_text())
            for table in STATUS_TABLES:
                conn.execute(f"ALTER TABLE {table} DROP CONSTRAINT ck_{table}_status_known, "
                             f"ADD CONSTRAINT ck_{table}_status_known CHECK (status IN ({EARLIER_STATUSES}))")
            _runs_in_every_status_table(conn)
            with pytest.raises(psycopg.errors.CheckViolation):
                _cancel_both(conn)
        db_init(f"{PG}/{name}")
        with psycopg.connect(f"{PG}/{name}", autocommit=True) as conn:
            _cancel_both(conn)
            assert conn.execute("SELECT id, status FROM conversation_messages UNION ALL "
                                "SELECT id, status FROM admin_debug_logs").fetchall() == [(7, "cancelled"),
                                                                                          (5, "cancelled")]
            upgraded = conn.execute(checks).fetchall()
        db_init(f"{PG}/{name}")
        with psycopg.connect(f"{PG}/{name}", autocommit=True) as conn:
            assert conn.execute(checks).fetchall() == upgraded and len(upgraded) == 2
    finally:
        drop_database(name)


def test_db_init_validates_the_statuses_an_operator_gave_a_large_table_beforehand() -> None:
    """An operator gives a large table this release's list without holding it while every row is checked (README):
    the CHECK added NOT VALID, in a moment, then validated under a lock that lets turns go on. `db init` finds the
    list its own, and validates one left NOT VALID rather than leave it so or replace it."""
    name = scratch_database("agentq_schema")
    check = ("SELECT oid, convalidated FROM pg_constraint WHERE conname = 'ck_conversation_messages_status_known'")
    try:
        with psycopg.connect(f"{PG}/{name}", autocommit=True) as conn:
            conn.execute((ROOT / "schema.sql").read_text())
            statuses = ", ".join(f"'{status}'" for status in TurnStatus)
            conn.execute("ALTER TABLE conversation_messages DROP CONSTRAINT ck_conversation_messages_status_known, "
                         "ADD CONSTRAINT ck_conversation_messages_status_known "
                         f"CHECK (status IN ({statuses})) NOT VALID")
            added, _ = conn.execute(check).fetchone() or (None, None)
        db_init(f"{PG}/{name}")
        with psycopg.connect(f"{PG}/{name}", autocommit=True) as conn:
            assert conn.execute(check).fetchone() == (added, True)
    finally:
        drop_database(name)


def test_db_init_rebuilds_an_older_sqlite_files_tables_for_the_statuses_of_this_release(tmp_path: Path) -> None:
    """SQLite cannot alter a CHECK: `db init` rebuilds, once, a table whose status CHECK an earlier release made
    with another list, its rows, ids and indexes kept, the rows of other tables that refer to it still doing so."""
    path = tmp_path / "older.sqlite3"
    db_init(f"sqlite:///{path}")
    with sqlite3.connect(path) as older:
        for table in STATUS_TABLES:
            made_as, = older.execute("SELECT sql FROM sqlite_master WHERE name = ?", (table,)).fetchone()
            indexes = [sql for sql, in older.execute("SELECT sql FROM sqlite_master WHERE type = 'index' "
                                                     "AND tbl_name = ? AND sql IS NOT NULL", (table,))]
            older.execute(f"DROP TABLE {table}")
            older.execute(made_as.replace(", 'cancelled'", ""))
            for index in indexes:
                older.execute(index)
        older.execute("PRAGMA foreign_keys = ON")
        _runs_in_every_status_table(older)
        with pytest.raises(sqlite3.IntegrityError, match="CHECK constraint failed"):
            _cancel_both(older)
    reports = [json.loads(db_init(f"sqlite:///{path}").stdout)["rebuilt_tables"] for _ in range(2)]
    assert sorted(reports[0]) == sorted(STATUS_TABLES) and reports[1] == []
    with sqlite3.connect(path) as rebuilt:
        _cancel_both(rebuilt)
        assert rebuilt.execute("SELECT id, status FROM conversation_messages UNION ALL "
                               "SELECT id, status FROM admin_debug_logs").fetchall() == [(7, "cancelled"),
                                                                                         (5, "cancelled")]
        assert rebuilt.execute("SELECT message_id, debug_log_id FROM model_attempts").fetchall() == [(7, 5)]
        assert rebuilt.execute("PRAGMA foreign_key_check").fetchall() == []
        kept = {name for name, in rebuilt.execute("SELECT name FROM sqlite_master WHERE type = 'index' AND "
                                                  "tbl_name IN ('conversation_messages', 'admin_debug_logs')")}
    assert {index.name for table in STATUS_TABLES for index in Base.metadata.tables[table].indexes} <= kept
