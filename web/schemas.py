"""Request models: what each route accepts, validated by flask-openapi3 and documented in /openapi.json."""

from __future__ import annotations

import copy
from collections.abc import Callable
from decimal import Decimal
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    Strict,
    StringConstraints,
    field_validator,
    model_validator,
)

from app import endpoint_urls
from app.models.base import LARGEST_ID, LONG_TEXT_CHARS, SHORT_TEXT_CHARS
from app.models.catalog import (
    DEFAULT_TIMEOUT_SECONDS,
    MAX_TOKENS_RANGE,
    SYSTEM_PROMPT_MAX_CHARS,
    TEMPERATURE_RANGE,
    TIMEOUT_SECONDS_RANGE,
)
from app.money import written_plainly
from app.paging import LARGEST_CONVERSATION_PAGE, LARGEST_LOG_PAGE, LARGEST_PAGE
from app.text import not_one_line, unstorable


def _refused_by(problem_of: Callable[[str], str | None]) -> AfterValidator:
    """A validator of text that one of `app.text`'s rules refuses, in that rule's words (the rule owns them: the
    command line says them too)."""

    def check(text: str) -> str:
        if (problem := problem_of(text)) is not None:
            raise ValueError(problem)
        return text

    return AfterValidator(check)


def _not_blank(text: str) -> str:
    if not text.strip():
        raise ValueError("must not be blank")
    return text


def _plain_amount(value: Any) -> Any:
    """Money given as text must be plain digits (`app.money.written_plainly`); a JSON number is read as one."""
    return written_plainly(value) if isinstance(value, str) else value


STORABLE = _refused_by(unstorable)
"""Storable text (`app.text.unstorable`); each text type below puts its bounds before this check, so that they
count characters of the text as given (after it, pydantic counts "items after validation" in its message)."""

Text = Annotated[str, Strict(), STORABLE]
Ident = Annotated[int, Strict(), Field(ge=1, le=LARGEST_ID)]
Name = Annotated[str, Strict(), StringConstraints(min_length=1, max_length=SHORT_TEXT_CHARS), STORABLE,
                 AfterValidator(_not_blank), _refused_by(not_one_line)]
Price = Annotated[Decimal, BeforeValidator(_plain_amount), Field(ge=0, max_digits=18, decimal_places=6)]
Amount = Annotated[Decimal, BeforeValidator(_plain_amount), Field(max_digits=18, decimal_places=6)]


class CachedSchemaModel(BaseModel):
    """flask-openapi3 asks query and header models for their JSON schema on every request; cache it."""

    @classmethod
    def model_json_schema(cls, *args: Any, **kwargs: Any) -> dict[str, Any]:
        cache: dict[Any, dict[str, Any]] | None = cls.__dict__.get("_schema_cache")
        if cache is None:
            cache = {}
            type.__setattr__(cls, "_schema_cache", cache)
        key = (args, tuple(sorted(kwargs.items())))
        if key not in cache:
            cache[key] = super().model_json_schema(*args, **kwargs)
        return copy.deepcopy(cache[key])


class Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class CreateUserBody(Body):
    name: Name
    is_admin: Annotated[bool, Strict()] = False
    balance: Price = Decimal(0)


class CreditBody(Body):
    amount: Amount


def _http_url(value: str | None) -> str | None:
    """A field validator's face of `app.endpoint_urls`: its refusal becomes the field's 422."""
    if value is not None and (refused := endpoint_urls.refusal(value)) is not None:
        raise ValueError(refused)
    return value


