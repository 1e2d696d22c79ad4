"""Admin-managed catalog: upstream models with their prices, and agents built on them.

Both are deleted softly: conversations, messages and cost records keep pointing at what produced them.
"""

from __future__ import annotations

from decimal import Decimal
from typing import TypedDict, Unpack

from sqlalchemy import or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.db import rows_changed, transaction
from app.endpoint_urls import check_endpoint_url
from app.errors import Conflict, NotFound
from app.key_variables import check_key_variable
from app.models import Agent, LlmModel
from app.models.base import utc_now


class ModelFields(TypedDict, total=False):
    """What an admin sets on a model, each checked by the API's request models (`web.schemas`), the endpoint and
    the key's variable checked again here for every writer: every field a create needs, any of them on an update."""

    name: str
    model: str
    base_url: str | None
    api_key_env: str | None
    input_price_per_1k: Decimal
    output_price_per_1k: Decimal
    context_window: int | None


class AgentFields(TypedDict, total=False):
    """What an admin sets on an agent, as `ModelFields` is for a model."""

    name: str
    system_prompt: str
    model_id: int
    fallback_model_id: int | None
    timeout_seconds: int
    temperature: float | None
    max_tokens: int | None


def _live_model(session: Session, model_id: int, lock: bool | dict[str, bool] | None = None) -> LlmModel:
    """The model unless deleted; `lock` takes its row (`True` to delete it, `{"read": True}` to refer to it)
    so that a delete and an agent newly pointing at the model cannot both commit: each waits for the
    other and reads what it committed (a live agent was left on a deleted model, still serving turns)."""
    model = session.get(LlmModel, model_id, with_for_update=lock)
    if model is None or model.deleted_at is not None:
        raise NotFound("No such model.")
    return model


def live_agent(session: Session, agent_id: int, shared_lock: bool = False) -> Agent:
    """The agent, unless it does not exist or was deleted (404 either way: a deleted agent takes no new work).

    `shared_lock` reads its row shared-locked, for work recorded in the same transaction: a delete (an UPDATE
    of the row) then waits for that commit, and the work accepted before it finishes like any in flight at a
    delete; or the read waits for the delete's commit and is refused. Unlocked, an admin's test run could be
    accepted (202) after the delete had answered 204, and run on a model deleted after that."""
    agent = session.get(Agent, agent_id, with_for_update={"read": True} if shared_lock else None)
    if agent is None or agent.deleted_at is not None:
        raise NotFound("No such agent.")
    return agent


def _flush_unique_name(session: Session) -> None:
    """Only the live-name index becomes 409 name_taken; any other integrity error is a bug and stays one."""
    try:
        session.flush()
    except IntegrityError as exc:
        if "uq_llm_models_live_name" in str(exc.orig) or "llm_models.name" in str(exc.orig):
            raise Conflict("A model with this name already exists.", code="name_taken") from exc
        raise


def create_model(**fields: Unpack[ModelFields]) -> LlmModel:
    check_key_variable(fields.get("api_key_env"))
    check_endpoint_url(fields.get("base_url"))
    with transaction() as session:
        model = LlmModel(**fields)
        session.add(model)
        _flush_unique_name(session)
        session.refresh(model)
        return model


def list_models() -> list[LlmModel]:
    with transaction() as session:
        return list(session.scalars(select(LlmModel).where(LlmModel.deleted_at.is_(None)).order_by(LlmModel.id)))


def get_model(model_id: int) -> LlmModel:
    with transaction() as session:
        return _live_model(session, model_id)


def update_model(model_id: int, **changes: Unpack[ModelFields]) -> LlmModel:
    check_key_variable(changes.get("api_key_env"))
    check_endpoint_url(changes.get("base_url"))
    with transaction() as session:
        model = _live_model(session, model_id)
        for key, value in changes.items():
            setattr(model, key, value)
        _flush_unique_name(session)
        session.refresh(model)
        return model


def delete_model(model_id: int) -> None:
    """Refused while a live agent still uses the model, so no agent is left without one."""
    with transaction() as session:
        model = _live_model(session, model_id, lock=True)
        in_use = session.scalar(
            select(Agent.id).where(
                Agent.deleted_at.is_(None), or_(Agent.model_id == model_id, Agent.fallback_model_id == model_id)
            ).limit(1)
        )
        if in_use is not None:
            raise Conflict(f"Agent {in_use} still uses this model.", code="model_in_use")
        model.deleted_at = utc_now()


def _check_models(session: Session, fields: AgentFields) -> None:
    for key, model_id in (("model_id", fields.get("model_id")), ("fallback_model_id", fields.get("fallback_model_id"))):
        if model_id is None:
            continue
        try:
            _live_model(session, model_id, lock={"read": True})
        except NotFound:
            raise NotFound(f"{key} {model_id} does not name a model.") from None


def create_agent(**fields: Unpack[AgentFields]) -> Agent:
    with transaction() as session:
        _check_models(session, fields)
        agent = Agent(**fields)
        session.add(agent)
        session.flush()
        session.refresh(agent)
        return agent


def list_agents() -> list[Agent]:
    with transaction() as session:
        return list(session.scalars(select(Agent).where(Agent.deleted_at.is_(None)).order_by(Agent.id)))


def get_agent(agent_id: int) -> Agent:
    with transaction() as session:
        return live_agent(session, agent_id)


def update_agent(agent_id: int, **changes: Unpack[AgentFields]) -> Agent:
    with transaction() as session:
        agent = live_agent(session, agent_id)
        _check_models(session, changes)
        for key, value in changes.items():
            setattr(agent, key, value)
        session.flush()
        session.refresh(agent)
        return agent


def delete_agent(agent_id: int) -> None:
    """One guarded UPDATE: of two deletes at once, the second waits for the first's row and finds the agent
    deleted (404), as it would one after the other; both read it live and both answered 204."""
    with transaction() as session:
        deleted = rows_changed(session, update(Agent).where(Agent.id == agent_id, Agent.deleted_at.is_(None))
                               .values(deleted_at=utc_now()))
    if not deleted:
        raise NotFound("No such agent.")
