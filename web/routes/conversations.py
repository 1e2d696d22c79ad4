"""Conversations and their messages: create, list, read, delete, and send a message (a turn)."""

from __future__ import annotations

from typing import Any

from flask import Response
from flask_openapi3 import Tag

from app import cancellation, conversations, turn_intake
from web import render
from web import responses as r
from web.auth import principal
from web.routes import api_blueprint
from web.schemas import ContentBody, ConversationBody, ConversationPath, IdempotencyHeader, MessagePath, PageQuery

bp = api_blueprint("conversations")
tag = Tag(name="conversations")


@bp.post("/conversations", tags=[tag], responses={200: r.Conversation, 201: r.Conversation})
def create_conversation(body: ConversationBody) -> tuple[dict[str, Any], int]:
    result = conversations.create_conversation(principal(), body.agent_id, body.project_id, body.title)
    return render.conversation(result.conversation), 201 if result.created else 200


@bp.get("/conversations", tags=[tag], responses={200: r.ConversationPage})
def list_conversations(query: PageQuery) -> dict[str, Any]:
    page = conversations.list_conversations(principal(), query.limit, query.cursor)
    return {"items": [render.conversation(c) for c in page.items], "next_cursor": page.next_cursor}


@bp.get("/conversations/<id:conversation_id>", tags=[tag], responses={200: r.Conversation})
def get_conversation(path: ConversationPath) -> dict[str, Any]:
    return render.conversation(conversations.get_conversation(principal(), path.conversation_id))


@bp.delete("/conversations/<id:conversation_id>", tags=[tag], responses={204: r.NO_CONTENT})
def delete_conversation(path: ConversationPath) -> Response:
    cancellation.delete_conversation(principal(), path.conversation_id)
    return render.no_content()


@bp.post("/conversations/<id:conversation_id>/messages", tags=[tag], responses={202: r.AcceptedTurn})
def send_message(path: ConversationPath, body: ContentBody, header: IdempotencyHeader) -> tuple[dict[str, Any], int]:
    accepted = turn_intake.submit_turn(principal(), path.conversation_id, body.content, header.idempotency_key)
    chinese = render.wants_chinese()
    return {"user_message": render.message(accepted.user_message, chinese),
            "assistant_message": render.message(accepted.assistant_message, chinese)}, 202


@bp.get("/conversations/<id:conversation_id>/messages", tags=[tag], responses={200: r.MessageList})
def list_messages(path: ConversationPath) -> Response:
    chinese = render.wants_chinese()
    messages = conversations.list_messages(principal(), path.conversation_id)
    return render.streamed_items(render.message(m, chinese) for m in messages)


@bp.get("/messages/<id:message_id>", tags=[tag], responses={200: r.Message})
def get_message(path: MessagePath) -> dict[str, Any]:
    return render.message(conversations.get_message(principal(), path.message_id), render.wants_chinese())
