"""An OpenAI-compatible chat server for the demo and the tests: it can be slow, fail, stall or cut a stream.

Behaviour is chosen by the upstream model name, so one server plays every provider a test needs:
`echo` answers with the last user message; directives after it, each after a `;`, change that, e.g.
`echo;ttft=1;gap=0.05`, `echo;fail=429`, `hang_headers=5` (no response headers for 5 s), `stall_after=3`,
`cut_after=2`, `end_after=2` (the body ends cleanly there, with no finish_reason and no `[DONE]`),
`garbage_after=2` (a chunk that is not a chat completion chunk), `nested_after=2` (a chunk nested too deeply
for a JSON decoder), `words=40` (`w0 w1 …`; `word=v` makes them `v0 v1 …`, another model's answer), `no_usage`,
`hold_after_done=30` (the body stays open after `[DONE]`),
`hang_after_finish=30` (the answer's `finish_reason` and usage are sent, then the stream says nothing for
30 s before its `[DONE]`), `garbage_after_finish` (a chunk that is not a chat completion chunk after the usage),
`redirect` (a 307 to the same path first; the directives then apply to the redirected request),
`unstorable` (the answer, or a failure's message, holds a NUL and a lone surrogate, which a database cannot
store), `split_pairs` (a character outside the BMP is sent as its two UTF-16 halves in two chunks, as a
gateway slicing UTF-16 may), `reported_tokens=N` (the usage it reports, for the prompt and the answer alike,
whatever they were).
A name other than `echo`, a directive it does not know or a value it cannot use is answered 400 with an
OpenAI-shaped error naming it: played as plain `echo`, a typo in a test's model went unseen.
Every request body is logged with the client's port (`GET /_requests`: one port per connection) and the
key it was sent with (its `Authorization` header's bearer token), and each stream's fate is recorded
(`GET /_streams`: completed, cut, stalled or disconnected by the client), so tests can prove what
the worker sent and that it closed a connection. `--tls-cert`/`--tls-key` serve it over https, as a
provider is.
"""

from __future__ import annotations

import asyncio
import json
import math
import ssl
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web


@dataclass
class Script:
    ttft: float = 0.0
    gap: float = 0.0
    fail: int | None = None
    stall_after: int | None = None
    cut_after: int | None = None
    end_after: int | None = None
    garbage_after: int | None = None
    nested_after: int | None = None
    words: int | None = None
    word: str = "w"
    usage: bool = True
    hang_headers: float = 0.0
    hold_after_done: float = 0.0
    hang_after_finish: float = 0.0
    redirect: bool = False
    garbage_after_finish: bool = False
    unstorable: bool = False
    split_pairs: bool = False
    reported_tokens: int | None = None

    @classmethod
    def parse(cls, model: str) -> Script:
        """The script a model string names; `UnplayableModel` for one it cannot play."""
        name, *directives = model.split(";")
        if name != "echo":
            raise UnplayableModel(f"the mock upstream plays 'echo' (directives follow it after ';'), not {name!r}")
        script = cls()
        for part in directives:
            directive, given, value = part.partition("=")
            if directive in _FLAGS:
                if given:
                    raise UnplayableModel(f"the directive {directive!r} takes no value, not {part!r}")
                attribute, setting = _FLAGS[directive]
                setattr(script, attribute, setting)
            elif directive in _SECONDS:
                setattr(script, directive, _seconds(directive, value))
            elif directive in _COUNTS:
                setattr(script, directive, _count(directive, value, *_COUNTS[directive]))
            elif directive == "word":
                script.word = value
            else:
                raise UnplayableModel(f"the mock upstream knows no directive {directive!r} (in {model!r})")
        return script


class UnplayableModel(ValueError):
    """A model string naming what the mock cannot play: a request for it is answered 400, naming the part."""


_FLAGS = {"no_usage": ("usage", False), "redirect": ("redirect", True), "unstorable": ("unstorable", True),
          "garbage_after_finish": ("garbage_after_finish", True), "split_pairs": ("split_pairs", True)}
_SECONDS = ("ttft", "gap", "hang_headers", "hold_after_done", "hang_after_finish")
_COUNTS: dict[str, tuple[int, int | None]] = {
    "fail": (400, 599), **{name: (0, None) for name in ("stall_after", "cut_after", "end_after", "garbage_after",
                                                        "nested_after", "words", "reported_tokens")}}
