"""Operations for admins: queue depths and dead letters (see `app.dead_letters`)."""

from __future__ import annotations

from typing import Annotated, Any

from flask_openapi3 import Tag
from pydantic import Field

from app import dead_letters, operations
from web import render
from web.routes import api_blueprint
from web.schemas import CachedSchemaModel, IdPath

bp = api_blueprint("ops", admin=True)
tag = Tag(name="admin: operations")


class FailureQuery(CachedSchemaModel):
    hours: Annotated[float, Field(gt=0, le=24 * 365)] = 24
    limit: Annotated[int, Field(ge=1, le=200)] = 20


@bp.get("/admin/queues", tags=[tag])
def queues() -> dict[str, Any]:
    snapshot = operations.queue_snapshot()
    return {
        "queues": [{"name": q.name, "ready": q.ready, "delayed": q.delayed, "dead_letters": q.dead}
                   for q in snapshot.queues],
        "turns": snapshot.turns_by_status,
        "redis_error": snapshot.redis_error,
    }


@bp.get("/admin/failures", tags=[tag])
def failures(query: FailureQuery) -> dict[str, Any]:
    """Turns that ended in a failure status lately: counts by status and the latest ones (the /admin page)."""
    report = operations.recent_failures(query.hours, query.limit)
    return {
        "since": render.timestamp(report.since),
        "counts": report.counts,
        "items": [{"message_id": f.message_id, "conversation_id": f.conversation_id, "status": f.status,
                   "error_message": f.error_message, "updated_at": render.timestamp(f.updated_at)}
                  for f in report.latest],
    }


@bp.get("/admin/dead-letters", tags=[tag])
def list_dead_letters() -> dict[str, Any]:
    return {"items": [view.as_json() for view in dead_letters.list_dead_letters()]}


@bp.post("/admin/dead-letters/requeue-all", tags=[tag])
def requeue_all() -> tuple[dict[str, Any], int]:
    return dead_letters.requeue_all().as_json(), 202


@bp.get("/admin/dead-letters/<id:id>", tags=[tag])
def get_dead_letter(path: IdPath) -> dict[str, Any]:
    return dead_letters.get_dead_letter(path.id).as_json(detail=True)


@bp.post("/admin/dead-letters/<id:id>/requeue", tags=[tag])
def requeue(path: IdPath) -> tuple[dict[str, Any], int]:
    dead_letters.requeue(path.id)
    return {"requeued": [path.id], "skipped": []}, 202


@bp.delete("/admin/dead-letters/<id:id>", tags=[tag])
def purge(path: IdPath) -> tuple[str, int]:
    dead_letters.purge(path.id)
    return "", 204
