"""Admin CRUD: users and their credit, upstream models, agents."""

from __future__ import annotations

from typing import Any

from flask import Response
from flask_openapi3 import Tag

from app import catalog, users
from web import render
from web import responses as r
from web.routes import api_blueprint
from web.schemas import AgentBody, AgentPatch, CreateUserBody, CreditBody, IdPath, ModelBody, ModelPatch

bp = api_blueprint("admin", admin=True)
users_tag, models_tag, agents_tag = Tag(name="admin: users"), Tag(name="admin: models"), Tag(name="admin: agents")


@bp.post("/admin/users", tags=[users_tag], responses={201: r.CreatedUser})
def create_user(body: CreateUserBody) -> tuple[dict[str, Any], int]:
    created = users.create_user(body.name, is_admin=body.is_admin, balance=body.balance)
    return render.new_user(created), 201


@bp.post("/admin/users/<id:id>/api-key", tags=[users_tag], responses={200: r.CreatedUser})
def replace_api_key(path: IdPath) -> dict[str, Any]:
    """A new API key for the user, shown once; the old one stops working (within 10 s everywhere)."""
    replaced = users.replace_api_key(path.id)
    return render.new_user(replaced)


@bp.post("/admin/users/<id:id>/credits", tags=[users_tag], responses={200: r.Credited})
def add_credit(path: IdPath, body: CreditBody) -> dict[str, Any]:
    """Add credit, or take it back with a negative amount

    A take-back stops at zero, and above it at what the user's turns in flight hold (their reservations);
    `credited` is the change made.
    """
    return render.credited(users.add_credit(path.id, body.amount))


@bp.post("/admin/models", tags=[models_tag], responses={201: r.LlmModel})
def create_model(body: ModelBody) -> tuple[dict[str, Any], int]:
    return render.llm_model(catalog.create_model(**body.model_dump())), 201


@bp.get("/admin/models", tags=[models_tag], responses={200: r.LlmModelList})
def list_models() -> dict[str, Any]:
    return {"items": [render.llm_model(m) for m in catalog.list_models()]}


@bp.get("/admin/models/<id:id>", tags=[models_tag], responses={200: r.LlmModel})
def get_model(path: IdPath) -> dict[str, Any]:
    return render.llm_model(catalog.get_model(path.id))


@bp.patch("/admin/models/<id:id>", tags=[models_tag], responses={200: r.LlmModel})
def update_model(path: IdPath, body: ModelPatch) -> dict[str, Any]:
    return render.llm_model(catalog.update_model(path.id, **body.model_dump(exclude_unset=True)))


@bp.delete("/admin/models/<id:id>", tags=[models_tag], responses={204: r.NO_CONTENT})
def delete_model(path: IdPath) -> Response:
    catalog.delete_model(path.id)
    return render.no_content()


@bp.post("/admin/agents", tags=[agents_tag], responses={201: r.Agent})
def create_agent(body: AgentBody) -> tuple[dict[str, Any], int]:
    return render.agent(catalog.create_agent(**body.model_dump())), 201


@bp.get("/admin/agents", tags=[agents_tag], responses={200: r.AgentList})
def list_agents() -> dict[str, Any]:
    return {"items": [render.agent(a) for a in catalog.list_agents()]}


@bp.get("/admin/agents/<id:id>", tags=[agents_tag], responses={200: r.Agent})
def get_agent(path: IdPath) -> dict[str, Any]:
    return render.agent(catalog.get_agent(path.id))


@bp.patch("/admin/agents/<id:id>", tags=[agents_tag], responses={200: r.Agent})
def update_agent(path: IdPath, body: AgentPatch) -> dict[str, Any]:
    return render.agent(catalog.update_agent(path.id, **body.model_dump(exclude_unset=True)))


@bp.delete("/admin/agents/<id:id>", tags=[agents_tag], responses={204: r.NO_CONTENT})
def delete_agent(path: IdPath) -> Response:
    catalog.delete_agent(path.id)
    return render.no_content()
