"""Which environment variables a model's `api_key_env` may name, and so which secrets an admin can send.

A model's key is read, on the workers, from the variable its `api_key_env` names, and sent to its
`base_url`, which an admin chooses: any variable would let an admin key read `DATABASE_URL` or a cloud
credential by pointing a model at a server of their own. The operator says which variables hold model
keys (`AGENTQ_MODEL_KEY_VARIABLES`, shell-style patterns, `*_API_KEY` by default); agentq's own settings
are never among them. The API refuses another name (422), and a worker refuses a row that names one
(written before the setting was narrowed) as an endpoint that cannot be called as configured.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from fnmatch import fnmatchcase

from sqlalchemy import Connection, select

from app.config import get_settings
from app.db import get_engine
from app.errors import ValidationFailed
from app.models import LlmModel

log = logging.getLogger(__name__)

OWN_VARIABLES = ("DATABASE_URL", "REDIS_URL", "PROMETHEUS_MULTIPROC_DIR")
"""agentq's settings outside the `AGENTQ_` prefix."""


def refusal(name: str | None) -> str | None:
    """Why a model may not read its key from the variable `name`, or None when it may (or names none)."""
    if name is None:
        return None
    if name.startswith("AGENTQ_") or name in OWN_VARIABLES:
        return (f"the variable {name} is one of agentq's own settings, which no model's key may be read from "
                "whatever AGENTQ_MODEL_KEY_VARIABLES allows")
    settings = get_settings()
    if any(fnmatchcase(name, pattern) for pattern in settings.model_key_variable_patterns):
        return None
    return (f"the variable {name} is not one a model's key may be read from (AGENTQ_MODEL_KEY_VARIABLES: "
            f"{settings.model_key_variables})")


def key_in(name: str) -> str | None:
    """The key the variable `name` holds in this process's environment; an empty one holds none."""
    return os.environ.get(name) or None


def check_key_variable(name: str | None) -> None:
    """422 for a model whose `api_key_env` names a variable that may not hold its key."""
    if (refused := refusal(name)) is not None:
        raise ValidationFailed(f"api_key_env: {refused}.")


@dataclass(frozen=True, slots=True)
class KeyVariableOfModel:
    id: int
    name: str
    api_key_env: str


def models_refused_now(connection: Connection) -> list[KeyVariableOfModel]:
    """Live models whose variable this process's patterns refuse: written before the bound, or before the
    operator narrowed it, their turns fail `endpoint_unusable` until the setting names the variable or the
    model names another. `agentq db init` says so at the upgrade, before a user finds out; its process must
    have the workers' `AGENTQ_MODEL_KEY_VARIABLES` for the list to be theirs."""
    return [model for model in _live_key_variables(connection) if refusal(model.api_key_env) is not None]


def warn_of_key_variables_unset_here() -> None:
    """Said by a worker group as it starts: the live models whose key variable its environment lacks, whose
    turns would each end `endpoint_unusable` at their call. The API cannot say it as a model is written: its
    environment is not the workers'. A database out of reach says nothing here (the workers ride it out)."""
    engine = get_engine()
    try:
        with engine.connect() as connection:
            models = _live_key_variables(connection)
    except Exception:
        log.debug("the models' key variables could not be read at the start", exc_info=True)
        return
    finally:  # the group's parent serves nothing: no connection of its own to keep open
        engine.dispose()
    for model in models:
        if refusal(model.api_key_env) is None and key_in(model.api_key_env) is None:
            log.warning("model %s (%s) reads its API key from %s, which is not set in this worker's environment: "
                        "its turns end endpoint_unusable until it is set and the workers restarted",
                        model.id, model.name, model.api_key_env)


def _live_key_variables(connection: Connection) -> list[KeyVariableOfModel]:
    rows = connection.execute(select(LlmModel.id, LlmModel.name, LlmModel.api_key_env)
                              .where(LlmModel.deleted_at.is_(None), LlmModel.api_key_env.is_not(None))
                              .order_by(LlmModel.id)).all()
    return [KeyVariableOfModel(row.id, row.name, row.api_key_env) for row in rows]
