"""The tables of agentq, one module per concept; import from here."""

from typing import cast

from sqlalchemy import Table

from app.models.base import Base
from app.models.catalog import Agent, LlmModel
from app.models.conversations import Conversation, ConversationMessage, Turn
from app.models.dead_letters import DeadLetter
from app.models.debugging import DebugRun, ModelAttempt
from app.models.users import CreditTransaction, User


def table(entity: type[Base]) -> Table:
    """The Core table of a model. Hot statements are built on it: executing an ORM-enabled statement
    costs about twice as much CPU (the ORM's compile state and result set-up run every time)."""
    return cast(Table, entity.__table__)


__all__ = [
    "Agent",
    "Base",
    "Conversation",
    "ConversationMessage",
    "CreditTransaction",
    "DeadLetter",
    "DebugRun",
    "LlmModel",
    "ModelAttempt",
    "Turn",
    "User",
    "table",
]
