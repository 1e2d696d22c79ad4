"""Recording every upstream attempt (and counting it in the metrics) in the transaction that settles a run."""

from __future__ import annotations

from collections.abc import Iterable
from functools import cache

from sqlalchemy import bindparam, insert

from app import metrics
from app.fallback import AttemptRecord
from app.models import ModelAttempt, table
from app.models.base import utc_now
from app.prepared import Batch, Prepared, Unit

_COLUMNS = ("message_id", "debug_log_id", "model_name", "outcome", "error", "latency_ms", "first_token_ms",
            "prompt_tokens", "completion_tokens", "cost", "created_at")


@cache
def _insert() -> Prepared:
    return Prepared(insert(table(ModelAttempt)).values({name: bindparam(name) for name in _COLUMNS}))


def record_attempts(
    unit: Unit | Batch, attempts: Iterable[AttemptRecord], *, message_id: int | None = None,
    debug_log_id: int | None = None,
) -> None:
    attempts = list(attempts)
    if not attempts:
        return
    now = utc_now()
    _insert()(unit, [
        {"message_id": message_id, "debug_log_id": debug_log_id, "model_name": a.model_name, "outcome": a.outcome,
         "error": a.error, "latency_ms": a.latency_ms, "first_token_ms": a.first_token_ms,
         "prompt_tokens": a.prompt_tokens, "completion_tokens": a.completion_tokens, "cost": a.cost,
         "created_at": now}
        for a in attempts
    ])
    metrics.observe_attempts(attempts)