Url = Annotated[str, Strict(), StringConstraints(max_length=LONG_TEXT_CHARS), STORABLE]
ContextWindow = Annotated[int, Strict(), Field(ge=1, le=100_000_000)]
EnvName = Annotated[str, Strict(), StringConstraints(max_length=SHORT_TEXT_CHARS, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$"),
                    STORABLE]


def _refuse_nulls(body: BaseModel, required: tuple[str, ...]) -> None:
    """A PATCH may leave a field out, but may not set one the resource cannot do without to null."""
    nulled = [name for name in required if name in body.model_fields_set and getattr(body, name) is None]
    if nulled:
        raise ValueError(f"{', '.join(nulled)} cannot be null")


class ModelBody(Body):
    name: Name
    model: Name
    base_url: Url | None = None
    api_key_env: EnvName | None = None
    input_price_per_1k: Price
    output_price_per_1k: Price
    context_window: ContextWindow | None = None

    _url = field_validator("base_url")(_http_url)


class ModelPatch(Body):
    name: Name | None = None
    model: Name | None = None
    base_url: Url | None = None
    api_key_env: EnvName | None = None
    input_price_per_1k: Price | None = None
    output_price_per_1k: Price | None = None
    context_window: ContextWindow | None = None

    _url = field_validator("base_url")(_http_url)

    @model_validator(mode="after")
    def _required_stay(self) -> ModelPatch:
        _refuse_nulls(self, ("name", "model", "input_price_per_1k", "output_price_per_1k"))
        return self


Timeout = Annotated[int, Strict(), Field(ge=TIMEOUT_SECONDS_RANGE[0], le=TIMEOUT_SECONDS_RANGE[1])]


def _json_fraction_as_float(value: Any) -> Any:
    """A JSON number with a fraction arrives as a Decimal (`web.bodies.SafeJSONProvider`)."""
    return float(value) if isinstance(value, Decimal) else value


Temperature = Annotated[float, BeforeValidator(_json_fraction_as_float), Strict(),
                        Field(ge=TEMPERATURE_RANGE[0], le=TEMPERATURE_RANGE[1], allow_inf_nan=False)]
Prompt = Annotated[str, Strict(), StringConstraints(max_length=SYSTEM_PROMPT_MAX_CHARS), STORABLE]
MaxTokens = Annotated[int, Strict(), Field(ge=MAX_TOKENS_RANGE[0], le=MAX_TOKENS_RANGE[1])]


class AgentBody(Body):
    name: Name
    system_prompt: Prompt
    model_id: Ident
    fallback_model_id: Ident | None = None
    timeout_seconds: Timeout = DEFAULT_TIMEOUT_SECONDS
    temperature: Temperature | None = None
    max_tokens: MaxTokens | None = None


class AgentPatch(Body):
    name: Name | None = None
    system_prompt: Prompt | None = None
    model_id: Ident | None = None
    fallback_model_id: Ident | None = None
    timeout_seconds: Timeout | None = None
    temperature: Temperature | None = None
    max_tokens: MaxTokens | None = None

    @model_validator(mode="after")
    def _required_stay(self) -> AgentPatch:
        _refuse_nulls(self, ("name", "system_prompt", "model_id", "timeout_seconds"))
        return self


Title = Annotated[str, Strict(), StringConstraints(max_length=LONG_TEXT_CHARS), STORABLE]


class ConversationBody(Body):
    agent_id: Ident
    project_id: Annotated[int | None, Strict(), Field(ge=0, le=LARGEST_ID)] = None
    title: Title | None = None


class ContentBody(Body):
    content: Text


class TriedTurnBody(ContentBody):
    """A turn as the route test and the prompt preview try it: its text and, if given, the conversation of the
    agent whose history it would carry."""

    conversation_id: Ident | None = None


LARGEST_PATH_ID = 10**18 - 1
"""An id in a path is at most 18 digits (`web.IdConverter` matches them); a longer one is simply not found."""
PathId = Annotated[int, Field(ge=1, le=LARGEST_PATH_ID)]


class IdPath(BaseModel):
    id: PathId


class ConversationPath(BaseModel):
    conversation_id: PathId


class MessagePath(BaseModel):
    message_id: PathId


class Query(CachedSchemaModel):
    """A parameter sent empty (`?limit=&cursor=`, as the contract itself writes the route, and as form-style
    URL builders send a field left unset) is taken as not sent, by every parameter alike."""

    @model_validator(mode="before")
    @classmethod
    def _empty_is_absent(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {name: value for name, value in data.items() if value != ""}
        return data


class PageQuery(Query):
    limit: Annotated[int, Field(ge=1, le=LARGEST_CONVERSATION_PAGE)] = 20
    cursor: Annotated[str | None, Field(max_length=500)] = None


class LedgerQuery(Query):
    limit: Annotated[int | None, Field(ge=1, le=LARGEST_PAGE)] = None
    """Without it, the whole ledger (the contract's shape); with it, a page and its `next_cursor`."""
    cursor: Annotated[int | None, Field(ge=1, le=LARGEST_ID)] = None


class DebugLogQuery(Query):
    agent_id: Annotated[int | None, Field(ge=1, le=LARGEST_ID)] = None
    limit: Annotated[int | None, Field(ge=1, le=LARGEST_LOG_PAGE)] = None
    """Without it, every log (the contract's shape); with it, a page and its `next_before_id`."""
    before_id: Annotated[int | None, Field(ge=1, le=LARGEST_ID)] = None


class DeadLetterQuery(Query):
    limit: Annotated[int | None, Field(ge=1, le=LARGEST_PAGE)] = None
    """Without it, every open dead letter (after `cursor`; the contract's shape); with it, a page and its
    `next_cursor`."""
    cursor: Annotated[str | None, Field(max_length=500)] = None


class FailureQuery(Query):
    hours: Annotated[float, Field(gt=0, le=24 * 365)] = 24
    limit: Annotated[int, Field(ge=1, le=LARGEST_LOG_PAGE)] = 20


class DebugCostQuery(Query):
    group_by: Literal["agent", "model", "admin"] = "agent"


IdempotencyKey = Annotated[str, Strict(), StringConstraints(min_length=1, max_length=SHORT_TEXT_CHARS), STORABLE]


class IdempotencyHeader(CachedSchemaModel):
    idempotency_key: Annotated[IdempotencyKey | None, Field(alias="Idempotency-Key")] = None


class ErrorDetail(BaseModel):
    code: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorDetail
