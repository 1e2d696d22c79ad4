"""Calling one upstream model, streaming, with the agent's timeout as a hard bound.

The official openai SDK does the HTTP; this module adds what a chat backend needs on top:
one pooled client per endpoint and key (never one per turn: `app.upstream_clients`) whose connections
outlive a stream (`app.upstream_transport`), the SDK's own retries off (the fallback policy decides what happens
next), and a deadline that really holds: the time to the first token and each silence between
chunks are bounded by the read timeout, and `app.attempt_watchdog` shuts the socket when the whole
attempt runs out of time or the turn is stopped, which wakes a read blocked on a stalled stream.

The stream is opened with the SDK's own `client.post` and read as plain JSON chunks (`cast_to=object`),
not as typed `ChatCompletionChunk` models: the SDK still builds the request, authenticates, maps
HTTP errors to its exceptions, decodes the event stream and raises an error event, but skips
building a model object for every chunk, which the profile showed to be two thirds of the SDK's
CPU for a streamed answer (`make bench`, floor (b) against floor (b')).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx2

from app.attempt_watchdog import watch_attempt
from app.chat_chunks import Usage, no_answer_in, read_chunk
from app.failure_kinds import UNBILLED, FailureKind
from app.model_target import ModelTarget
from app.openai_sdk import openai
from app.text import quoted, storable
from app.token_estimates import estimate_tokens, estimate_tokens_of_messages, most_tokens_of_messages
from app.turn_status import STOPPED
from app.upstream_clients import EndpointUnusable, client_for
from app.upstream_transport import guarding

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_SECONDS = 10.0
"""The most a new connection's TCP connect (and TLS handshake) may take, within the attempt's own timeout."""

FINISHED_STREAM_GRACE_SECONDS = 2.0
"""How long the end of a stream whose answer is finished (its `finish_reason` seen) may take to arrive: the
usage chunk and `[DONE]` follow at once from a healthy provider, and one that then holds the stream open
must not turn a whole answer into a timeout and a second, fallback, call."""

ANSWER_CHARS_PER_TOKEN = 128
"""The most characters an answer may bring for each token its request allowed, far past what any tokenizer puts
in one token: only a provider that ignored `max_tokens` (or an endpoint that is no model) sends more, and the
answer is cut there, as a model's own limit cuts it, so that a worker's memory, the live stream and the stored
answer stay bounded however long the stream runs."""


@dataclass(frozen=True, slots=True)
class Completion:
    text: str
    usage: Usage
    first_token_ms: int | None
    latency_ms: int


class AttemptFailed(Exception):
    """One attempt failed; `kind` says why: a stop ends the run's calls, any other kind switches (`app.fallback`).

    `detail` is agentq's own words, which a turn's `error_message` shows its user; `said` is what the other
    side said (the endpoint's error body, the transport's error, the name of an unset variable), which can
    carry a masked key, an internal host or a proxy's page: it goes to the attempt's row, the log and an
    admin's test run only (`detail_in_full`)."""

    def __init__(self, kind: FailureKind, detail: str, *, said: str | None = None, partial: str = "",
                 first_token_ms: int | None = None, latency_ms: int = 0, requested: bool = True) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail
        self.said = said
        self.partial = partial
        self.first_token_ms = first_token_ms
        self.latency_ms = latency_ms
        self.requested = requested

    @property
    def may_be_billed(self) -> bool:
        """Whether the provider may bill the attempt's prompt: it received the request and did not refuse it
        (`UNBILLED`). A stop or a deadline during the connect sent nothing, and was recorded at the prompt's
        estimated cost."""
        return self.requested and self.kind not in UNBILLED

    @property
    def detail_in_full(self) -> str:
        return f"{self.detail}: {self.said}" if self.said else self.detail

    @property
    def in_full(self) -> str:
        return f"{self.kind}: {self.detail_in_full}"


def open_chat_stream(client: openai.OpenAI, body: dict[str, Any], timeout: openai.Timeout) -> openai.Stream[Any]:
    """POST a streamed chat completion through the SDK; its chunks arrive as decoded JSON objects."""
    return client.post("/chat/completions", cast_to=object, body=body, options={"timeout": timeout}, stream=True,
                       stream_cls=openai.Stream[object])


def _status_kind(status: int) -> FailureKind:
    if status == 429:
        return FailureKind.RATE_LIMITED
    if status == 408:
        return FailureKind.REQUEST_TIMEOUT
    if status >= 500:
        return FailureKind.SERVER_ERROR
    if status == 400:
        return FailureKind.BAD_REQUEST
    return FailureKind.CLIENT_ERROR


