"""Timeouts, fallback, moderation and balance checks, against a mock upstream that really misbehaves."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import pytest
from sqlalchemy import select, update

from app.db import transaction
from app.model_target import ModelTarget
from app.models import LlmModel, ModelAttempt, Turn
from app.money import token_cost
from app.token_estimates import estimate_tokens, estimate_tokens_of_messages
from tests.conftest import MOCK_URL
from tests.support import CannedUpstream, wait_for

if TYPE_CHECKING:
    import redis

    from tests.conftest import UpstreamLog, Workers, World


@pytest.fixture(autouse=True)
def _running(workers: Workers, upstream: UpstreamLog) -> None:
    """Turns here run on a real worker against the mock upstream."""


def attempts(message_id: int) -> list[tuple[str, str]]:
    with transaction() as session:
        rows = session.execute(select(ModelAttempt.model_name, ModelAttempt.outcome)
                               .where(ModelAttempt.message_id == message_id).order_by(ModelAttempt.id)).all()
    return [(r[0], r[1]) for r in rows]


def attempt_errors(message_id: int) -> list[str | None]:
    with transaction() as session:
        return list(session.scalars(select(ModelAttempt.error).where(ModelAttempt.message_id == message_id)
                                    .order_by(ModelAttempt.id)))


FAILURES = [
    ("echo;ttft=5", "timeout"),
    ("echo;hang_headers=5", "timeout"),
    ("echo;stall_after=2", "timeout"),
    ("echo;fail=408", "request_timeout"),
    ("echo;fail=429", "rate_limited"),
    ("echo;fail=500", "server_error"),
    ("echo;fail=503", "server_error"),
    ("echo;cut_after=2", "stream_cut"),
    ("echo;end_after=2", "stream_cut"),
    ("echo;garbage_after=2", "bad_response"),
    # A chunk nested too deeply to decode (a RecursionError) escaped the policy: every delivery called the primary.
    ("echo;nested_after=2", "bad_response"),
]


@pytest.mark.parametrize(("primary_upstream", "outcome"), FAILURES)
def test_each_failure_switches_to_the_fallback_once(
        world: World, upstream: UpstreamLog, primary_upstream: str, outcome: str) -> None:
    primary = world.model("primary", upstream=primary_upstream)
    fallback = world.model("fallback", upstream="echo")
    agent_id = world.agent(primary, fallback, timeout_seconds=2)  # not 1: a loaded host's echo can take a second
    _, key = world.user()
    conversation_id = world.conversation(key, agent_id)
    assistant = world.send(key, conversation_id, "hi there").json["assistant_message"]
    done = world.wait_terminal(key, assistant["id"])
    assert done["status"] == "success"
    assert done["model"] == "fallback"
    assert done["content"] == "echo: hi there"
    assert upstream.models() == [primary_upstream, "echo"]
    assert attempts(assistant["id"]) == [("primary", outcome), ("fallback", "success")]


def test_a_connection_failure_switches_to_the_fallback(world: World, upstream: UpstreamLog) -> None:
    closed = world.api.post("/api/admin/models", world.admin_key, {
        "name": "unreachable", "model": "echo", "base_url": "http://127.0.0.1:9/v1",
        "input_price_per_1k": "0", "output_price_per_1k": "0"}).json["id"]
    agent_id = world.agent(closed, world.model("fallback"), timeout_seconds=2)
    _, key = world.user()
    assistant = world.send(key, world.conversation(key, agent_id)).json["assistant_message"]
    done = world.wait_terminal(key, assistant["id"])
    assert (done["status"], done["model"]) == ("success", "fallback")
    assert attempts(assistant["id"]) == [("unreachable", "connection_error"), ("fallback", "success")]


def test_a_turn_whose_only_model_could_not_be_reached_logs_that_no_model_answered(
        world: World, workers: Workers) -> None:
    """Its end said "no model called", though a call was made and failed to connect."""
    closed = world.api.post("/api/admin/models", world.admin_key, {
        "name": "unreachable", "model": "echo", "base_url": "http://127.0.0.1:9/v1",
        "input_price_per_1k": "0", "output_price_per_1k": "0"}).json["id"]
    _, key = world.user()
    assistant = world.send(key, world.conversation(key, world.agent(closed))).json["assistant_message"]
    assert world.wait_terminal(key, assistant["id"])["status"] == "llm_error"
    assert attempts(assistant["id"]) == [("unreachable", "connection_error")]
    ended = f"turn {assistant['id']} ended llm_error: no model answered, cost 0;"
    wait_for(lambda: any(ended in process.output() for process in workers.processes), what="the end's log line")


def _status_names(turn_id: int, model: str) -> bool:
    """Whether the turn's live stream has announced an attempt of `model` (written just before its call)."""
    from typing import cast

    from app.live_stream import read_entry, stream_key
    from app.redis_client import StreamEntry, get_redis

    entries = cast(list[StreamEntry], get_redis().xrange(stream_key(turn_id)))
    return any((entry := read_entry(fields)) is not None and entry.kind == "status"
               and entry.payload.get("model") == model for _, fields in entries)


def test_a_stop_before_the_request_reached_the_provider_records_the_attempt_at_no_cost(
        world: World, upstream: UpstreamLog) -> None:
    """A stop during the connect (here to a server whose accept queue is full: the SYN goes unanswered) sent the
    provider nothing, yet its attempt was recorded at the prompt's estimated cost in the operators' records."""
    import socket

    with socket.socket() as full:
        full.bind(("127.0.0.1", 0))
        full.listen(0)
        port = full.getsockname()[1]
        fillers = [socket.socket() for _ in range(4)]
        for filler in fillers:
            filler.setblocking(False)
            filler.connect_ex(("127.0.0.1", port))
        try:
            silent = world.api.post("/api/admin/models", world.admin_key, {
                "name": "unanswered", "model": "echo", "base_url": f"http://127.0.0.1:{port}/v1",
                "input_price_per_1k": "1", "output_price_per_1k": "1"}).json["id"]
            _, key = world.user()
            turn = world.send(key, world.conversation(key, world.agent(silent, timeout_seconds=30))).json[
                "assistant_message"]["id"]
            wait_for(lambda: _status_names(turn, "unanswered"), what="the attempt to start")
            assert world.api.post(f"/api/messages/{turn}/cancel", key).status_code == 202
            done = world.wait_terminal(key, turn)
        finally:
            for filler in fillers:
                filler.close()
    assert (done["status"], done["cost"], done["content"]) == ("cancelled", "0.000000", "")
    with transaction() as session:
        recorded = session.execute(select(ModelAttempt.outcome, ModelAttempt.prompt_tokens, ModelAttempt.cost)
                                   .where(ModelAttempt.message_id == turn)).all()
    assert [tuple(row) for row in recorded] == [("cancelled", 0, Decimal("0.000000"))]