"""Each count's least and greatest value (None: no bound): `fail` answers an error status, nothing else."""


def _seconds(directive: str, value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not 0 <= seconds < math.inf:
        raise UnplayableModel(f"{directive}={value!r} is not a number of seconds (0 or more)")
    return seconds


def _count(directive: str, value: str, least: int, most: int | None) -> int:
    try:
        number = int(value)
    except ValueError:
        raise UnplayableModel(f"{directive}={value!r} is not a whole number") from None
    if number < least or (most is not None and number > most):
        bounds = f"{least}..{most}" if most is not None else f"{least} or more"
        raise UnplayableModel(f"{directive}={value!r} is out of range ({bounds})")
    return number


def _halves(text: str) -> list[str]:
    """`text` cut inside its first character outside the BMP: the high surrogate ends one piece, the low one
    starts the next (JSON carries each as a `\\u` escape)."""
    for index, char in enumerate(text):
        if ord(char) > 0xFFFF:
            code = ord(char) - 0x10000
            return [text[:index] + chr(0xD800 + (code >> 10)), chr(0xDC00 + (code & 0x3FF)) + text[index + 1:]]
    return [text]


def _estimate(text: str) -> int:
    return len(text) // 4 + 1


UNSTORABLE = ["nul\x00here", "half\ud800pair"]


def answer_words(body: dict[str, Any], script: Script) -> list[str]:
    if script.words is not None:
        words = [f"{script.word}{i}" for i in range(script.words)]
    else:
        last_user = next((m.get("content", "") for m in reversed(body.get("messages", []))
                          if m.get("role") == "user"), "")
        words = f"echo: {last_user}".split(" ")
    return words + UNSTORABLE if script.unstorable else words


KEPT = 10_000
"""The most requests and stream fates the mock keeps (the oldest go first): the demo's upstream, left running,
kept every request body it was sent (each conversation's history), about 6 MB a minute at 20 turns a second."""


@dataclass
class MockState:
    requests: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=KEPT))
    streams: dict[str, str] = field(default_factory=dict)
    cleared: int = 0
    """How many times the log was cleared: a request that arrived before a clear writes nothing after it (its
    body, its stream's fate), so a test never sees a call left over from the one before."""

    def log_request(self, entry: dict[str, Any], opened_in: int) -> None:
        if opened_in == self.cleared:
            self.requests.append(entry)

    def record(self, ident: str, fate: str, opened_in: int) -> None:
        if opened_in == self.cleared:
            self.streams[ident] = fate
            if len(self.streams) > KEPT:
                del self.streams[next(iter(self.streams))]


STATE = web.AppKey("state", MockState)


async def pause(request: web.Request, seconds: float) -> None:
    """Sleep. A client that closes its connection cancels the handler at once (the server runs with
    `handler_cancellation`), as a real provider notices a client going away; nothing is polled."""
    if request.transport is None or request.transport.is_closing():
        raise ConnectionResetError("client went away")
    await asyncio.sleep(seconds)


