"""Why one upstream attempt failed: the words a run's model calls decide on (a stop ends them, any other
failure switches to the fallback: `app.fallback`).

The LLM client raises them (`app.llm_client.AttemptFailed`), the watchdog that shuts an attempt's socket
fires two of them (`app.attempt_watchdog`), the model calls read them (`app.model_calls`), and each
failed attempt's record keeps one as its `outcome`: one list, so a word misspelt in one of those
places cannot quietly change what falls back.
"""

from __future__ import annotations

from enum import StrEnum


class FailureKind(StrEnum):
    TIMEOUT = "timeout"
    CANCELLED = "cancelled"
    CONNECTION_ERROR = "connection_error"
    STREAM_CUT = "stream_cut"
    REQUEST_TIMEOUT = "request_timeout"
    """HTTP 408: the provider (or a gateway before it) timed out the request; a timeout, not a refusal."""
    RATE_LIMITED = "rate_limited"
    SERVER_ERROR = "server_error"
    BAD_RESPONSE = "bad_response"
    BAD_REQUEST = "bad_request"
    CLIENT_ERROR = "client_error"
    ENDPOINT_UNUSABLE = "endpoint_unusable"
    INTERRUPTED = "interrupted"
    """Its worker stopped during the call (killed, or cut off for longer than its lease): never raised, but
    recorded by the delivery that took the run over, from what the call had streamed (`app.interrupted_calls`)."""


UNBILLED = frozenset({FailureKind.REQUEST_TIMEOUT, FailureKind.RATE_LIMITED, FailureKind.SERVER_ERROR,
                     FailureKind.BAD_REQUEST, FailureKind.CLIENT_ERROR, FailureKind.CONNECTION_ERROR,
                     FailureKind.ENDPOINT_UNUSABLE})
"""The provider answered with an error status (a 408 included), or never got the request: it processed no prompt
and bills nothing, so such an attempt is recorded at no cost (one that timed out or was cut may have been billed)."""
