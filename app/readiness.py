"""Is this process able to serve: can it reach the database and Redis right now?"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import text

from app.db import get_engine
from app.redis_client import get_redis


@dataclass(frozen=True, slots=True)
class Readiness:
    checks: dict[str, str]

    @property
    def ready(self) -> bool:
        return all(v == "ok" for v in self.checks.values())

    @property
    def summary(self) -> str:
        failing = [k for k, v in self.checks.items() if v != "ok"]
        return f"Not ready: {', '.join(failing)} unreachable." if failing else "Ready."


def check() -> Readiness:
    checks: dict[str, str] = {}
    try:
        with get_engine().connect() as connection:
            connection.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except Exception as exc:
        checks["database"] = f"error: {type(exc).__name__}"
    try:
        get_redis().ping()
        checks["redis"] = "ok"
    except Exception as exc:
        checks["redis"] = f"error: {type(exc).__name__}"
    return Readiness(checks)
