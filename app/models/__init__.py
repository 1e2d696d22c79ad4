"""The tables of agentq, one module per concept; import from here."""

from app.models.base import Base
from app.models.catalog import Agent, LlmModel
from app.models.conversations import Conversation, ConversationMessage, Turn
from app.models.dead_letters import DeadLetter
from app.models.debugging import DebugRun, ModelAttempt
from app.models.users import CreditTransaction, User

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
]