def test_both_failing_is_an_llm_error_with_both_reasons_and_no_charge(world: World, upstream: UpstreamLog) -> None:
    agent_id = world.agent(world.model("primary", upstream="echo;fail=500"),
                           world.model("fallback", upstream="echo;fail=429"), timeout_seconds=2)
    _, key = world.user(balance="3")
    assistant = world.send(key, world.conversation(key, agent_id)).json["assistant_message"]
    done = world.wait_terminal(key, assistant["id"])
    assert done["status"] == "llm_error"
    # What the endpoints said (a provider's body can hold a masked key, an internal host, a proxy's page) is
    # kept for the operators, not shown to the user in the turn's error_message.
    assert done["error_message"] == "primary: server_error: HTTP 500; fallback: rate_limited: HTTP 429"
    assert attempt_errors(assistant["id"]) == ["HTTP 500: Error code: 500 - scripted failure 500",
                                               "HTTP 429: Error code: 429 - scripted failure 429"]
    assert (done["cost"], done["model"], done["content"]) == (None, None, "")  # no model produced any text
    me = world.api.get("/api/me", key).json
    assert me["balance"] == me["available_balance"] == "3.000000"
    assert len(world.api.get("/api/me/transactions", key).json["items"]) == 1
    assert upstream.models() == ["echo;fail=500", "echo;fail=429"]
    with transaction() as session:  # refused with an error status: no prompt processed, nothing billed
        assert session.execute(select(ModelAttempt.prompt_tokens, ModelAttempt.cost)
                               .where(ModelAttempt.message_id == assistant["id"])).all() == [(0, 0), (0, 0)]


def test_the_fallbacks_answer_is_charged_at_the_fallbacks_prices(world: World, upstream: UpstreamLog) -> None:
    """The model that answered is the one paid: a failed primary priced a thousand times dearer costs the user
    nothing of its price (its failure is unpaid), in the answer's cost and in the ledger."""
    agent_id = world.agent(world.model("dear-primary", upstream="echo;fail=500", price_in="1", price_out="2"),
                           world.model("cheap-fallback", price_in="0.001", price_out="0.002"))
    _, key = world.user(balance="10")
    done = world.wait_terminal(key, world.send(key, world.conversation(key, agent_id), "hello world")
                               .json["assistant_message"]["id"])
    cost = token_cost(done["prompt_tokens"], done["completion_tokens"], Decimal("0.001"), Decimal("0.002"))
    assert (done["status"], done["model"], done["cost"]) == ("success", "cheap-fallback", f"{cost:.6f}")
    assert [t["amount"] for t in world.api.get("/api/me/transactions", key).json["items"]
            if t["message_id"] == done["id"]] == [f"{-cost:.6f}"]
    assert world.api.get("/api/me", key).json["balance"] == f"{Decimal(10) - cost:.6f}"


@pytest.fixture
def canned() -> Iterator[CannedUpstream]:
    """A provider of the test's own, for what the mock upstream does not send: its answers are set per model."""
    endpoint = CannedUpstream({})
    yield endpoint
    endpoint.close()


