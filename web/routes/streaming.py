"""Watching an answer as it is produced, and stopping it."""

from __future__ import annotations

from typing import Any

from flask import Response, request, stream_with_context
from flask_openapi3 import Tag

from app import answer_stream, cancellation
from web import render
from web import responses as r
from web.auth import bearer_token, principal
from web.routes import api_blueprint
from web.schemas import MessagePath
from web.sse import ClientConnection, sse

bp = api_blueprint("streaming")
tag = Tag(name="streaming")


@bp.get("/messages/<id:message_id>/stream", tags=[tag],
        responses={200: {"description": "delta, status and done events",
                         "content": {"text/event-stream": {"schema": {"type": "string"}}}}})
def stream_answer(path: MessagePath) -> Response:
    connection = ClientConnection.of(request.environ)
    opened = answer_stream.open_answer_stream(principal().id, bearer_token() or "", path.message_id,
                                              request.headers.get("Last-Event-ID"),
                                              connection.closed_look() if connection is not None else None)
    body = stream_with_context(sse(opened.events, render.wants_chinese(), connection))
    response = Response(body, mimetype="text/event-stream",
                        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    response.call_on_close(opened.free_slot)
    return response


@bp.post("/messages/<id:message_id>/cancel", tags=[tag], responses={202: r.Message})
def cancel(path: MessagePath) -> tuple[dict[str, Any], int]:
    return render.message(cancellation.cancel_turn(principal(), path.message_id), render.wants_chinese()), 202
