"""Creating or upgrading the schema: `schema.sql` on PostgreSQL, the models on SQLite.

Every statement of `schema.sql` is idempotent, so `agentq db init` is safe to run twice and from
several machines at once (an advisory lock serialises them).
"""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import text

from app.db import get_engine
from app.models import Base

SCHEMA_FILE = Path(__file__).resolve().parent.parent / "schema.sql"
_LOCK_ID = 0x61676E74


def init_schema() -> str:
    engine = get_engine()
    if engine.dialect.name == "postgresql":
        sql = SCHEMA_FILE.read_text()
        with engine.begin() as connection:
            connection.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": _LOCK_ID})
            connection.exec_driver_sql(sql)
        return f"applied {SCHEMA_FILE.name} to {engine.url.render_as_string(hide_password=True)}"
    Base.metadata.create_all(engine)
    return f"created tables in {engine.url.render_as_string(hide_password=True)}"
