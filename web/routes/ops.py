"""Operations for admins: queue depths, runs waiting for a retry (`app.waiting_retries`), the worker processes
alive (`app.worker_presence`) and dead letters (`app.dead_letters`)."""

from __future__ import annotations

from typing import Any

from flask import Response
from flask_openapi3 import Tag

from app import dead_letter_requeue, dead_letters, operations, waiting_retries, worker_presence
from web import render
from web import responses as r
from web.routes import api_blueprint
from web.schemas import DeadLetterQuery, FailureQuery, IdPath

bp = api_blueprint("ops", admin=True)
tag = Tag(name="admin: operations")


@bp.get("/admin/queues", tags=[tag], responses={200: r.Queues})
def queues() -> dict[str, Any]:
    return render.queues(operations.queue_snapshot())


@bp.get("/admin/failures", tags=[tag], responses={200: r.Failures})
def failures(query: FailureQuery) -> dict[str, Any]:
    """Turns that ended in a failure status lately: counts by status and the latest ones (the /admin page)."""
    return render.failures(operations.recent_failures(query.hours, query.limit))


@bp.get("/admin/retries", tags=[tag], responses={200: r.WaitingRetries})
def list_waiting_retries() -> dict[str, Any]:
    """Runs whose delivery failed and that wait for Dramatiq's retry, the soonest first."""
    return render.waiting_retries(waiting_retries.soonest_first())


@bp.get("/admin/workers", tags=[tag], responses={200: r.WorkerProcesses})
def list_workers() -> dict[str, Any]:
    """The worker processes alive now, by host and pid: what each holds and whether it takes new runs."""
    return render.worker_processes(worker_presence.live_workers())


@bp.get("/admin/dead-letters", tags=[tag], responses={200: r.DeadLetterList})
def list_dead_letters(query: DeadLetterQuery) -> dict[str, Any] | Response:
    """Newest first: every open dead letter (after `cursor`), or with `limit` a page and its `next_cursor`."""
    if query.limit is None:
        return render.streamed_items(render.dead_letter(view)
                                     for view in dead_letters.every_dead_letter(query.cursor))
    return render.dead_letter_page(dead_letters.list_dead_letters(query.limit, query.cursor))


@bp.post("/admin/dead-letters/requeue-all", tags=[tag], responses={202: r.RequeueOutcome})
def requeue_all() -> tuple[dict[str, Any], int]:
    return render.requeue_outcome(dead_letter_requeue.requeue_all()), 202


@bp.get("/admin/dead-letters/<id:id>", tags=[tag], responses={200: r.DeadLetterDetail})
def get_dead_letter(path: IdPath) -> dict[str, Any]:
    return render.dead_letter(dead_letters.get_dead_letter(path.id), detail=True)


@bp.post("/admin/dead-letters/<id:id>/requeue", tags=[tag], responses={202: r.RequeueOutcome})
def requeue(path: IdPath) -> tuple[dict[str, Any], int]:
    return render.requeue_outcome(dead_letter_requeue.requeue(path.id)), 202


@bp.delete("/admin/dead-letters/<id:id>", tags=[tag], responses={204: r.NO_CONTENT})
def purge(path: IdPath) -> Response:
    dead_letters.purge(path.id)
    return render.no_content()