def _answer(text: str | None = None, finish: str = "stop", usage: dict[str, Any] | None = None,
            **delta: Any) -> tuple[int, bytes]:
    """A streamed answer: a role chunk, the `delta` fields (`content` from `text`), the `finish_reason`, then
    `usage` as a usage-only chunk."""
    chunks: list[dict[str, Any]] = [{"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}]
    fields = {**({"content": text} if text is not None else {}), **delta}
    chunks.append({"choices": [{"index": 0, "delta": fields, "finish_reason": finish}]})
    if usage is not None:
        chunks.append({"choices": [], "usage": usage})
    return CannedUpstream.stream(*chunks)


@pytest.mark.parametrize("usage", [{"input_tokens": 10, "output_tokens": 3, "total_tokens": 13},
                                   {"total_tokens": 13}, {"prompt_tokens": None, "completion_tokens": 4}],
                         ids=["other-names", "total-only", "a-null"])
def test_a_usage_report_without_both_counts_is_estimated_not_taken_for_zero(
        world: World, canned: CannedUpstream, usage: dict[str, Any]) -> None:
    """A gateway's own field names, a total alone or a null count made the turn free (both counts read as 0):
    such a report counts nothing, and both are estimated, as when a stream reports no usage."""
    canned.answers["gateway"] = _answer("hello there", usage=usage)
    agent_id = world.agent(world.model("gateway-model", upstream="gateway", base_url=canned.base_url))
    _, key = world.user(balance="10")
    done = world.wait_terminal(key, world.send(key, world.conversation(key, agent_id)).json["assistant_message"]["id"])
    prompt = estimate_tokens_of_messages(canned.requests[0]["messages"])
    completion = estimate_tokens("hello there")
    cost = token_cost(prompt, completion, Decimal("0.001"), Decimal("0.002"))
    assert (done["status"], done["content"], done["prompt_tokens"], done["completion_tokens"], done["cost"]) == (
        "success", "hello there", prompt, completion, f"{cost:.6f}")
    assert world.api.get("/api/me", key).json["balance"] == f"{Decimal(10) - cost:.6f}"


def test_a_refusal_the_model_streams_is_its_answer(world: World, canned: CannedUpstream) -> None:
    """A model that declines streams its words as `refusal`, not `content`: the turn ended `success` and empty,
    charged, its words dropped. They are the answer."""
    canned.answers["refusing"] = _answer(refusal="I can't help with that.",
                                         usage={"prompt_tokens": 12, "completion_tokens": 6})
    agent_id = world.agent(world.model("refusing-model", upstream="refusing", base_url=canned.base_url))
    _, key = world.user()
    done = world.wait_terminal(key, world.send(key, world.conversation(key, agent_id)).json["assistant_message"]["id"])
    assert (done["status"], done["content"], done["prompt_tokens"], done["completion_tokens"]) == (
        "success", "I can't help with that.", 12, 6)


def test_an_answer_far_past_the_tokens_its_request_allowed_is_cut_at_its_bound(world: World,
                                                                              canned: CannedUpstream) -> None:
    """A provider that ignores `max_tokens` (or an endpoint that is no model) streamed an answer as long as it
    liked, all of it held in the worker, streamed and stored: it is cut at 128 characters a token allowed and
    ends there, charged at the tokens allowed, the rest of the stream unread (its usage report with it)."""
    piece = "abcdefghij" * 10
    canned.answers["endless"] = CannedUpstream.stream(
        {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]},
        *({"choices": [{"index": 0, "delta": {"content": piece}}]} for _ in range(100)),
        {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
        {"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 4}})
    agent_id = world.agent(world.model("endless-model", upstream="endless", base_url=canned.base_url), max_tokens=4)
    _, key = world.user(balance="10")
    done = world.wait_terminal(key, world.send(key, world.conversation(key, agent_id)).json["assistant_message"]["id"])
    prompt = estimate_tokens_of_messages(canned.requests[0]["messages"])
    cost = token_cost(prompt, 4, Decimal("0.001"), Decimal("0.002"))
    assert (done["status"], done["content"], done["prompt_tokens"], done["completion_tokens"], done["cost"]) == (
        "success", (piece * 6)[:512], prompt, 4, f"{cost:.6f}")
    assert attempts(done["id"]) == [("endless-model", "success")]
    assert world.api.get("/api/me", key).json["balance"] == f"{Decimal(10) - cost:.6f}"


@pytest.mark.parametrize(("answer", "said", "kept"), [
    (_answer("The first half", finish="content_filter"),
     "the provider's content filter stopped the answer: finish_reason content_filter", "The first half\n\n"),
    (_answer(finish="tool_calls", tool_calls=[{"index": 0, "id": "call_1", "type": "function",
                                               "function": {"name": "lookup", "arguments": "{}"}}]),
     "the model asked for a tool instead of answering: finish_reason tool_calls", ""),
], ids=["content-filter", "tool-call"])
def test_a_stream_that_finishes_without_an_answer_falls_back(world: World, canned: CannedUpstream,
                                                            upstream: UpstreamLog, answer: tuple[int, bytes],
                                                            said: str, kept: str) -> None:
    """An answer the provider's filter cut short, or a tool call where no tool was offered, ended `success`,
    charged, with half an answer or none: each is a failure of the primary, and the fallback answers (after the
    text its readers were sent, as after any failure mid-answer)."""
    canned.answers["unanswering"] = answer
    agent_id = world.agent(world.model("primary", upstream="unanswering", base_url=canned.base_url),
                           world.model("fallback", upstream="echo"))
    _, key = world.user()
    done = world.wait_terminal(key, world.send(key, world.conversation(key, agent_id), "hi there")
                               .json["assistant_message"]["id"])
    assert (done["status"], done["model"], done["content"]) == ("success", "fallback", f"{kept}echo: hi there")
    assert attempts(done["id"]) == [("primary", "bad_response"), ("fallback", "success")]
    assert attempt_errors(done["id"])[0] == said


def test_what_a_provider_says_is_kept_and_logged_bounded_and_on_one_line(
        world: World, canned: CannedUpstream, upstream: UpstreamLog) -> None:
    """An error body of 20 MB was stored whole in the attempt's row and logged whole on the worker's line, and a line
    break in it started a log line that looked like agentq's own: what a provider says is kept to 2,000
    characters, its control characters written as escapes."""
    forged = "\n[2026-12-06 11:00:00,000] [PID 1] [MainThread] [agentq.worker] [CRITICAL] FORGED\x1b[2J"
    canned.answers["verbose"] = (500, json.dumps({"error": {"message": forged + "E" * 50_000}}).encode())
    agent_id = world.agent(world.model("primary", upstream="verbose", base_url=canned.base_url),
                           world.model("fallback", upstream="echo"))
    _, key = world.user()
    done = world.wait_terminal(key, world.send(key, world.conversation(key, agent_id)).json["assistant_message"]["id"])
    assert (done["status"], done["model"]) == ("success", "fallback")
    error = attempt_errors(done["id"])[0]
    assert error is not None
    escaped = forged.replace("\n", "\\n").replace("\x1b", "\\x1b")
    assert error.startswith(f"HTTP 500: Error code: 500 - {escaped}EEE")
    assert error.endswith("… (cut at 2000 characters)")
    assert len(error) == len("HTTP 500: ") + 2000 + len("… (cut at 2000 characters)")
    assert "\n" not in error and "\x1b" not in error


def test_text_a_model_sends_that_no_database_stores_is_kept_replaced_and_the_model_called_once(
        world: World, upstream: UpstreamLog) -> None:
    """A NUL or a lone surrogate in an answer or in a provider's error message was refused at the settlement:
    every delivery failed, called the model again, and the turn ended `error`. They are replaced with U+FFFD
    as the text arrives, so what readers were streamed is what is stored."""
    answering = world.agent(world.model("odd-answer", upstream="echo;unstorable"))
    failing = world.agent(world.model("odd-failure", upstream="echo;fail=500;unstorable"))
    _, key = world.user()
    answered, failed = (world.wait_terminal(key, world.send(key, world.conversation(key, agent_id))
                                            .json["assistant_message"]["id"]) for agent_id in (answering, failing))
    assert (answered["status"], answered["content"]) == ("success", "echo: hello nul\ufffdhere half\ufffdpair")
    assert failed["status"] == "llm_error"
    assert failed["error_message"] == "odd-failure: server_error: HTTP 500"
    assert attempt_errors(failed["id"]) == [
        "HTTP 500: Error code: 500 - scripted failure 500 nul\ufffdhere half\ufffdpair"]
    assert attempts(answered["id"]) == [("odd-answer", "success")]
    assert attempts(failed["id"]) == [("odd-failure", "server_error")]
    assert upstream.models() == ["echo;unstorable", "echo;fail=500;unstorable"]


def test_a_character_sent_as_two_halves_in_two_chunks_is_kept_whole(
        world: World, upstream: UpstreamLog, web_server: str) -> None:
    """A provider or a gateway slicing UTF-16 may send an emoji's two surrogates in two chunks: each chunk made
    storable on its own turned the emoji into two replacement characters, in the stream and the answer."""
    from tests.support import read_sse, visible_text

    agent_id = world.agent(world.model("halves", upstream="echo;split_pairs;gap=0.05"))
    _, key = world.user()
    message_id = world.send(key, world.conversation(key, agent_id), "grin \U0001F600 ok \U0001F680").json[
        "assistant_message"]["id"]
    live = read_sse(f"{web_server}/api/messages/{message_id}/stream", key)
    done = world.wait_terminal(key, message_id)
    assert (done["status"], done["content"]) == ("success", "echo: grin \U0001F600 ok \U0001F680")
    assert visible_text(live) == done["content"]


def test_usage_a_provider_reports_past_what_the_request_allowed_is_charged_at_that_bound(
        world: World, upstream: UpstreamLog) -> None:
    """A provider reporting a trillion tokens for each count charged the user's whole balance. An answer is
    charged at most the `max_tokens` it was sent with (50), a prompt at most its UTF-8 bytes and 8 tokens of
    framing a message and 8 more: 16 + 8 for the system prompt, 5 + 8 for "hello", and 8."""
    agent_id = world.agent(world.model("overcounting", upstream="echo;reported_tokens=1000000000000",
                                       price_in="1", price_out="1"), max_tokens=50)
    _, key = world.user(balance="10")
    done = world.wait_terminal(key, world.send(key, world.conversation(key, agent_id)).json["assistant_message"]["id"])
    assert (done["status"], done["prompt_tokens"], done["completion_tokens"], done["cost"]) == (
        "success", 45, 50, "0.095000")
    assert world.api.get("/api/me", key).json["balance"] == "9.905000"


def test_a_provider_counting_past_what_a_turn_can_cost_charges_what_the_turn_held(
        world: World, upstream: UpstreamLog) -> None:
    """The reservation priced a prompt at the estimate (a token per four ASCII characters) while a provider
    may count it up to its bytes: a prompt of characters a tokenizer splits finely was charged past the
    balance, and the operator paid the rest. It now reserves the prompt at its bytes, which is also where a
    charge stops: a turn costs at most what it held. Each turn holds 0.095000 (a prompt of at most
    16+8 + 5+8 + 8 = 45 tokens and 50 answer tokens, 1 a thousand); the one whose provider reports a
    trillion tokens is charged exactly that, and the turn beside it is charged its own cost in full."""
    def agent(name: str, upstream_model: str) -> int:
        return world.agent(world.model(name, upstream=upstream_model, price_in="1", price_out="1"), max_tokens=50)

    over = agent("counts-over", "echo;reported_tokens=1000000000000")
    later = agent("answers-later", "echo;ttft=2;reported_tokens=20")
    _, key = world.user(balance="0.19")
    second = world.send(key, world.conversation(key, later)).json["assistant_message"]["id"]
    wait_for(lambda: world.message(key, second)["status"] == "processing", what="the slower turn's claim")
    first = world.wait_terminal(key, world.send(key, world.conversation(key, over)).json["assistant_message"]["id"])
    assert world.message(key, second)["status"] == "processing"
    answered = world.wait_terminal(key, second)
    assert (first["status"], first["cost"], answered["status"], answered["cost"]) == (
        "success", "0.095000", "success", "0.040000")
    ledger = world.api.get("/api/me/transactions", key).json["items"]
    assert [(t["message_id"], t["amount"], t["balance_after"]) for t in ledger if t["message_id"]] == [
        (second, "-0.040000", "0.055000"), (first["id"], "-0.095000", "0.095000")]
    assert world.api.get("/api/me", key).json["balance"] == "0.055000"


def test_a_prompt_a_provider_may_count_past_the_balance_is_refused_before_any_call(
        world: World, upstream: UpstreamLog) -> None:
    """A balance that covered the prompt's estimate (16 tokens, so 0.066000 with 50 answer tokens at 1 a
    thousand) but not what a provider may count of it (its bytes: 45 tokens, 0.095000) let the turn run,
    and a provider counting it whole charged the balance to 0, the operator paying the rest."""
    agent_id = world.agent(world.model("counts-over", upstream="echo;reported_tokens=1000000000000", price_in="1",
                                       price_out="1"), max_tokens=50)
    _, key = world.user(balance="0.07")
    ended = world.wait_terminal(key, world.send(key, world.conversation(key, agent_id)).json["assistant_message"]["id"])
    assert (ended["status"], ended["cost"]) == ("insufficient_balance", None)
    assert upstream.requests() == []
    assert world.api.get("/api/me", key).json["balance"] == "0.070000"


def test_a_charge_above_its_reservation_spends_none_of_what_another_turn_holds(world: World) -> None:
    """The ledger's own net, under the reservation's bound: a charge above what its turn held (no provider's
    count reaches it since the prompt is reserved at its bytes) stops at what the balance holds beyond the
    other turns' reservations. Taken from the whole balance, it left the turn beside it charged short."""
    from datetime import timedelta

    from sqlalchemy import update

    from app import ledger
    from app.auth import Principal
    from app.db import plain_transaction
    from app.models import ConversationMessage, Turn
    from app.models.base import utc_now
    from app.turn_intake import _insert_turn

    user_id, key = world.user(balance="0.132")
    turn_ids: list[int] = []
    for _ in range(2):
        conversation_id = world.conversation(key, world.agent(world.model(f"m{len(turn_ids)}")))
        with plain_transaction() as connection:  # held by a live worker of nobody's: no sweep sends them
            accepted = _insert_turn(connection, Principal(user_id, "alice", False), conversation_id, "hi", None)
            turn_ids.append(accepted.assistant_message.id)
            connection.execute(update(Turn).where(Turn.assistant_message_id == turn_ids[-1]).values(
                lease_token="held", lease_expires_at=utc_now() + timedelta(hours=1),
                deadline_at=utc_now() + timedelta(hours=1)))
            connection.execute(update(ConversationMessage).where(ConversationMessage.id.in_(
                [turn_ids[-1], accepted.user_message.id])).values(status="processing"))
    with plain_transaction() as connection:
        assert [ledger.reserve(connection, user_id, Decimal("0.066")).rowcount for _ in turn_ids] == [1, 1]
    with plain_transaction() as connection:
        ledger.charge_turn(connection, user_id, turn_ids[0], Decimal("0.095"), Decimal("0.066"))
    with plain_transaction() as connection:
        ledger.charge_turn(connection, user_id, turn_ids[1], Decimal("0.040"), Decimal("0.066"))
    items = world.api.get("/api/me/transactions", key).json["items"]
    assert [(t["message_id"], t["amount"], t["balance_after"]) for t in items if t["message_id"]] == [
        (turn_ids[1], "-0.040000", "0.026000"), (turn_ids[0], "-0.066000", "0.066000")]
    me = world.api.get("/api/me", key).json
    assert (me["balance"], me["available_balance"]) == ("0.026000", "0.026000")


def test_a_stalled_stream_ends_within_the_timeout_plus_a_small_bound(world: World, upstream: UpstreamLog) -> None:
    agent_id = world.agent(world.model("primary", upstream="echo;words=50;stall_after=3"), timeout_seconds=2)
    _, key = world.user()
    assistant = world.send(key, world.conversation(key, agent_id)).json["assistant_message"]
    done = world.wait_terminal(key, assistant["id"])
    assert done["status"] == "llm_error"
    with transaction() as session:
        attempt = session.scalars(select(ModelAttempt).where(ModelAttempt.message_id == assistant["id"])).one()
    assert attempt.outcome == "timeout"
    assert 2000 <= attempt.latency_ms <= 3000  # the watchdog's tick and a loaded host's slack on top of 2 s
    assert 2000 <= done["latency_ms"] <= 4000

    wait_for(lambda: list(upstream.streams().values()) == ["disconnected"], what="the upstream to see the close")


@pytest.mark.parametrize("reported", [True, False], ids=["usage", "no_usage"])
def test_a_stream_held_open_after_its_finished_answer_ends_the_turn_with_that_answer(
        world: World, upstream: UpstreamLog, reported: bool) -> None:
    """A provider that sent the answer's `finish_reason` (and its usage) and then held the stream open without
    `[DONE]` turned a whole answer into a timeout at the agent's 10 s: the fallback was called and the
    turn charged for its answer. The end of a finished stream is given 2 s; the connection is then closed
    and the answer kept, with the provider's usage (7 + 2 tokens) or the estimate (16 + 3) without one."""
    primary_upstream = "echo;hang_after_finish=60" + ("" if reported else ";no_usage")
    agent_id = world.agent(world.model("primary", upstream=primary_upstream), world.model("fallback"),
                           timeout_seconds=10)
    _, key = world.user()
    assistant = world.send(key, world.conversation(key, agent_id)).json["assistant_message"]
    done = world.wait_terminal(key, assistant["id"])
    assert (done["status"], done["model"], done["content"]) == ("success", "primary", "echo: hello")
    assert (done["prompt_tokens"], done["completion_tokens"]) == ((7, 2) if reported else (16, 3))
    assert 2000 <= done["latency_ms"] < 4000
    assert upstream.models() == [primary_upstream]
    assert attempts(assistant["id"]) == [("primary", "success")]
    wait_for(lambda: list(upstream.streams().values()) == ["disconnected"], what="the upstream to see the close")


def test_a_stop_after_the_finished_answer_keeps_it_charged_at_the_reported_usage(
        world: World, upstream: UpstreamLog) -> None:
    """A stop while a finished answer's stream was held open (its `finish_reason` and usage sent, no `[DONE]`) was
    taken for a stop mid-answer: the whole answer was kept but charged at an estimate (16 + 3 tokens), not at
    the usage the provider reported (7 + 2). The turn ends `cancelled`, as the stop's 202 promised, with the
    answer at the reported usage."""
    agent_id = world.agent(world.model("primary", upstream="echo;hang_after_finish=60", price_in="1", price_out="1"),
                           world.model("fallback"), timeout_seconds=10)
    _, key = world.user()
    assistant = world.send(key, world.conversation(key, agent_id)).json["assistant_message"]
    wait_for(lambda: list(upstream.streams().values()) == ["hung"], what="the finished stream to be held open")
    assert world.api.post(f"/api/messages/{assistant['id']}/cancel", key).status_code == 202
    done = world.wait_terminal(key, assistant["id"])
    assert (done["status"], done["model"], done["content"]) == ("cancelled", "primary", "echo: hello")
    assert (done["prompt_tokens"], done["completion_tokens"], done["cost"]) == (7, 2, "0.009000")
    assert world.api.get("/api/me", key).json["balance"] == "9.991000"
    assert upstream.models() == ["echo;hang_after_finish=60"]


def test_a_malformed_chunk_after_the_finished_answer_ends_the_turn_with_that_answer(
        world: World, upstream: UpstreamLog) -> None:
    """A chunk that is not a chat completion chunk after the answer's `finish_reason` and usage was taken for
    a bad response: the fallback was called for an answer that was complete."""
    primary_upstream = "echo;garbage_after_finish"
    agent_id = world.agent(world.model("primary", upstream=primary_upstream), world.model("fallback"))
    _, key = world.user()
    done = world.wait_terminal(key, world.send(key, world.conversation(key, agent_id)).json["assistant_message"]["id"])
    assert (done["status"], done["model"], done["content"]) == ("success", "primary", "echo: hello")
    assert (done["prompt_tokens"], done["completion_tokens"]) == (7, 2)
    assert upstream.models() == [primary_upstream]


@pytest.mark.parametrize("status", [400, 401, 403, 404, 422])
def test_a_refusal_falls_back_and_stays_recorded_as_the_primarys_failure(
        world: World, upstream: UpstreamLog, status: int) -> None:
    """`llm_error` is "the model and its fallback both failed": a refusal (a request this provider will not
    serve, a wrong key, a removed model) switches to the fallback like any other failure, and the primary's
    attempt keeps its kind for operators. It ended the turn `llm_error` on the primary, the fallback never
    called. Without a fallback, the turn ends `llm_error` on the refusal."""
    primary = world.model("primary", upstream=f"echo;fail={status}")
    agent_id = world.agent(primary, world.model("fallback", upstream="echo"))
    _, key = world.user()
    assistant = world.send(key, world.conversation(key, agent_id)).json["assistant_message"]
    done = world.wait_terminal(key, assistant["id"])
    assert (done["status"], done["model"], done["content"]) == ("success", "fallback", "echo: hello")
    assert upstream.models() == [f"echo;fail={status}", "echo"]
    kind = "bad_request" if status == 400 else "client_error"
    assert attempts(assistant["id"]) == [("primary", kind), ("fallback", "success")]
    alone = world.send(key, world.conversation(key, world.agent(primary))).json["assistant_message"]
    done = world.wait_terminal(key, alone["id"])
    assert (done["status"], done["model"]) == ("llm_error", None)
    assert done["error_message"].startswith(f"primary: {kind}: HTTP {status}"), done["error_message"]
    assert attempts(alone["id"]) == [("primary", kind)]


@pytest.mark.parametrize("broken", ["key", "variable", "url"])
def test_an_endpoint_that_cannot_be_called_as_configured_ends_the_turn_without_a_request(
        world: World, upstream: UpstreamLog, broken: str) -> None:
    """A model naming a key variable the worker does not have is not sent `OPENAI_API_KEY` instead (the
    platform's key, to the model's own server), and a base_url no connection can use (a row older than the
    API's check) is not a worker crash retried into a dead letter, nor is a variable that may not hold a
    model's key (a row older than the API's check, or than the operator's narrowing of
    AGENTQ_MODEL_KEY_VARIABLES) read and sent: each ends the turn `llm_error`, saying why, without a request
    without the fallback (a misconfiguration, like a 401); with a fallback, the fallback answers it."""
    primary = world.model("primary", api_key_env="NOBODY_SET_API_KEY" if broken == "key" else None)
    if broken in ("url", "variable"):
        with transaction() as session:
            session.execute(update(LlmModel).where(LlmModel.id == primary).values(
                {"url": {"base_url": upstream.base + "/v1\r\nX-Injected: 1"},
                 "variable": {"api_key_env": "TEST_DATABASE_PASSWORD"}}[broken]))
    _, key = world.user()
    assistant = world.send(key, world.conversation(key, world.agent(primary))).json["assistant_message"]
    done = world.wait_terminal(key, assistant["id"])
    reason = {"key": "the variable NOBODY_SET_API_KEY that holds its API key is not set",
              "variable": "the variable TEST_DATABASE_PASSWORD is not one a model's key may be read from "
                          "(AGENTQ_MODEL_KEY_VARIABLES: *_API_KEY)",
              "url": "Invalid non-printable ASCII character in URL"}[broken]
    assert done["status"] == "llm_error"
    assert done["error_message"] == "primary: endpoint_unusable: cannot be called as configured"
    [error] = attempt_errors(assistant["id"])
    assert error is not None and error.startswith("cannot be called as configured: ") and reason in error
    assert upstream.requests() == []
    assert attempts(assistant["id"]) == [("primary", "endpoint_unusable")]
    helped = world.send(key, world.conversation(key, world.agent(primary, world.model("fallback", upstream="echo"))))
    done = world.wait_terminal(key, helped.json["assistant_message"]["id"])
    assert (done["status"], done["model"], upstream.models()) == ("success", "fallback", ["echo"])
    assert attempts(done["id"]) == [("primary", "endpoint_unusable"), ("fallback", "success")]


def test_a_model_is_sent_the_key_its_variable_holds_and_no_other_server_the_platforms(
        world: World, upstream: UpstreamLog) -> None:
    """A model that names no variable was sent `OPENAI_API_KEY` wherever its `base_url` pointed: an admin
    could have the platform's key sent to a server of their own. It goes to OpenAI's endpoint only; a model
    elsewhere names the variable of its key."""
    _, key = world.user()
    for model in (world.model("named", api_key_env="TEST_PROVIDER_API_KEY"), world.model("unnamed")):
        conversation = world.conversation(key, world.agent(model))
        assert world.wait_terminal(key, world.send(key, conversation).json["assistant_message"]["id"])["status"] \
            == "success"
    assert [request["key"] for request in upstream.requests()] == ["sk-provider-test", "sk-no-key-configured"]
    from app.upstream_clients import api_key_for

    assert [api_key_for(None, url) for url in (None, "https://api.openai.com/v1", "http://api.openai.com/v1",
                                                "https://api.openai.com.example.test/v1")] == [
        "sk-platform-test", "sk-platform-test", "sk-no-key-configured", "sk-no-key-configured"]


def test_a_model_may_name_only_a_variable_that_holds_model_keys(world: World) -> None:
    """Any variable could be named, and its value sent to the model's server: `DATABASE_URL`, a cloud
    credential. The operator's patterns (`*_API_KEY` by default) say which may; agentq's own never."""
    from app.config import get_settings

    own = ("the variable {} is one of agentq's own settings, which no model's key may be read from whatever "
           "AGENTQ_MODEL_KEY_VARIABLES allows")
    other = ("the variable {} is not one a model's key may be read from (AGENTQ_MODEL_KEY_VARIABLES: "
             f"{get_settings().model_key_variables})")
    for name, why in (("TEST_DATABASE_PASSWORD", other), ("openai_api_key", other), ("DATABASE_URL", own),
                      ("AGENTQ_MODERATION_API_KEY", own)):
        refused = world.api.post("/api/admin/models", world.admin_key, {
            "name": f"m-{name}", "model": "echo", "api_key_env": name, "input_price_per_1k": "0",
            "output_price_per_1k": "0"})
        assert (refused.status_code, refused.json["error"]["code"]) == (422, "validation_failed"), name
        assert refused.json["error"]["message"] == f"api_key_env: {why.format(name)}.", refused.json
    model_id = world.model("allowed", api_key_env="DEEPSEEK_API_KEY")
    patched = world.api.patch(f"/api/admin/models/{model_id}", world.admin_key, {"api_key_env": "HOME"})
    assert patched.status_code == 422
    assert world.api.get(f"/api/admin/models/{model_id}", world.admin_key).json["api_key_env"] == "DEEPSEEK_API_KEY"


def test_a_model_priced_past_what_a_balance_holds_is_refused_as_insufficient_balance(
        world: World, upstream: UpstreamLog) -> None:
    """A worst case beyond NUMERIC(18, 6) failed the claim's write on every delivery (`error`, a dead letter,
    the same on requeue); it is capped at the largest amount, which no balance below it covers."""
    agent_id = world.agent(world.model(price_in="999999999999.999999", price_out="999999999999.999999"),
                           max_tokens=1_000_000)
    _, key = world.user(balance="100000000000")
    assistant = world.send(key, world.conversation(key, agent_id), "x" * 30_000).json["assistant_message"]
    done = world.wait_terminal(key, assistant["id"])
    assert (done["status"], done["cost"]) == ("insufficient_balance", None)
    assert upstream.requests() == []
    me = world.api.get("/api/me", key).json
    assert me["balance"] == me["available_balance"] == "100000000000.000000"


@pytest.mark.parametrize("reply", ["malformed-moderation", "null-moderation"])  # `results` empty, `results` null
def test_a_moderation_reply_without_a_result_lets_the_turn_through(
        world: World, upstream: UpstreamLog, reply: str) -> None:
    """An endpoint that answers but says nothing is an outage of that endpoint: it fails open, as one that does
    not answer does (the turn would otherwise crash, be retried and end as `error`), and the route test says
    `pass` (it answered 500 to a `results` that was null)."""
    agent_id = world.agent(world.model())
    _, key = world.user()
    assistant = world.send(key, world.conversation(key, agent_id), f"hello {reply}").json["assistant_message"]
    done = world.wait_terminal(key, assistant["id"])
    assert (done["status"], done["content"]) == ("success", f"echo: hello {reply}")
    routed = world.api.post(f"/api/admin/agents/{agent_id}/debug/route", world.admin_key, {"content": reply})
    assert (routed.status_code, routed.json["moderation"]) == (200, "pass")


@pytest.mark.parametrize(("content", "reason"), [
    ("this has a FORBIDDEN-word inside", "blocked term 'forbidden-word'"),
    ("这句话包含禁止词。", "blocked term '禁止词'"),
    ("this has a ＦＯＲＢＩＤＤＥＮ－ｗｏｒｄ in full-width letters", "blocked term 'forbidden-word'"),
    ("please flag-me now", "flagged by the moderation endpoint")])
def test_moderation_refuses_before_any_model_call(
        world: World, upstream: UpstreamLog, content: str, reason: str) -> None:
    agent_id = world.agent(world.model())
    _, key = world.user(balance="1")
    assistant = world.send(key, world.conversation(key, agent_id), content).json["assistant_message"]
    done = world.wait_terminal(key, assistant["id"])
    assert done["status"] == "content_violation"
    assert done["error_message"] == f"moderation: {reason}"
    assert done["error_display"] == "This message breaks the content policy and was not sent to the model."
    chinese = world.api.get(f"/api/messages/{assistant['id']}", key, headers={"Accept-Language": "zh"}).json
    assert chinese["error_display"] == "消息内容违反了内容政策，未发送给模型。"
    assert upstream.requests() == []
    assert world.api.get("/api/me", key).json["balance"] == "1.000000"


@pytest.mark.parametrize(("content", "blocked"), [
    ("a bad word here", True), ("a BAD \t\n word here", True), ("a ｂａｄ　ｗｏｒｄ here", True),
    ("a bad\u0301 word here", True), ("a b\u0308ad w\u0336ord here", True), ("a bád wörd here", True),
    ("a badword here", False), ("a bad, word here", False)])
def test_a_blocked_term_matches_whatever_its_case_width_marks_or_white_space(
        settings_of: Callable[..., None], content: str, blocked: bool) -> None:
    from app.moderation import check_blocked_terms

    settings_of(AGENTQ_BLOCKED_TERMS=" Bad  Word ")
    verdict = check_blocked_terms(content)
    assert (verdict.passed, verdict.reason) == ((False, "blocked term 'bad  word'") if blocked else (True, None))


@pytest.fixture
def long_intake_lease(settings_of: Callable[..., None]) -> None:
    """The API of this process takes conversation locks for a minute, so a lock the worker did not free is
    still there when the test looks (the workers keep their own 3 s leases)."""
    settings_of(AGENTQ_LEASE_SECONDS="60")


def test_insufficient_balance_ends_the_turn_without_calling_the_model(
        world: World, upstream: UpstreamLog, redis_client: redis.Redis, long_intake_lease: None) -> None:
    from app.conversation_locks import lock_key, slots_key

    agent_id = world.agent(world.model(price_in="1", price_out="1"), max_tokens=500)
    user_id, key = world.user(balance="0.4")
    conversation_id = world.conversation(key, agent_id)
    assistant = world.send(key, conversation_id).json["assistant_message"]
    done = world.wait_terminal(key, assistant["id"])
    assert done["status"] == "insufficient_balance"
    assert done["error_display"] == "Your balance is too low for this message. Please top up and try again."
    assert upstream.requests() == []
    me = world.api.get("/api/me", key).json
    assert me["balance"] == me["available_balance"] == "0.400000"
    with transaction() as session:
        turn = session.get_one(Turn, assistant["id"])
        assert (turn.reserved_amount, turn.deliveries, turn.lease_token) == (Decimal(0), 1, None)
    # The conversation's lock and the user's slot are freed by the worker, not left to run out.
    wait_for(lambda: (redis_client.exists(lock_key(conversation_id)), redis_client.zcard(slots_key(user_id)))
             == (0, 0), timeout=10, what="the worker to free the conversation's lock and the user's slot")


def test_the_reservation_is_settled_to_the_real_cost(world: World, upstream: UpstreamLog) -> None:
    agent_id = world.agent(world.model(price_in="1", price_out="1"), max_tokens=500)
    _, key = world.user(balance="0.6")
    assistant = world.send(key, world.conversation(key, agent_id), "cheap").json["assistant_message"]
    done = world.wait_terminal(key, assistant["id"])
    assert done["status"] == "success"
    me = world.api.get("/api/me", key).json
    assert (done["cost"], me["balance"], me["available_balance"]) == ("0.009000", "0.591000", "0.591000")


def mock_target(name: str, upstream_model: str) -> ModelTarget:
    """A model named `name` served by the mock upstream as `upstream_model`, at no price."""
    return ModelTarget(id=0, name=name, model=upstream_model, base_url=MOCK_URL, api_key_env=None,
                       input_price_per_1k=Decimal(0), output_price_per_1k=Decimal(0), context_window=None)


def test_a_stop_between_a_failed_primary_and_the_fallback_keeps_the_primarys_text(upstream: UpstreamLog) -> None:
    """The stop is checked before each attempt; one that lands after the primary failed mid-answer and before
    the fallback is called ends the turn with the primary's streamed text, as the primary's, not the fallback's
    (which produced nothing and is never called). The stop is set at that moment, as the switch is recorded."""
    import threading

    from app.agent_setup import AgentParams
    from app.answer_sink import AnswerSink
    from app.model_calls import call_with_fallback

    class Streamed(AnswerSink):
        def __init__(self) -> None:
            self.attempts: list[str] = []
            self.text = ""

        def attempt_started(self, model_name: str, restart: bool) -> None:
            self.attempts.append(model_name)

        def delta(self, text: str) -> None:
            self.text += text

    stop = threading.Event()

    def stopped_meanwhile() -> bool:
        stop.set()
        return True

    sink = Streamed()
    outcome = call_with_fallback(mock_target("primary", "echo;words=30;gap=0.01;cut_after=6"),
                                 mock_target("fallback", "echo;words=8"),
                                 lambda _target: [{"role": "user", "content": "hi"}],
                                 AgentParams(timeout_seconds=10, temperature=None, max_tokens=None), sink, stop,
                                 before_fallback_call=stopped_meanwhile)
    assert (outcome.cancelled, outcome.stopped_call, outcome.model.name if outcome.model else None) \
        == (True, None, "primary")  # no stopped call: the kept text is a failed attempt's, never charged
    assert sink.attempts == ["primary"]
    assert sink.text == outcome.partial == "w0 w1 w2 w3 w4 w5"
    assert upstream.models() == ["echo;words=30;gap=0.01;cut_after=6"]


def test_a_delivery_that_finds_its_lease_gone_when_it_records_the_switch_does_not_call_the_fallback(
        world: World, upstream: UpstreamLog, unreachable_broker: None) -> None:
    """The switch to the fallback is recorded under the delivery's lease. A delivery that finds the lease gone
    there (the run taken over or handed back meanwhile) could not write the fallback's answer, and another
    delivery has the run: it does not call the fallback. (Here the turn is pending, held by no lease.)"""
    import threading

    from prometheus_client import REGISTRY

    from app.agent_setup import AgentParams
    from app.answer_sink import AnswerSink
    from app.model_calls import call_with_fallback
    from app.run_kinds import TURN

    agent_id = world.agent(world.model())
    _, key = world.user()
    turn_id = world.send(key, world.conversation(key, agent_id), "hi").json["assistant_message"]["id"]
    stop = threading.Event()
    switches = REGISTRY.get_sample_value("agentq_fallbacks_total")
    outcome = call_with_fallback(mock_target("primary", "echo;fail=503"), mock_target("fallback", "echo;words=3"),
                                 lambda _target: [{"role": "user", "content": "hi"}],
                                 AgentParams(timeout_seconds=10, temperature=None, max_tokens=None), AnswerSink(), stop,
                                 before_fallback_call=lambda: TURN.mark_fell_back(
                                     turn_id, "a-lease-taken-over", ends_by=None, stop=stop))
    assert (outcome.completion, outcome.failures[-1][0]) == (None, "fallback: not called, the run is no longer this "
                                                                "delivery's")
    # Its end is then no end of its calls: a run a stopping worker handed back takes no lease back for it
    # (`LeaseKeeper.ending`), or it would end `llm_error` a turn whose fallback the next worker may still call.
    assert (outcome.disowned, outcome.cancelled) == (True, False)
    assert REGISTRY.get_sample_value("agentq_fallbacks_total") == switches  # the delivery that has it counts it
    # The session's workers may run the turn itself ("echo") once the sweep sends it: its own business.
    assert [model for model in upstream.models() if model != "echo"] == ["echo;fail=503"]


def test_a_failed_attempts_estimated_tokens_are_at_most_the_token_limit_it_was_asked_for(world: World) -> None:
    """A cut attempt's record estimates its text a token a character outside ASCII, more than a model makes
    of such text: at most the `max_tokens` (5) it was sent with, as a stopped answer's charge is."""
    agent_id = world.agent(world.model("primary", upstream="echo;cut_after=4"), world.model("fallback"), max_tokens=5)
    _, key = world.user()
    conversation_id = world.conversation(key, agent_id)
    assistant = world.send(key, conversation_id, "привет " * 10).json["assistant_message"]
    assert world.wait_terminal(key, assistant["id"])["status"] == "success"
    with transaction() as session:
        rows = session.execute(select(ModelAttempt.model_name, ModelAttempt.outcome, ModelAttempt.completion_tokens)
                               .where(ModelAttempt.message_id == assistant["id"]).order_by(ModelAttempt.id)).all()
    assert [tuple(r) for r in rows] == [("primary", "stream_cut", 5), ("fallback", "success", 5)]


def test_a_balance_that_covers_the_primary_but_not_the_dearer_fallback_is_insufficient(
        world: World, upstream: UpstreamLog) -> None:
    """The reservation prices a turn's worst case at the dearer of its models, since the fallback may answer:
    priced at the cheaper, a user whose balance covered only the primary was answered by the fallback, and its
    charge was cut at the balance, the operator paid short."""
    agent_id = world.agent(world.model("cheap", price_in="0.001", price_out="0.001"),
                           world.model("dear", price_in="1", price_out="1"), max_tokens=500)
    _, key = world.user(balance="0.4")  # the fallback's 500 answer tokens at 1 a thousand are past it
    assistant = world.send(key, world.conversation(key, agent_id)).json["assistant_message"]
    done = world.wait_terminal(key, assistant["id"])
    assert (done["status"], done["cost"]) == ("insufficient_balance", None)
    assert upstream.requests() == []
    me = world.api.get("/api/me", key).json
    assert me["balance"] == me["available_balance"] == "0.400000"


def test_a_fallback_after_a_primary_that_timed_out_gets_its_own_timeout_within_a_short_grace(
        world: World, workers: Workers, upstream: UpstreamLog) -> None:
    """A run's deadline counts a timeout for each model it may call, two with a fallback: counted once, a
    primary that timed out left its fallback no time, and the turn ended `llm_error`. The default grace (60 s)
    hid it; here it is 1 s."""
    workers.stop_all()
    workers.start(AGENTQ_TURN_GRACE_SECONDS="1")
    try:
        agent_id = world.agent(world.model("timing-out", upstream="echo;ttft=10"),
                               world.model("answering", upstream="echo"), timeout_seconds=2)
        _, key = world.user()
        assistant = world.send(key, world.conversation(key, agent_id), "hi there").json["assistant_message"]
        done = world.wait_terminal(key, assistant["id"])
        assert (done["status"], done["model"], done["content"]) == ("success", "answering", "echo: hi there"), done
    finally:
        workers.stop_all()
        workers.start()
