"""Response models: what each route answers, documented in /openapi.json.

`web.render` builds the bodies; these models describe them for clients (and their generated SDKs). They
forbid fields they do not name, and the test app validates every response it sends against them
(`create_app({"VALIDATE_RESPONSES": True})`), so a field rendered but not documented, or documented but
gone, fails the suite instead of the document going stale.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from app.turn_status import TurnStatus
from app.worker_presence import PRESENCE_SECONDS, PRESENCE_TTL_SECONDS, WorkerState
from web.schemas import ErrorResponse

Money = Annotated[str, Field(pattern=r"^-?[0-9]+\.[0-9]{6}$")]
"""A decimal string with six places, e.g. "12.340000"."""
Timestamp = Annotated[str, Field(json_schema_extra={"format": "date-time"})]
"""ISO 8601, UTC."""


class Shape(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Message(Shape):
    id: int
    conversation_id: int
    seq: int
    role: Literal["user", "assistant"]
    content: str
    status: TurnStatus
    error_message: str | None
    error_display: str | None
    model: str | None
    prompt_tokens: int | None
    completion_tokens: int | None
    total_tokens: int | None
    cost: Money | None
    latency_ms: int | None
    created_at: Timestamp
    updated_at: Timestamp


class AcceptedTurn(Shape):
    user_message: Message
    assistant_message: Message


class MessageList(Shape):
    items: list[Message]


class Conversation(Shape):
    id: int
    agent_id: int
    project_id: int | None
    title: str | None
    message_count: int
    total_tokens: int
    created_at: Timestamp
    updated_at: Timestamp


class ConversationPage(Shape):
    items: list[Conversation]
    next_cursor: str | None


class Me(Shape):
    id: int
    name: str
    is_admin: bool
    balance: Money
    available_balance: Money = Field(description="The balance less what turns in flight hold.")


class CreatedUser(Me):
    api_key: str = Field(description="Shown once; only its hash is stored.")


class Credited(Shape):
    balance: Money
    credited: Money = Field(description="The change made: less than the amount asked when a take-back stopped at "
                                        "zero or at what the user's turns in flight hold.")


class LedgerEntry(Shape):
    id: int
    message_id: int | None
    amount: Money
    balance_after: Money
    created_at: Timestamp


class Ledger(Shape):
    items: list[LedgerEntry]
    next_cursor: int | None = Field(None, description="Only with `limit`: pass it as `cursor` for the next page.")


class LlmModel(Shape):
    id: int
    name: str
    model: str
    base_url: str | None
    api_key_env: str | None
    input_price_per_1k: Money
    output_price_per_1k: Money
    context_window: int | None
    created_at: Timestamp
    updated_at: Timestamp


class LlmModelList(Shape):
    items: list[LlmModel]


class Agent(Shape):
    id: int
    name: str
    system_prompt: str
    model_id: int
    fallback_model_id: int | None
    timeout_seconds: int
    temperature: float | None
    max_tokens: int | None
    created_at: Timestamp
    updated_at: Timestamp


class AgentList(Shape):
    items: list[Agent]


class AgentChoice(Shape):
    id: int
    name: str


class AgentChoiceList(Shape):
    items: list[AgentChoice]


class RouteDecision(Shape):
    model: str
    fallback_model: str | None
    timeout_seconds: int
    moderation: Literal["pass", "violation"]
    moderation_reason: str | None
    estimated_prompt_tokens: int
    estimated_cost: Money


class PromptMessage(Shape):
    role: str
    content: str


class PromptPreview(Shape):
    messages: list[PromptMessage]
    estimated_prompt_tokens: int


class ExecutionStarted(Shape):
    debug_log_id: int


class DebugLog(Shape):
    id: int
    agent_id: int
    admin_id: int
    status: TurnStatus
    input: str
    output: str | None
    model: str | None
    prompt_tokens: int | None
    completion_tokens: int | None
    cost: Money | None
    latency_ms: int | None
    error_message: str | None
    created_at: Timestamp


class DebugLogList(Shape):
    items: list[DebugLog]
    next_before_id: int | None = Field(None, description="Only with `limit`: pass it as `before_id` for the next.")


class CostLine(Shape):
    key: int | None = Field(description="The agent's, model's or admin's id.")
    runs: int
    prompt_tokens: int
    completion_tokens: int
    cost: Money


class CostLines(Shape):
    items: list[CostLine]


class QueueDepth(Shape):
    name: str
    ready: int | None = Field(description="Null while Redis is out of reach.")
    delayed: int | None = Field(description="Null while Redis is out of reach.")
    dead_letters: int = Field(description="As the dead-letter listing lists them: counted from the database's "
                                          "rows while Redis is out of reach.")


class Queues(Shape):
    queues: list[QueueDepth]
    turns: dict[str, int] = Field(description="Turns pending and processing.")
    test_runs: dict[str, int] = Field(description="Admin test runs pending and processing (the `debug` queue's).")
    redis_error: str | None


class RecentFailure(Shape):
    message_id: int
    conversation_id: int
    status: TurnStatus
    error_message: str | None
    updated_at: Timestamp


class Failures(Shape):
    since: Timestamp
    counts: dict[str, int]
    items: list[RecentFailure]


class WaitingRetry(Shape):
    broker_message_id: str = Field(description="The broker's id of the waiting message (Dramatiq's, a string).")
    queue: str
    actor: str
    args: list[Any]
    run_id: int | None
    run_status: TurnStatus | None
    retries: int = Field(description="Retries so far, this one included.")
    error: str | None = Field(description="The last failure, from the traceback Dramatiq kept.")
    retry_at: Timestamp | None


class WaitingRetries(Shape):
    items: list[WaitingRetry]


class WorkerProcess(Shape):
    instance: str = Field(description="Random, made at the process's start (a pid repeats across hosts and over "
                                      "time); not an id, which the API's are integers.")
    host: str
    pid: int
    threads: int
    running: int = Field(description="Runs (turns and admin test runs) it holds now, each on one of its threads.")
    state: WorkerState = Field(
        description="`database_cut_off`: it takes no new run until its database answers its probe; `stopping`: "
                    "it takes no new run and finishes or hands back those it holds.")
    started_at: Timestamp
    seen_at: Timestamp = Field(description=f"When it last said so, by its host's clock: every {PRESENCE_SECONDS:g} s; "
                                           f"a process that died leaves the list {PRESENCE_TTL_SECONDS:g} s after its "
                                           "last.")


class WorkerProcesses(Shape):
    items: list[WorkerProcess]


class DeadLetter(Shape):
    id: int
    queue: str
    actor: str
    args: list[Any]
    retries: int
    error: str | None
    dead_at: Timestamp
    run_id: int | None
    run_status: TurnStatus | None
    in_broker: bool | None = Field(description="False when the broker no longer holds the message (Redis lost it); "
                                               "null while Redis is out of reach.")


class DeadLetterDetail(DeadLetter):
    traceback: str | None


class DeadLetterList(Shape):
    items: list[DeadLetter]
    next_cursor: str | None = Field(None, description="Only with `limit`: pass it as `cursor` for the next page.")


class Skipped(Shape):
    id: int
    reason: str


class RequeueOutcome(Shape):
    requeued: list[int]
    skipped: list[Skipped]


class Health(Shape):
    status: Literal["ok"]


class Ready(Shape):
    status: Literal["ready"]
    checks: dict[str, str] = Field(description='"ok", or "error: <reason>", for "database" and "redis".')


class NotReady(ErrorResponse):
    checks: dict[str, str]


NO_CONTENT = None
"""flask-openapi3's marker for a 204 without a body."""
