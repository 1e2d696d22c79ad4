"""`app.prepared`: statements run on psycopg's cursor behave as SQLAlchemy would run them, or are refused."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from decimal import Decimal
from typing import Any

import pytest
from sqlalchemy import JSON, BigInteger, Column, DateTime, MetaData, String, Table, bindparam, insert, select, update
from sqlalchemy.exc import IntegrityError

from app.db import get_engine, plain_transaction, transaction
from app.models import ConversationMessage, Turn, User, table
from app.models.base import utc_now
from app.prepared import Batch, NotPreparable, Prepared

metadata = MetaData()
probe = Table(
    "prepared_probe", metadata,
    Column("id", BigInteger, primary_key=True, autoincrement=False),
    Column("kind", String(20), nullable=False),
    Column("note", String(100)),
    Column("touched_at", DateTime(timezone=True), nullable=False, default=utc_now, onupdate=utc_now),
)


@pytest.fixture
def probe_table(database: str) -> Iterator[None]:
    metadata.create_all(get_engine())
    yield
    metadata.drop_all(get_engine())


def test_fixed_values_and_python_defaults_are_filled_in(probe_table: None) -> None:
    add = Prepared(insert(probe).values(id=bindparam("id"), kind="fixed"))
    rename = Prepared(update(probe).where(probe.c.id == bindparam("id")).values(note=bindparam("note"))
                      .returning(probe.c.note, probe.c.touched_at))
    with transaction() as session:
        assert add(session, {"id": 1}).rowcount == 1
        first = session.execute(select(probe.c.kind, probe.c.touched_at)).one()
        changed = rename(session, {"id": 1, "note": "hello"})
        assert changed.rowcount == 1
        row = changed.one()
    assert first.kind == "fixed"
    assert isinstance(first.touched_at, datetime) and first.touched_at.tzinfo is not None
    assert row.note == "hello" and row.touched_at > first.touched_at  # written again by the update


def test_a_sequence_of_parameters_runs_the_statement_once_for_each(probe_table: None) -> None:
    add = Prepared(insert(probe).values(id=bindparam("id"), kind=bindparam("kind")))
    with transaction() as session:
        add(session, [{"id": i, "kind": f"k{i}"} for i in range(1, 4)])
        kinds = session.execute(select(probe.c.kind).order_by(probe.c.id)).scalars().all()
    assert kinds == ["k1", "k2", "k3"]


def test_driver_errors_are_sqlalchemy_errors_and_roll_back(probe_table: None) -> None:
    add = Prepared(insert(probe).values(id=bindparam("id"), kind="x"))
    with transaction() as session:
        add(session, {"id": 7})
    with pytest.raises(IntegrityError), transaction() as session:
        add(session, {"id": 8})
        add(session, {"id": 7})
    with transaction() as session:
        assert session.execute(select(probe.c.id)).scalars().all() == [7]


def test_a_plain_connection_runs_statements_and_batches_in_its_transaction(probe_table: None) -> None:
    """The hot paths run on `plain_transaction` (no ORM session): the same statements, the same rollback."""
    add = Prepared(insert(probe).values(id=bindparam("id"), kind=bindparam("kind")))
    rename = Prepared(update(probe).where(probe.c.id == bindparam("id")).values(note=bindparam("note")))
    with plain_transaction() as connection:
        add(connection, {"id": 1, "kind": "plain"})
        with Batch(connection) as batch:
            added = add(batch, {"id": 2, "kind": "batched"})
            renamed = rename(batch, {"id": 1, "note": "in the batch"})
    assert (added.rowcount, renamed.rowcount) == (1, 1)
    with pytest.raises(IntegrityError), plain_transaction() as connection, Batch(connection) as batch:
        add(batch, {"id": 3, "kind": "rolled back"})
        add(batch, {"id": 2, "kind": "duplicate"})
    with transaction() as session:
        rows = session.execute(select(probe.c.id, probe.c.kind, probe.c.note).order_by(probe.c.id)).all()
    assert [tuple(r) for r in rows] == [(1, "plain", "in the batch"), (2, "batched", None)]


@pytest.mark.parametrize("statement", [
    select(probe.c.id).where(probe.c.id.in_(bindparam("ids", expanding=True))),
    select(probe.c.id).where(probe.c.kind.in_(["a", "b"])),
    select(bindparam("blob", type_=JSON)),
], ids=["expanding bind", "literal IN list", "json bind"])
def test_statements_that_need_sqlalchemy_at_run_time_are_refused(probe_table: None, statement: Any) -> None:
    with pytest.raises(NotPreparable), transaction() as session:
        Prepared(statement)(session, {"ids": [1], "blob": {}})


def test_rows_read_on_the_driver_equal_rows_read_through_sqlalchemy(world: Any) -> None:
    """Every column type a hot statement returns: ids, text, Decimal money, aware datetimes, booleans, NULLs."""
    model_id = world.model()
    agent_id = world.agent(model_id)
    user_id, key = world.user(balance="12.345678")
    conversation_id = world.conversation(key, agent_id)
    assistant_id = world.send(key, conversation_id, "hello").json["assistant_message"]["id"]
    turns, messages, users = table(Turn), table(ConversationMessage), table(User)
    statement = (select(turns, messages.c.status, messages.c.cost, messages.c.created_at, users.c.balance,
                        users.c.is_admin)
                 .join_from(turns, messages, messages.c.id == turns.c.assistant_message_id)
                 .join(users, users.c.id == turns.c.user_id)
                 .where(turns.c.assistant_message_id == bindparam("turn")))
    with transaction() as session:
        # One snapshot for both reads: a worker may claim the turn between them.
        session.connection(execution_options={"isolation_level": "REPEATABLE READ"})
        by_driver = Prepared(statement)(session, {"turn": assistant_id}).one()
        by_sqlalchemy = session.execute(statement, {"turn": assistant_id}).one()
    assert tuple(by_driver) == tuple(by_sqlalchemy)
    assert by_driver._fields == tuple(by_sqlalchemy._fields)
    # The session's worker may have settled the turn before the snapshot: the balance is then less its cost.
    assert by_driver.balance == Decimal("12.345678") - (by_driver.cost or 0) and by_driver.user_id == user_id
