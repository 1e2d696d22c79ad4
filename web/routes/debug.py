"""Admin debugging: route test, prompt preview, execution test, debug logs and cost analysis."""

from __future__ import annotations

from typing import Any

from flask import Response
from flask_openapi3 import Tag

from app import debugging
from web import render
from web import responses as r
from web.auth import principal
from web.routes import api_blueprint
from web.schemas import ContentBody, DebugCostQuery, DebugLogQuery, IdPath, TriedTurnBody

bp = api_blueprint("debug", admin=True)
tag = Tag(name="admin: debugging")


@bp.post("/admin/agents/<id:id>/debug/route", tags=[tag], responses={200: r.RouteDecision})
def decide_route(path: IdPath, body: TriedTurnBody) -> dict[str, Any]:
    return render.route_decision(debugging.route_decision(path.id, body.content, body.conversation_id))


@bp.post("/admin/agents/<id:id>/debug/prompt", tags=[tag], responses={200: r.PromptPreview})
def prompt_preview(path: IdPath, body: TriedTurnBody) -> dict[str, Any]:
    return render.prompt_preview(debugging.preview_prompt(path.id, body.content, body.conversation_id))


@bp.post("/admin/agents/<id:id>/debug/execute", tags=[tag], responses={202: r.ExecutionStarted})
def start_execution(path: IdPath, body: ContentBody) -> tuple[dict[str, Any], int]:
    return {"debug_log_id": debugging.start_debug_run(principal(), path.id, body.content)}, 202


@bp.get("/admin/debug-logs/<id:id>", tags=[tag], responses={200: r.DebugLog})
def get_debug_log(path: IdPath) -> dict[str, Any]:
    return render.debug_log(debugging.get_debug_log(path.id))


@bp.get("/admin/debug-logs", tags=[tag], responses={200: r.DebugLogList})
def list_debug_logs(query: DebugLogQuery) -> dict[str, Any] | Response:
    """Newest first: every log, or with `limit` a page; pass `next_before_id` back as `before_id` for the next."""
    if query.limit is None:
        return render.streamed_items(render.debug_log(run) for run in debugging.every_debug_log(query.agent_id,
                                                                                              query.before_id))
    page = debugging.list_debug_logs(query.agent_id, query.limit, query.before_id)
    return {"items": [render.debug_log(run) for run in page.items], "next_before_id": page.next_before_id}


@bp.get("/admin/debug-costs", tags=[tag], responses={200: r.CostLines})
def debug_costs(query: DebugCostQuery) -> dict[str, Any]:
    return {"items": [render.debug_cost(c) for c in debugging.debug_costs(query.group_by)]}
