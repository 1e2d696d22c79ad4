"""Failures a caller can act on, each with the contract's HTTP status and a stable snake_case code.

Services raise these; the web layer renders them as `{"error": {"code", "message"}}` and the CLI
prints them. Anything else escaping a route is a bug and is logged as one.
"""

from __future__ import annotations


def error_object(code: str, message: str) -> dict[str, dict[str, str]]:
    """The contract's error object, as the API answers it (its routes, the server's own refusals, the worker
    group's counters server) and the command line prints it."""
    return {"error": {"code": code, "message": message}}


class AgentqError(Exception):
    status = 400
    code = "bad_request"
    retry_after: int | None = None
    """Seconds after which the same request may be answered otherwise (an HTTP `Retry-After`), when known."""

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


class Unauthorized(AgentqError):
    status = 401
    code = "unauthorized"


class Forbidden(AgentqError):
    status = 403
    code = "forbidden"


class NotFound(AgentqError):
    status = 404
    code = "not_found"


class Conflict(AgentqError):
    status = 409
    code = "conflict"


class ConversationBusy(Conflict):
    code = "conversation_busy"

    def __init__(self, message: str = "A turn of this conversation is still pending or processing.") -> None:
        super().__init__(message)


class ContentTooLarge(AgentqError):
    status = 413
    code = "content_too_large"


class ValidationFailed(AgentqError):
    status = 422
    code = "validation_failed"


class TooManyActiveConversations(AgentqError):
    status = 429
    code = "too_many_active_conversations"

    def __init__(self, limit: int, message: str | None = None) -> None:
        super().__init__(message or f"You already have {conversation_count(limit)} with a turn in flight; wait for one "
                                    "to end.")
        self.limit = limit


class TooManyTurns(AgentqError):
    status = 429
    code = "too_many_turns"

    def __init__(self, limit: int, *, retry_after: int) -> None:
        super().__init__(f"You may start {limit} turn{'' if limit == 1 else 's'} a minute; retry in {retry_after} s.")
        self.limit, self.retry_after = limit, retry_after


def conversation_count(count: int) -> str:
    """A count of conversations as a message says it ("1 conversation", "2 conversations")."""
    return f"{count} conversation{'' if count == 1 else 's'}"


class TooManyStreams(AgentqError):
    status = 429
    code = "too_many_streams"

    def __init__(self, message: str) -> None:
        super().__init__(message)

    @classmethod
    def for_user(cls, limit: int) -> TooManyStreams:
        return cls(f"You already have {limit} answer streams open on this server; close one first.")

    @classmethod
    def server_full(cls, most: int) -> TooManyStreams:
        return cls(f"This server holds all the answer streams it can ({most}) and keeps its other threads for "
                   "other requests; retry shortly, or read the message, which has the text so far.")


class ServiceUnavailable(AgentqError):
    status = 503
    code = "service_unavailable"


class DatabaseNotCreated(ServiceUnavailable):
    """The SQLite file DATABASE_URL names is not there. Only `agentq db init` makes it: the path is relative to
    the directory a command runs in, and any command or server run from another one made an empty database
    there, which then said it had no schema."""


class DatabaseAwaitsUpgrade(ServiceUnavailable):
    """A SQLite file an earlier release wrote, whose amounts `agentq db init` has not converted to millionths
    yet (`app.sqlite_upgrades`): read now, every amount in it would be a millionth of itself."""

    code = "schema_incomplete"


class InvalidConfiguration(AgentqError):
    """A setting no wait will fix (a database file that cannot be made where it points): the operator's to mend."""

    status = 503
    code = "invalid_configuration"
