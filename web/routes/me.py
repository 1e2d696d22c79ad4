"""The caller's own account, its ledger, and the agents they may chat with."""

from __future__ import annotations

from typing import Any

from flask import Response
from flask_openapi3 import Tag

from app import catalog, users
from web import render
from web import responses as r
from web.auth import principal
from web.routes import api_blueprint
from web.schemas import LedgerQuery

bp = api_blueprint("me")
tag = Tag(name="account")


@bp.get("/me", tags=[tag], responses={200: r.Me})
def get_me() -> dict[str, Any]:
    return render.me(users.get_user(principal().id))


@bp.get("/me/transactions", tags=[tag], responses={200: r.Ledger})
def get_transactions(query: LedgerQuery) -> dict[str, Any] | Response:
    """Newest first: the whole ledger, or with `limit` a page; pass `next_cursor` back as `cursor` for the next."""
    if query.limit is None:
        return render.streamed_items(render.credit_transaction(t) for t in users.every_transaction(principal().id,
                                                                                            query.cursor))
    page = users.list_transactions(principal().id, query.limit, query.cursor)
    return {"items": [render.credit_transaction(t) for t in page.items], "next_cursor": page.next_cursor}


@bp.get("/agents", tags=[tag], responses={200: r.AgentChoiceList})
def list_chat_agents() -> dict[str, Any]:
    return {"items": [render.agent_choice(a) for a in catalog.list_agents()]}