def _chunk(ident: str, model: str, delta: dict[str, Any], finish: str | None = None) -> bytes:
    payload = {"id": ident, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
               "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    return f"data: {json.dumps(payload)}\n\n".encode()


async def chat_completions(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    opened_in = state.cleared
    body = await request.json()
    peer = request.transport.get_extra_info("peername") if request.transport is not None else None
    state.log_request({"path": request.path, "body": body, "at": time.time(), "key": _bearer_of(request),
                       "client_port": peer[1] if peer else None}, opened_in)
    model = body.get("model", "echo")
    try:
        script = Script.parse(str(model))
    except UnplayableModel as exc:
        return web.json_response({"error": {"message": str(exc), "type": "invalid_request_error"}}, status=400)
    if script.redirect and "redirected" not in request.query:
        raise web.HTTPTemporaryRedirect(f"{request.path}?redirected=1")
    if script.hang_headers:
        await asyncio.sleep(script.hang_headers)
    if script.fail is not None:
        message = " ".join([f"scripted failure {script.fail}", *(UNSTORABLE if script.unstorable else [])])
        return web.json_response({"error": {"message": message, "type": "mock"}}, status=script.fail)
    words = answer_words(body, script)
    prompt_tokens = sum(_estimate(str(m.get("content", ""))) for m in body.get("messages", []))
    ident = f"chatcmpl-{uuid.uuid4().hex[:12]}"
    if not body.get("stream"):
        text = " ".join(words)
        return web.json_response({
            "id": ident, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": len(words),
                      "total_tokens": prompt_tokens + len(words)},
        })
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    state.record(ident, "streaming", opened_in)
    try:
        await pause(request, script.ttft)
        await response.write(_chunk(ident, model, {"role": "assistant", "content": ""}))
        for index, word in enumerate(words):
            if script.cut_after is not None and index == script.cut_after:
                state.record(ident, "cut", opened_in)
                request.transport.close()  # type: ignore[union-attr]
                return response
            if script.end_after is not None and index == script.end_after:
                state.record(ident, "ended", opened_in)
                await response.write_eof()
                return response
            if script.garbage_after is not None and index == script.garbage_after:
                await response.write(b'data: ["not", "a", "chunk"]\n\n')
            if script.nested_after is not None and index == script.nested_after:
                await response.write(b"data: " + b"[" * 100_000 + b"]" * 100_000 + b"\n\n")
            if script.stall_after is not None and index == script.stall_after:
                state.record(ident, "stalled", opened_in)
                await pause(request, 3600)
            if index and script.gap:
                await pause(request, script.gap)
            text = word if index == 0 else " " + word
            for piece in _halves(text) if script.split_pairs else [text]:
                await response.write(_chunk(ident, model, {"content": piece}))
        await response.write(_chunk(ident, model, {}, "stop"))
        if script.usage and (body.get("stream_options") or {}).get("include_usage"):
            counts = (prompt_tokens, len(words)) if script.reported_tokens is None else (script.reported_tokens,) * 2
            usage = {"prompt_tokens": counts[0], "completion_tokens": counts[1], "total_tokens": sum(counts)}
            payload = {"id": ident, "object": "chat.completion.chunk", "created": int(time.time()),
                       "model": model, "choices": [], "usage": usage}
            await response.write(f"data: {json.dumps(payload)}\n\n".encode())
        if script.garbage_after_finish:
            await response.write(b'data: ["not", "a", "chunk"]\n\n')
        if script.hang_after_finish:
            state.record(ident, "hung", opened_in)
            await pause(request, script.hang_after_finish)
        await response.write(b"data: [DONE]\n\n")
        state.record(ident, "completed", opened_in)
        if script.hold_after_done:
            await pause(request, script.hold_after_done)
    except ConnectionResetError:
        state.record(ident, "disconnected", opened_in)
    except asyncio.CancelledError:
        state.record(ident, "disconnected", opened_in)
        raise
    return response


def _bearer_of(request: web.Request) -> str | None:
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    return token if scheme.lower() == "bearer" else None


async def moderations(request: web.Request) -> web.Response:
    body = await request.json()
    request.app[STATE].requests.append({"path": request.path, "body": body, "at": time.time()})
    text = body.get("input", "")
    text = (text if isinstance(text, str) else " ".join(text)).lower()
    if "slow-moderation" in text:
        await asyncio.sleep(1.5)
    if "malformed-moderation" in text:
        return web.json_response({"id": "modr-mock", "model": "mock-moderation", "results": []})
    if "null-moderation" in text:
        return web.json_response({"id": "modr-mock", "model": "mock-moderation", "results": None})
    return web.json_response({"id": "modr-mock", "model": "mock-moderation",
                              "results": [{"flagged": "flag-me" in text, "categories": {}, "category_scores": {}}]})


async def list_requests(request: web.Request) -> web.Response:
    return web.json_response(list(request.app[STATE].requests))


async def clear(request: web.Request) -> web.Response:
    request.app[STATE].requests.clear()
    request.app[STATE].streams.clear()
    request.app[STATE].cleared += 1
    return web.json_response({"ok": True})


async def list_streams(request: web.Request) -> web.Response:
    return web.json_response(request.app[STATE].streams)


def build_app() -> web.Application:
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app[STATE] = MockState()
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/moderations", moderations)
    app.router.add_get("/_requests", list_requests)
    app.router.add_delete("/_requests", clear)
    app.router.add_get("/_streams", list_streams)
    return app


def serve(host: str, port: int, tls_cert: str | None = None, tls_key: str | None = None) -> None:
    """Run the server until it is stopped; over https when given a certificate and its key."""
    tls = None
    if tls_cert:
        tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        tls.load_cert_chain(tls_cert, tls_key)
    web.run_app(build_app(), host=host, port=port, print=None, access_log=None, backlog=2048,
                handler_cancellation=True, ssl_context=tls)