def stream_chat(
    target: ModelTarget,
    messages: list[dict[str, str]],
    *,
    timeout_seconds: float,
    temperature: float | None,
    max_tokens: int | None,
    on_delta: Callable[[str], None],
    stop: threading.Event,
) -> Completion:
    """Stream one completion; raise `AttemptFailed` with the failure's kind, or return the whole answer."""
    body: dict[str, Any] = {"model": target.model, "messages": messages, "stream": True,
                            "stream_options": {"include_usage": True}}
    if temperature is not None:
        body["temperature"] = temperature
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    with _Attempt(timeout_seconds, stop, max_tokens) as attempt:
        try:
            with guarding(attempt.watch):
                stream = open_chat_stream(client_for(target), body,
                                          openai.Timeout(timeout_seconds, connect=attempt.connect_seconds))
        except (openai.APIConnectionError, openai.APIStatusError) as exc:
            raise attempt.refused(exc) from exc
        except (EndpointUnusable, httpx2.InvalidURL, UnicodeError) as exc:
            raise attempt.failed(FailureKind.ENDPOINT_UNUSABLE, "cannot be called as configured",
                                 said=str(exc)) from exc
        try:
            for chunk in stream:
                attempt.take(chunk, on_delta)
                if attempt.cut:
                    log.warning("model %s sent more than %s characters, past the %s tokens its request allowed: "
                                "the answer is cut there", target.name, attempt.room, max_tokens)
                    break
            attempt.release_held(on_delta)
            attempt.check_finished()
        except AttemptFailed:
            raise
        # Past `answered` the whole answer is in: a failure while reading the usage or the `[DONE]` after it
        # costs nothing, and the answer stands. A chunk nested too deeply to decode is a RecursionError: it
        # escaped the fallback policy, and every delivery of the turn called the same model until it died.
        except (ValueError, TypeError, AttributeError, RecursionError) as exc:
            if not attempt.answered:
                raise attempt.interrupted(attempt.silence_message) or attempt.failed(
                    FailureKind.BAD_RESPONSE, "the stream sent a chunk that is not a chat completion chunk",
                    said=repr(exc)) from exc
        except (httpx2.TransportError, openai.APIError, OSError) as exc:
            if not attempt.answered:
                raise attempt.broken(exc) from exc
        finally:
            stream.close()
        return attempt.completion(messages, max_tokens)


class _Attempt:
    """One streamed completion under way: what it has produced, and why it ended when it ended early
    (the stop or the watchdog shut its socket, and a read then failed or ended). Its watch (the deadline,
    the stop) is kept until the attempt's block ends, however it ends."""

    def __init__(self, timeout_seconds: float, stop: threading.Event, max_tokens: int | None) -> None:
        self.started = time.monotonic()
        self.timeout_seconds = timeout_seconds
        self.connect_seconds = min(timeout_seconds, CONNECT_TIMEOUT_SECONDS)
        self.parts: list[str] = []
        self.length = 0
        self.room = None if max_tokens is None else max_tokens * ANSWER_CHARS_PER_TOKEN
        """The answer's most characters (`ANSWER_CHARS_PER_TOKEN`); None: unbounded."""
        self.cut = False
        """The answer reached `room` and ends there: the rest of the stream is not read."""
        self.held = ""
        """Half of a surrogate pair that ended the last piece, until the next piece brings the other half."""
        self.first_token_ms: int | None = None
        self.usage: Usage | None = None
        self.finished = False
        self.watch = watch_attempt(self.started + timeout_seconds, stop)

    def __enter__(self) -> _Attempt:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.watch.close()

    @property
    def no_response_message(self) -> str:
        return f"no response within {self.timeout_seconds:g}s"

    @property
    def silence_message(self) -> str:
        return f"the stream went silent or ran past {self.timeout_seconds:g}s"

    @property
    def stopped(self) -> bool:
        return self.watch.stop.is_set() or self.watch.fired is FailureKind.CANCELLED

    @property
    def answered(self) -> bool:
        """The model finished its answer: the stream failing, running out of time or being stopped after that
        (while its usage and `[DONE]` were awaited) loses nothing of the answer. A stop then ends the turn
        `cancelled` with the whole answer, charged at the usage the provider reported (the settlement's
        `StoppedMeanwhile`), not at the estimate a stop mid-answer is charged."""
        return self.finished

    def _elapsed_ms(self) -> int:
        return int((time.monotonic() - self.started) * 1000)

    def failed(self, kind: FailureKind, detail: str, *, said: str | None = None) -> AttemptFailed:
        return AttemptFailed(kind, detail, said=quoted(said) if said else None, partial="".join(self.parts),
                             first_token_ms=self.first_token_ms, latency_ms=self._elapsed_ms(),
                             requested=self.watch.requested)

    def interrupted(self, timeout_message: str) -> AttemptFailed | None:
        if self.stopped:
            return self.failed(FailureKind.CANCELLED, STOPPED)
        if self.watch.fired is FailureKind.TIMEOUT:
            return self.failed(FailureKind.TIMEOUT, timeout_message)
        return None

    def refused(self, exc: openai.APIError) -> AttemptFailed:
        """The failure of an attempt whose response never started: a stop or the deadline, no connection,
        no headers in time, or an HTTP error status. A connection that was never made (its name lookup, TCP
        connect or TLS handshake failed or ran out of time) is a connection error, whoever gave up on it: the
        request was never sent, so the provider billed nothing."""
        if isinstance(exc.__cause__, httpx2.ConnectTimeout) and not self.stopped:
            return self.failed(FailureKind.CONNECTION_ERROR, f"could not connect within {self.connect_seconds:g}s")
        if (early := self.interrupted(self.no_response_message)) is not None:
            return early
        if isinstance(exc, openai.APITimeoutError):
            return self.failed(FailureKind.TIMEOUT, self.no_response_message)
        if isinstance(exc, openai.APIStatusError):
            return self.failed(_status_kind(exc.status_code), f"HTTP {exc.status_code}", said=exc.message)
        return self.failed(FailureKind.CONNECTION_ERROR, "the connection failed", said=str(exc.__cause__ or exc))

    def broken(self, exc: Exception) -> AttemptFailed:
        """The failure of a stream that stopped in the middle: the stop, the deadline, silence, or a cut."""
        if (early := self.interrupted(self.silence_message)) is not None:
            return early
        if isinstance(exc, httpx2.TimeoutException):
            return self.failed(FailureKind.TIMEOUT, self.silence_message)
        return self.failed(FailureKind.STREAM_CUT, "the stream broke", said=repr(exc))

    def take(self, chunk: Any, on_delta: Callable[[str], None]) -> None:
        if self.watch.stop.is_set() and not self.finished:
            raise self.failed(FailureKind.CANCELLED, STOPPED)
        texts, reported, finish = read_chunk(chunk)
        if reported is not None:
            self.usage = reported
        for piece in texts:
            if text := self._storable(piece):
                self._add(text, on_delta)
            if self.cut:
                return
        if finish is not None and not self.finished:
            if (unanswered := no_answer_in(finish, has_text=bool(self.parts))) is not None:
                raise self.failed(FailureKind.BAD_RESPONSE, unanswered, said=f"finish_reason {finish}")
            self.finished = True
            self.watch.bound(FINISHED_STREAM_GRACE_SECONDS)
        if self.watch.remaining() < 0 and not self.finished:
            raise self.failed(FailureKind.TIMEOUT, f"the attempt ran past {self.timeout_seconds:g}s")

    def _storable(self, piece: str) -> str:
        """The piece as the database can store it (`app.text.storable`), with the high surrogate a piece ends in
        held back for the next, which may begin with its low half: a provider, or a gateway slicing UTF-16,
        may send one character outside the BMP (an emoji) as two halves in two chunks, each a replacement
        character on its own."""
        text = piece
        if self.held:  # two surrogates side by side in a str are two code points until decoded as UTF-16
            text = (self.held + piece).encode("utf-16-le", "surrogatepass").decode("utf-16-le", "surrogatepass")
            self.held = ""
        if text and "\ud800" <= text[-1] <= "\udbff":
            text, self.held = text[:-1], text[-1]
        return storable(text)

    def _add(self, text: str, on_delta: Callable[[str], None]) -> None:
        if self.room is not None and self.length + len(text) > self.room:
            text, self.held = text[:self.room - self.length], ""
            self.cut = self.finished = True
        if not text:
            return
        if self.first_token_ms is None:
            self.first_token_ms = self._elapsed_ms()
        self.parts.append(text)
        self.length += len(text)
        on_delta(text)

    def release_held(self, on_delta: Callable[[str], None]) -> None:
        """The body ended: a half held back had no other half, and is the replacement character."""
        if self.held:
            self.held = ""
            self._add("\ufffd", on_delta)

    def check_finished(self) -> None:
        """A body that ended without a `finish_reason` was cut, by the watchdog or on the way."""
        if not self.finished:
            raise self.interrupted(self.silence_message) or self.failed(
                FailureKind.STREAM_CUT, "the stream ended before the model finished (no finish_reason)")

    def completion(self, messages: list[dict[str, str]], max_tokens: int | None) -> Completion:
        """The answer, with the provider's usage if it reported one, at most what the request allowed: the
        answer no longer than the `max_tokens` it was sent, the prompt no more tokens than its bytes. A
        report past those (a provider's bug) would otherwise charge the user's whole balance."""
        text = "".join(self.parts)
        usage = self.usage or Usage(estimate_tokens_of_messages(messages), estimate_tokens(text), reported=False)
        usage = Usage(min(usage.prompt_tokens, most_tokens_of_messages(messages)),
                      usage.completion_tokens if max_tokens is None else min(usage.completion_tokens, max_tokens),
                      usage.reported)
        return Completion(text, usage, self.first_token_ms, self._elapsed_ms())
