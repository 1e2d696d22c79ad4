"""Streaming answers over SSE through a real `agentq web`, resuming, late readers, fallback restarts, stop."""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from decimal import Decimal
from typing import TYPE_CHECKING, Any, cast

import httpx
import pytest

from tests.conftest import LOG_DIR, child_env
from tests.support import Process, agentq, free_port, read_sse, visible_text, wait_for, wait_http

if TYPE_CHECKING:
    from collections.abc import Callable

    import redis
    from redis.typing import EncodableT, FieldT

    from app.redis_client import StreamEntry
    from tests.conftest import UpstreamLog, Workers, World


@pytest.fixture(autouse=True)
def _running(workers: Workers, upstream: UpstreamLog) -> None:
    """Answers here are produced by a real worker."""


@pytest.fixture
def patient_stops(settings_of: Callable[..., None]) -> None:
    """A stop's answer waits up to 10 s for the worker's end (2 s by default): its body says `cancelled` on a
    loaded host too, where the worker's look for stops, the settlement and the API's polling take longer."""
    settings_of(AGENTQ_CANCEL_WAIT_SECONDS="10")


def start_turn(world: World, upstream_model: str, content: str = "stream me", **agent: Any) -> tuple[str, int, int]:
    agent_id = world.agent(world.model(upstream=upstream_model), **agent)
    _, key = world.user(balance="10")
    conversation_id = world.conversation(key, agent_id)
    assistant = world.send(key, conversation_id, content).json["assistant_message"]
    return key, assistant["id"], conversation_id


def test_concatenated_deltas_equal_the_stored_content(world: World, web_server: str) -> None:
    key, message_id, _ = start_turn(world, "echo;words=30;gap=0.03")
    events = read_sse(f"{web_server}/api/messages/{message_id}/stream", key)
    assert events[-1].event == "done"
    done = events[-1].json()
    assert done["status"] == "success" and done["id"] == message_id
    deltas = [e for e in events if e.event == "delta"]
    assert len(deltas) >= 10
    assert "".join(e.json()["text"] for e in deltas) == done["content"] == world.message(key, message_id)["content"]
    assert done["content"] == " ".join(f"w{i}" for i in range(30))
    ids = [e.id for e in deltas]
    assert len(set(ids)) == len(ids)
    statuses = [e.json()["status"] for e in events if e.event == "status"]
    assert statuses[-1] == "success" and "processing" in statuses


def test_a_refused_input_names_no_model_to_its_readers(world: World, web_server: str) -> None:
    """Moderation refuses before any model call: the stream said `processing` with the model a call would have
    used before it said `content_violation`, though no LLM was called."""
    key, message_id, _ = start_turn(world, "echo", "please flag-me, after a slow-moderation")
    events = read_sse(f"{web_server}/api/messages/{message_id}/stream", key)  # while the endpoint judges it
    assert [(e.event, e.json()["status"], e.json()["model"]) for e in events] == [
        ("status", "processing", None), ("status", "content_violation", None), ("done", "content_violation", None)]


def test_a_turn_stopped_while_its_input_is_judged_names_no_model_and_calls_none(
        world: World, web_server: str, upstream: UpstreamLog, patient_stops: None) -> None:
    """A stop that lands during moderation ends the turn before its call: the stream said `processing` with the
    model once the input passed, though the call was never made (and a dead worker's record of its calls took
    that entry for a call made)."""
    content = "stop me during a slow-moderation"
    key, message_id, _ = start_turn(world, "echo", content)
    events: list[Any] = []
    reader = threading.Thread(target=lambda: events.extend(
        read_sse(f"{web_server}/api/messages/{message_id}/stream", key)), daemon=True)
    reader.start()
    wait_for(lambda: any(r["body"].get("input") == content for r in upstream.requests("/v1/moderations")),
             what="the input to reach the moderation endpoint")
    stopped = world.api.post(f"/api/messages/{message_id}/cancel", key)
    assert (stopped.status_code, stopped.json["status"], stopped.json["model"]) == (202, "cancelled", None)
    reader.join(timeout=30)
    assert [(e.event, e.json()["status"], e.json()["model"]) for e in events] == [
        ("status", "processing", None), ("status", "cancelled", None), ("done", "cancelled", None)]
    assert not any(content in json.dumps(r["body"]) for r in upstream.requests())


def test_an_answer_being_written_is_read_with_the_text_its_readers_hold_so_far(world: World, web_server: str) -> None:
    """A client that polls the message, or was refused a stream (429 `too_many_streams` sends it to the message),
    read an empty `content` and no `model` until the turn's end: the database has them only then."""
    key, message_id, conversation_id = start_turn(world, "echo;words=60;gap=0.05")

    def read_while_written() -> tuple[dict[str, Any], dict[str, Any]] | None:
        message = world.message(key, message_id)
        listed = world.api.get(f"/api/conversations/{conversation_id}/messages", key).json["items"]
        answer = next(m for m in listed if m["id"] == message_id)
        if message["status"] != "processing" or answer["status"] != "processing":
            return None
        return (message, answer) if len(message["content"].split()) >= 3 else None

    message, listed = wait_for(read_while_written, what="the answer read with some of its text while written")
    final = world.wait_terminal(key, message_id)
    assert final["status"] == "success" and final["content"] == " ".join(f"w{i}" for i in range(60))
    assert final["content"].startswith(message["content"]) and final["content"].startswith(listed["content"])
    assert len(listed["content"]) >= len(message["content"]) > 0
    assert message["model"] == listed["model"] == final["model"] is not None
    assert message["completion_tokens"] is None and message["cost"] is None
    listed_at_the_end = world.api.get(f"/api/conversations/{conversation_id}/messages", key).json["items"]
    assert [(m["role"], m["content"]) for m in listed_at_the_end] == [("user", "stream me"),
                                                                       ("assistant", final["content"])]


def test_text_with_separators_a_line_splitter_breaks_at_reaches_a_line_by_line_reader_whole(
        world: World, web_server: str) -> None:
    """U+2028, U+2029 and U+0085 went out raw in `data:` lines: valid SSE, yet httpx's `iter_lines` (which
    `read_sse` uses, as a client would) broke the event's JSON there and the reader failed."""
    content = "line\u2028separator\u2029paragraph\x85next"
    key, message_id, _ = start_turn(world, "echo", content)
    events = read_sse(f"{web_server}/api/messages/{message_id}/stream", key)
    done = events[-1].json()
    assert (visible_text(events), done["status"]) == (done["content"], "success")
    assert done["content"] == f"echo: {content}"


def test_a_dropped_connection_resumes_with_no_gap_and_no_repeat(world: World, web_server: str) -> None:
    key, message_id, _ = start_turn(world, "echo;words=40;gap=0.03")
    url = f"{web_server}/api/messages/{message_id}/stream"
    first = read_sse(url, key, stop_after=5)
    last_id = [e for e in first if e.id][-1].id
    rest = read_sse(url, key, last_event_id=last_id)
    assert rest[-1].event == "done"
    text = visible_text(first) + visible_text(rest)
    assert text == rest[-1].json()["content"] == " ".join(f"w{i}" for i in range(40))


def test_resuming_after_the_end_and_after_the_live_stream_is_gone(
        world: World, web_server: str, redis_client: redis.Redis) -> None:
    key, message_id, _ = start_turn(world, "echo;words=20;gap=0.02")
    url = f"{web_server}/api/messages/{message_id}/stream"
    first = read_sse(url, key, stop_after=3)
    last_id = [e for e in first if e.id][-1].id
    final = world.wait_terminal(key, message_id)
    after_end = read_sse(url, key, last_event_id=last_id)
    assert visible_text(first) + visible_text(after_end) == final["content"]
    redis_client.flushdb()
    started = time.monotonic()
    from_database = read_sse(url, key, last_event_id=last_id)
    took = time.monotonic() - started
    assert visible_text(first) + visible_text(from_database) == final["content"]
    assert from_database[-1].event == "done"
    # An ended turn is finished from the stored message at once, not after a blocking read of the gone
    # stream (a heartbeat's wait, 4 s here).
    assert took < 2.0, f"resumed in {took:.2f}s"


@pytest.mark.parametrize("junk", [
    {"type": "status", "data": "{not json"}, {"type": "status", "data": "[1, 2]"}, {"type": "delta"},
    {"type": "delta", "a": "x", "o": "0", "data": "hi"}, {"type": "delta", "o": "0", "data": b"\xff"},
    {"nothing": "typed"},
])
def test_an_entry_the_worker_never_writes_in_a_live_stream_does_not_cut_its_readers(
        world: World, web_server: str, redis_client: redis.Redis, junk: dict[FieldT, EncodableT]) -> None:
    """The live stream's key is open to anything that writes to Redis: such an entry cut every reader's
    response short with no `done`, a resuming one too, until the stream expired. It is read as a gap: the
    rest comes from the stored answer."""
    from app.live_stream import stream_key

    key, message_id, _ = start_turn(world, "echo;words=40;gap=0.03")
    url = f"{web_server}/api/messages/{message_id}/stream"
    first = read_sse(url, key, stop_after=5)
    redis_client.xadd(stream_key(message_id), junk)
    rest = read_sse(url, key, last_event_id=[e for e in first if e.id][-1].id)
    assert rest[-1].event == "done"
    assert visible_text(first) + visible_text(rest) == rest[-1].json()["content"] == " ".join(
        f"w{i}" for i in range(40))
    late = read_sse(url, key, last_event_id=[e for e in first if e.id][-1].id)
    assert (late[-1].event, visible_text(first) + visible_text(late)) == ("done", rest[-1].json()["content"])


def test_the_text_a_dead_delivery_left_its_readers_is_the_last_attempt_streamed_or_restarted(
        redis_client: redis.Redis) -> None:
    """What a stop that comes while the turn's worker is dead keeps (`text_streamed`): a later delivery that
    died in its moderation wrote only its first `status` entry, which voids nothing; taken for the last
    attempt, it lost the text readers held. A restart does void it; a junk entry is passed over."""
    import json

    from app.live_stream import Streamed, stream_key, text_streamed

    key = stream_key(987654)

    def add(kind: str, attempt: int, **fields: object) -> None:
        redis_client.xadd(key, cast("dict[FieldT, EncodableT]", {"type": kind, "a": attempt, **fields}))

    add("status", 100, data=json.dumps({"status": "processing", "model": "first"}))
    add("delta", 100, o=0, data="hello ")
    add("delta", 100, o=6, data="world")
    add("status", 200, data=json.dumps({"status": "processing", "model": "first"}))
    redis_client.xadd(key, {"type": "status", "a": 300, "data": "{not json"})
    assert text_streamed(987654) == Streamed("hello world", "first", 100)
    add("status", 200, data=json.dumps({"status": "processing", "model": "second", "restart": True}))
    assert text_streamed(987654) is None
    add("delta", 200, o=0, data="again")
    assert text_streamed(987654) == Streamed("again", "second", 200)
    # A run requeued as delivery 1001 whose stream the requeue could not drop reads none of the earlier run's.
    assert text_streamed(987654, since=1001) is None


def test_a_call_that_repeats_an_answer_that_went_on_after_other_text_is_matched_against_that_answer_alone(
        redis_client: redis.Redis) -> None:
    """A fallback departed from the primary's text, and its answer went on after it; the worker then died, and
    the delivery that took over calls the fallback again, which repeats its answer word for word. Matched
    against all readers held (the primary's text first), that repeat departed at once, and the answer was
    written twice. It is matched against what the fallback wrote (`own_from`), goes on from its end, and the
    interrupted fallback call is estimated on its own text, not the primary's too."""
    from app.live_stream import attempts_streamed, stream_key, text_streamed
    from app.live_stream_writer import ANSWER_SEPARATOR, TurnStream

    turn = 987655
    redis_client.delete(stream_key(turn))
    first = TurnStream(turn, 1)
    first.attempt_started("primary", restart=False)
    first.delta("Hello wor")
    first.attempt_started("fallback", restart=True)
    for piece in ("Bonjour ", "le "):
        first.delta(piece)
    sent = "Hello wor" + ANSWER_SEPARATOR + "Bonjour le "
    assert first.readers_text() is not None and first.readers_text().text == sent  # type: ignore[union-attr]
    held = wait_for(lambda: (read := text_streamed(turn)) is not None and read.text == sent and read,
                    what="the first delivery's text in the live stream")
    assert (held.model, held.own_from) == ("fallback", len("Hello wor" + ANSWER_SEPARATOR))
    [primary, fallback] = attempts_streamed(turn, up_to=1)[1]  # type: ignore[index]
    assert (primary.own_text, fallback.own_text) == ("Hello wor", "Bonjour le ")
    taking_over = TurnStream(turn, 2, held)
    taking_over.attempt_started("fallback", restart=False)
    for piece in ("Bonjour ", "le ", "monde"):
        taking_over.delta(piece)
    kept = taking_over.readers_text()
    assert kept is not None and (kept.text, kept.own_from) == (sent + "monde", held.own_from)
    wait_for(lambda: (read := text_streamed(turn)) is not None and read.text == sent + "monde",
             what="the takeover's text in the live stream")


def test_a_long_answer_keeps_its_live_stream_alive_past_the_expiry(redis_client: redis.Redis) -> None:
    """The live stream's expiry was set by its status entries alone: an answer longer than the expiry (an
    hour by default; an agent's timeout may be an hour for each of its two models) lost its stream mid-answer.
    A delta sets it again once a quarter of it has gone by since it was set."""
    from app import live_stream_writer
    from app.live_stream import stream_key
    from app.live_stream_writer import TurnStream
    from app.turn_status import TurnStatus

    key, stream = stream_key(555555), TurnStream(555555, 1)
    stream.status(TurnStatus.PROCESSING, "model")
    wait_for(lambda: cast(int, redis_client.ttl(key)) > 3000, what="the status entry's expiry")
    redis_client.expire(key, 100)
    stream.delta("soon after: ")
    wait_for(lambda: redis_client.xlen(key) == 2, what="the first delta")
    assert cast(int, redis_client.ttl(key)) <= 100
    live_stream_writer._publisher._expired_at[key] -= 901  # a quarter of the hour's expiry gone by
    stream.delta("much later")
    wait_for(lambda: cast(int, redis_client.ttl(key)) > 3000, what="the expiry set again by a delta")


def test_an_ended_turns_live_stream_expires_a_minute_after_its_end(redis_client: redis.Redis) -> None:
    """Once a turn has ended its answer is stored, and a reader who connects or resumes then is served from
    the database; the stream, kept an hour after the end, held an hour of a deployment's answers in Redis
    (gigabytes at a hundred turns a second). It expires `AGENTQ_STREAM_ENDED_TTL_SECONDS` (60) after its end,
    time for the readers following it to read that end."""
    from app.live_stream import stream_key
    from app.live_stream_writer import TurnStream
    from app.turn_status import TurnStatus

    key, stream = stream_key(555556), TurnStream(555556, 1)
    stream.status(TurnStatus.PROCESSING, "model")
    stream.delta("the answer")
    wait_for(lambda: redis_client.xlen(key) == 2 and cast(int, redis_client.ttl(key)) > 3000, what="the running stream")
    stream.finished(TurnStatus.SUCCESS, "model")
    wait_for(lambda: redis_client.xlen(key) == 3, what="the end")
    assert 0 < cast(int, redis_client.ttl(key)) <= 60


def test_a_publisher_that_keeps_many_streams_expiries_forgets_the_oldest_one_at_a_time() -> None:
    """The streams of turns whose end another process wrote (takeovers) stay in a publisher's map of expiry
    times; full, it was filtered whole by age at every entry published, a pass over ten thousand streams an
    entry while they were less than an hour old. The oldest set is forgotten instead, one at a time."""
    from app.live_stream_writer import _EXPIRIES_KEPT, _Publisher

    publisher = _Publisher()
    for index in range(_EXPIRIES_KEPT):
        assert publisher._expiry_due(f"taken-over-{index}", False, 3600)
    assert not publisher._expiry_due("taken-over-0", False, 3600)  # set a moment ago: not due
    assert publisher._expiry_due("new", False, 3600)
    assert len(publisher._expired_at) == _EXPIRIES_KEPT
    assert "taken-over-0" not in publisher._expired_at and "taken-over-1" in publisher._expired_at


def test_a_late_reader_gets_the_whole_text_and_done(world: World, web_server: str) -> None:
    key, message_id, _ = start_turn(world, "echo;words=12")
    final = world.wait_terminal(key, message_id)
    events = read_sse(f"{web_server}/api/messages/{message_id}/stream", key)
    assert [e.event for e in events] == ["status", "delta", "done"]
    assert events[1].json()["text"] == final["content"]
    assert events[2].json() == final


def test_an_event_id_that_is_not_ours_is_a_fresh_start(world: World, web_server: str) -> None:
    """A Last-Event-ID naming no stream entry reads like a first connection (every read of the stream
    with it would fail), and one from the stored text's last event resumes with nothing more to send."""
    key, message_id, _ = start_turn(world, "echo;words=12")
    final = world.wait_terminal(key, message_id)
    url = f"{web_server}/api/messages/{message_id}/stream"
    for forged in ("not-an-entry.0.0", "final.0.+3", "final.0.1_0", "final.+0.3", "1-0.0. 3"):
        # Python's int() reads a sign, `_` and spaces: none is an id this API writes.
        events = read_sse(url, key, last_event_id=f"{message_id}/{forged}")
        assert [e.event for e in events] == ["status", "delta", "done"], forged
        assert (events[1].json()["text"], events[0].json().get("restart")) == (final["content"], None), forged
    assert [e.event for e in read_sse(url, key, last_event_id=events[1].id)] == ["status", "done"]


def test_an_event_id_of_another_message_is_a_fresh_start_not_a_gap(world: World, web_server: str) -> None:
    """A cursor names a position in one message's stream and text; taken for another message's (a client
    that reused its last id) it resumed that one from the wrong place and left a gap."""
    key, first_id, _ = start_turn(world, "echo", "hi")
    world.wait_terminal(key, first_id)
    first_ids = [e.id for e in read_sse(f"{web_server}/api/messages/{first_id}/stream", key) if e.id]
    conversation_id = world.conversation(key, world.agent(world.model("second", upstream="echo")))
    second_id = world.send(key, conversation_id, "one two three four five").json["assistant_message"]["id"]
    second = world.wait_terminal(key, second_id)
    resumed = read_sse(f"{web_server}/api/messages/{second_id}/stream", key, last_event_id=first_ids[-1])
    assert visible_text(resumed) == second["content"] == "echo: one two three four five"
    assert first_ids and all(i.startswith(f"{first_id}/") for i in first_ids)


@pytest.mark.parametrize("last_event_id", ["99999999999999999999-0.0.0", "final.0.0", "0-0.{attempt}.500"])
def test_a_last_event_id_that_cannot_be_resumed_live_still_gets_the_answer_right(
        world: World, web_server: str, last_event_id: str) -> None:
    """Ids a reader could send but no live stream can continue from: an entry number above 64 bits (Redis
    refuses it: every read failed and the reader polled with no live text), the stored text's id for a turn
    still running (the same), and an offset past the text (the next delta moved the reader back and sent
    text it claimed to have). The first two follow the turn live; the third is sent the answer at its end."""
    from app.live_stream import attempt_number

    key, message_id, _ = start_turn(world, "echo;words=30;gap=0.03")
    events = read_sse(f"{web_server}/api/messages/{message_id}/stream", key,
                      last_event_id=f"{message_id}/" + last_event_id.format(attempt=attempt_number(1, 0)))
    done = events[-1].json()
    assert done["status"] == "success" and visible_text(events) == done["content"]
    deltas = [e for e in events if e.event == "delta"]
    if last_event_id.endswith(".500"):
        assert [e.json()["text"] for e in deltas] == [done["content"]]
    else:
        assert len(deltas) >= 5


def turn_falling_back(world: World, primary_upstream: str, fallback_upstream: str) -> tuple[str, int]:
    """A new user's turn on an agent of two models, "primary" and "fallback" (upstreams of the mock): the user's
    key and the answer's id."""
    primary = world.model("primary", upstream=primary_upstream)
    fallback = world.model("fallback", upstream=fallback_upstream)
    _, key = world.user()
    return key, world.send(key, world.conversation(key, world.agent(primary, fallback))).json["assistant_message"]["id"]


def test_a_fallback_after_a_primary_that_streamed_nothing_sends_its_reader_no_restart(
        world: World, web_server: str) -> None:
    """The reader holds no text when the primary fails before its first token: it follows the fallback's words
    as they come, with the switch told by a plain `status` event. It was told to `restart` (clear nothing), a
    field no client written to the contract knows, on the common path of a primary that fails at once."""
    import threading

    primary = world.model("primary", upstream="echo;stall_after=0")
    fallback = world.model("fallback", upstream="echo;words=5;word=v")
    _, key = world.user()
    conversation_id = world.conversation(key, world.agent(primary, fallback, timeout_seconds=2))
    message_id = world.send(key, conversation_id).json["assistant_message"]["id"]
    events: list = []
    connected = threading.Event()
    reader = threading.Thread(target=lambda: events.extend(
        read_sse(f"{web_server}/api/messages/{message_id}/stream", key, connected=connected)), daemon=True)
    reader.start()
    assert connected.wait(timeout=10)
    reader.join(timeout=30)
    done = events[-1].json()
    assert (done["status"], done["model"], done["content"]) == ("success", "fallback", "v0 v1 v2 v3 v4")
    assert "".join(e.json()["text"] for e in events if e.event == "delta") == done["content"]
    statuses = [e.json() for e in events if e.event == "status"]
    assert not any(status.get("restart") for status in statuses), statuses
    assert {"status": "processing", "model": "fallback"} in statuses


def test_a_turn_that_ends_before_its_first_token_sends_its_reader_no_restart(world: World, web_server: str) -> None:
    """Nothing was streamed, so nothing is voided: a reader told to `restart` would clear its screen for no
    reason (it was, because its id's attempt differed from the stored text's)."""
    key, message_id, _ = start_turn(world, "echo;ttft=4", timeout_seconds=1)
    events = read_sse(f"{web_server}/api/messages/{message_id}/stream", key)
    assert events[-1].json()["status"] == "llm_error"
    assert not any(e.event == "status" and e.json().get("restart") for e in events), [e.data for e in events]
    assert [e for e in events if e.event == "delta"] == []


def test_a_fallback_switch_mid_turn_goes_on_after_the_text_readers_hold(
        world: World, web_server: str, upstream: UpstreamLog) -> None:
    """The fallback's answer departs from the primary's at once (another model's words): readers keep what they
    hold and are sent the fallback's answer after it, a paragraph on, so that their deltas concatenate to the
    final content, as the contract says. They were told to take the primary's text back (a `restart`), and the
    content was the fallback's alone, which a client concatenating deltas never saw. Only the fallback's call
    is charged."""
    # The primary's first word waits a second: the reader is following before any text.
    primary = world.model("primary", upstream="echo;words=30;gap=0.02;cut_after=6;ttft=1")
    fallback = world.model("fallback", upstream="echo;words=8;gap=0.02;word=v")
    agent_id = world.agent(primary, fallback)
    _, key = world.user()
    message_id = world.send(key, world.conversation(key, agent_id)).json["assistant_message"]["id"]
    url = f"{web_server}/api/messages/{message_id}/stream"
    events = read_sse(url, key)
    assert not any(e.event == "status" and e.json().get("restart") for e in events), [e.data for e in events]
    assert [e.json()["model"] for e in events if e.event == "status"][-2:] == ["fallback", "fallback"]
    done = events[-1].json()
    answer = "w0 w1 w2 w3 w4 w5\n\n" + " ".join(f"v{i}" for i in range(8))
    assert (done["status"], done["model"], done["content"]) == ("success", "fallback", answer)
    deltas = [e for e in events if e.event == "delta"]
    assert "".join(e.json()["text"] for e in deltas) == answer
    late = read_sse(url, key)
    assert "".join(e.json()["text"] for e in late if e.event == "delta") == answer
    before_switch = next(i for i, e in enumerate(deltas) if "w5" in "".join(d.json()["text"] for d in deltas[:i + 1]))
    resumed = read_sse(url, key, last_event_id=deltas[before_switch].id)
    assert "".join(e.json()["text"] for e in deltas[:before_switch + 1] + resumed if e.event == "delta") == answer
    from sqlalchemy import select

    from app.db import transaction
    from app.models import ModelAttempt

    with transaction() as session:
        recorded = session.execute(select(ModelAttempt.model_name, ModelAttempt.outcome)
                                   .where(ModelAttempt.message_id == message_id).order_by(ModelAttempt.id)).all()
    assert [tuple(row) for row in recorded] == [("primary", "stream_cut"), ("fallback", "success")]
    [charge] = [t for t in world.api.get("/api/me/transactions", key).json["items"] if t["message_id"]]
    assert charge["amount"] == "-" + done["cost"] and (done["prompt_tokens"], done["completion_tokens"]) == (7, 8)


def test_a_fallback_that_repeats_what_readers_hold_goes_on_from_its_end(
        world: World, web_server: str, upstream: UpstreamLog) -> None:
    """The fallback's answer begins with the very words the primary streamed before its cut: readers keep them
    and are sent only what follows, so their deltas alone concatenate to the answer, with no `restart`; a
    reader resuming from before the switch, and one arriving after the end, get the same text."""
    key, message_id = turn_falling_back(world, "echo;words=30;gap=0.02;cut_after=6", "echo;words=8;gap=0.02")
    url = f"{web_server}/api/messages/{message_id}/stream"
    events = read_sse(url, key)
    done = events[-1].json()
    answer = " ".join(f"w{i}" for i in range(8))
    assert (done["status"], done["model"], done["content"]) == ("success", "fallback", answer)
    assert not any(e.event == "status" and e.json().get("restart") for e in events), [e.data for e in events]
    assert [e.json()["model"] for e in events if e.event == "status"][-1] == "fallback"
    deltas = [e for e in events if e.event == "delta"]
    assert "".join(e.json()["text"] for e in deltas) == answer
    assert upstream.models() == ["echo;words=30;gap=0.02;cut_after=6", "echo;words=8;gap=0.02"]
    early = next(i for i, e in enumerate(deltas) if e.json()["text"].strip() and "w2" in
                 "".join(d.json()["text"] for d in deltas[:i + 1]))
    resumed = read_sse(url, key, last_event_id=deltas[early].id)
    sent_before = "".join(e.json()["text"] for e in deltas[:early + 1])
    assert sent_before + "".join(e.json()["text"] for e in resumed if e.event == "delta") == answer
    assert not any(e.event == "status" and e.json().get("restart") for e in resumed)
    late = read_sse(url, key)
    assert "".join(e.json()["text"] for e in late if e.event == "delta") == answer


@pytest.mark.parametrize("fallback_upstream", ["echo;words=8;gap=0.02", "echo;words=3;word=v;gap=0.02"],
                         ids=["repeats", "departs"])
def test_a_reader_resuming_from_the_primarys_text_once_the_live_stream_is_gone_gets_the_rest(
        world: World, web_server: str, redis_client: redis.Redis, fallback_upstream: str) -> None:
    """The primary streamed words and was cut; the fallback repeated them and went on, or departed from them a
    paragraph on. A reader resuming with an id of the primary's text once the live stream is gone (its expiry,
    a minute after the end) was sent a `restart` and the whole answer again, though the stored answer begins
    with what it holds: it is sent the rest. An id past what of the primary's text the answer kept is one whose
    text the answer does not begin with: that one is still sent the answer whole, after a `restart`."""
    from app.live_stream import attempt_number, links_key, stream_key

    key, message_id = turn_falling_back(world, "echo;words=30;gap=0.02;cut_after=6", fallback_upstream)
    url = f"{web_server}/api/messages/{message_id}/stream"
    events = read_sse(url, key)
    content = events[-1].json()["content"]
    deltas = [e for e in events if e.event == "delta"]
    primary = [i for i, e in enumerate(deltas) if (e.id or "").split(".")[1] == str(attempt_number(1, 0))]
    middle = primary[len(primary) // 2]
    kept = "".join(e.json()["text"] for e in deltas[:primary[-1] + 1])
    redis_client.delete(stream_key(message_id))  # as its expiry does
    resumed = read_sse(url, key, last_event_id=deltas[middle].id)
    assert not any(e.event == "status" and e.json().get("restart") for e in resumed), [e.data for e in resumed]
    assert "".join(e.json()["text"] for e in deltas[:middle + 1]) + visible_text(resumed) == content
    entry = (deltas[middle].id or "").split("/")[1].split(".")[0]
    at_its_end = read_sse(url, key, last_event_id=f"{message_id}/{entry}.{attempt_number(1, 0)}.{len(kept)}")
    assert not any(e.event == "status" and e.json().get("restart") for e in at_its_end)
    assert kept + visible_text(at_its_end) == content
    past = read_sse(url, key, last_event_id=f"{message_id}/{entry}.{attempt_number(1, 0)}.{len(kept) + 1}")
    assert [e.json().get("restart") for e in past if e.event == "status"] == [True]
    assert visible_text(past) == content
    # Links of another answer (a run an operator requeued since) are not believed, whatever they say.
    redis_client.set(links_key(message_id), f"{attempt_number(1, 0)}:{len(content)},{attempt_number(9, 0)}:9")
    other = read_sse(url, key, last_event_id=deltas[middle].id)
    assert [e.json().get("restart") for e in other if e.event == "status"] == [True]
    assert visible_text(other) == content


def test_a_stop_while_the_fallback_repeats_what_readers_hold_keeps_that_text(
        world: World, web_server: str, upstream: UpstreamLog, redis_client: redis.Redis, patient_stops: None) -> None:
    """The fallback was still repeating, slowly, the words the primary streamed before its cut when the stop
    came: the turn keeps the words readers hold, the primary's, unpaid (as a stop between the primary's failure
    and the fallback's call does), and its readers are sent them once, no restart. It kept the fallback's
    shorter repeat, and its readers were told to take back words they had been sent."""
    import json

    from app.live_stream import stream_key

    key, message_id = turn_falling_back(world, "echo;words=30;gap=0.02;cut_after=6", "echo;words=30;gap=1")
    url = f"{web_server}/api/messages/{message_id}/stream"

    def fallback_called() -> bool:
        return any(fields[b"type"] == b"status" and json.loads(fields[b"data"]).get("model") == "fallback"
                   for _, fields in cast("list[StreamEntry]", redis_client.xrange(stream_key(message_id))))

    wait_for(fallback_called, what="the fallback's call")
    stopped = world.api.post(f"/api/messages/{message_id}/cancel", key)
    kept = "w0 w1 w2 w3 w4 w5"
    assert (stopped.status_code, stopped.json["status"], stopped.json["content"], stopped.json["model"],
            stopped.json["cost"]) == (202, "cancelled", kept, "primary", "0.000000")
    events = read_sse(url, key)
    assert not any(e.event == "status" and e.json().get("restart") for e in events), [e.data for e in events]
    assert "".join(e.json()["text"] for e in events if e.event == "delta") == kept
    assert [t for t in world.api.get("/api/me/transactions", key).json["items"] if t["message_id"]] == []


def test_resuming_from_a_restart_sent_from_the_stored_text_never_replays_voided_text(
        world: World, web_server: str, upstream: UpstreamLog) -> None:
    """A reader whose id cannot continue an ended turn (here an offset past the fallback's text) is sent a
    restart and the stored text. Coming back with that restart's id sends the stored text again, never the
    primary's voided text, which is still in the live stream ahead of the fallback's."""
    from app.live_stream import attempt_number

    key, message_id = turn_falling_back(world, "echo;words=30;gap=0.02;cut_after=6", "echo;words=8")
    content = world.wait_terminal(key, message_id)["content"]
    assert content == " ".join(f"w{i}" for i in range(8))
    url = f"{web_server}/api/messages/{message_id}/stream"
    back = read_sse(url, key, last_event_id=f"{message_id}/0-0.{attempt_number(1, 1)}.500")
    restart = next(e for e in back if e.event == "status" and e.json().get("restart"))
    assert visible_text(back) == content
    again = read_sse(url, key, last_event_id=restart.id)
    assert "".join(e.json()["text"] for e in again if e.event == "delta") == content
    # An id in the primary's attempt within what the answer kept of it (the fallback repeated those words): the
    # rest, no restart. Past it, words the answer does not begin with: the restart is the one status event.
    within = read_sse(url, key, last_event_id=f"{message_id}/final.{attempt_number(1, 0)}.3")
    assert [e.json() for e in within if e.event == "status"] == [{"status": "success", "model": "fallback"}]
    assert content[:3] + visible_text(within) == content
    voided = read_sse(url, key, last_event_id=f"{message_id}/final.{attempt_number(1, 0)}.{len(content)}")
    assert [e.json() for e in voided if e.event == "status"] == [{"status": "success", "model": "fallback",
                                                                  "restart": True}]
    assert visible_text(voided) == content


def test_a_reader_following_a_turn_its_first_delivery_could_not_settle_is_sent_the_answer_once(
        world: World, web_server: str, upstream: UpstreamLog) -> None:
    """The first delivery's answer cannot be written (a database error at its settlement): its attempt is
    recorded on its own and Dramatiq's retry runs the turn again. The retry's call repeats the first's answer
    word for word, so a reader following from the start gets that text once and then `done`: no restart, and
    the reader names the final text by the settling delivery's attempts alone, so the attempt the first
    delivery recorded does not make it restart at the end and send the whole answer again."""
    from sqlalchemy import text

    from app.db import transaction
    from tests.support import refusing

    def run_sql(statement: str) -> None:
        with transaction() as session:
            session.execute(text(statement))

    key, message_id, conversation_id = start_turn(world, "echo;words=12;gap=0.05")
    url = f"{web_server}/api/messages/{message_id}/stream"
    with ThreadPoolExecutor(1) as reader, refusing(
            run_sql, "agentq_test_refuse_first_settlement", "conversation_messages", "UPDATE",
            f"NEW.status = 'success' AND NEW.conversation_id = {conversation_id}"):
        following = reader.submit(read_sse, url, key)

        def first_attempt_recorded() -> bool:
            with transaction() as session:
                return bool(session.execute(text("SELECT count(*) FROM model_attempts WHERE message_id = :id"),
                                            {"id": message_id}).scalar())

        wait_for(first_attempt_recorded, timeout=20, what="the first delivery's attempt, recorded on its own")
    events = following.result(timeout=30)
    done = events[-1].json()
    answer = " ".join(f"w{i}" for i in range(12))
    assert (done["status"], done["content"]) == ("success", answer)
    assert not any(e.event == "status" and e.json().get("restart") for e in events), [e.data for e in events]
    assert "".join(e.json()["text"] for e in events if e.event == "delta") == answer
    with transaction() as session:
        recorded = session.execute(text("SELECT delivery, outcome FROM model_attempts WHERE message_id = :id "
                                        "ORDER BY id"), {"id": message_id}).all()
    assert [tuple(row) for row in recorded] == [(1, "success"), (2, "success")]


def test_a_reader_joining_after_a_fallback_switch_gets_the_whole_text(
        world: World, web_server: str, upstream: UpstreamLog, redis_client: redis.Redis) -> None:
    """Joining mid-turn, after the fallback's answer departed from the primary's text (its `continue` in the
    live stream, written with the fallback's first words): the reader is sent the primary's text and the
    fallback's after it, so that its deltas concatenate to the content, with no restart to handle."""
    from app.live_stream import stream_key

    key, message_id = turn_falling_back(world, "echo;words=30;gap=0.02;cut_after=6",
                                        "echo;words=8;gap=0.2;ttft=2;word=v")

    def switched() -> bool:
        entries = cast("list[StreamEntry]", redis_client.xrange(stream_key(message_id)))
        return any(fields[b"type"] == b"continue" for _, fields in entries)

    wait_for(switched, what="the fallback's answer going on after the primary's text in the live stream")
    events = read_sse(f"{web_server}/api/messages/{message_id}/stream", key)
    assert not any(e.event == "status" and e.json().get("restart") for e in events)
    done = events[-1].json()
    assert (done["status"], done["model"]) == ("success", "fallback")
    assert "".join(e.json()["text"] for e in events if e.event == "delta") == done["content"] \
        == "w0 w1 w2 w3 w4 w5\n\n" + " ".join(f"v{i}" for i in range(8))


@pytest.mark.parametrize("fallback_upstream", [None, "echo;words=8;gap=0.02;cut_after=3"])
def test_a_turn_whose_models_fail_mid_answer_keeps_the_text_its_readers_were_sent(
        world: World, web_server: str, upstream: UpstreamLog, fallback_upstream: str | None) -> None:
    """An `llm_error` after text was streamed keeps the text its readers were sent as its content, and the model
    that wrote it as its model (as a stop keeps them): here the fallback repeated the primary's first words and
    was cut before it went past them, so the primary's are the content (it kept the fallback's three words, and
    its readers were told to take the others back). A reader from the start, whose deltas are that text, and a
    late reader, whose one delta is the content, both end with the stored answer. Nothing is charged."""
    # the first token a second late: the reader is following before the fallback's restart, on a loaded machine too
    primary = world.model("primary", upstream="echo;ttft=1;words=30;gap=0.02;cut_after=6")
    fallback = world.model("fallback", upstream=fallback_upstream) if fallback_upstream else None
    _, key = world.user()
    message_id = world.send(key, world.conversation(key, world.agent(primary, fallback))).json[
        "assistant_message"]["id"]
    events = read_sse(f"{web_server}/api/messages/{message_id}/stream", key)
    done = events[-1].json()
    assert (done["status"], done["cost"]) == ("llm_error", None)
    assert done["model"] == "primary"
    assert not any(e.event == "status" and e.json().get("restart") for e in events), [e.data for e in events]
    assert done["content"] == "w0 w1 w2 w3 w4 w5"  # the primary's cut_after words
    assert visible_text(events) == done["content"] == world.message(key, message_id)["content"]
    late = read_sse(f"{web_server}/api/messages/{message_id}/stream", key)
    assert "".join(e.json()["text"] for e in late if e.event == "delta") == done["content"]
    assert [t for t in world.api.get("/api/me/transactions", key).json["items"] if t["message_id"]] == []


def _followed_past_its_first_deltas(world: World, web_server: str, redis_client: Any) -> tuple[list, str, Any]:
    """A slow turn, a reader following it on a thread of its own (its events, as they come), once the turn has
    streamed its first deltas; with its live stream's key, for a test to add to it what a worker would."""
    import threading

    from app.live_stream import stream_key

    key, message_id, _ = start_turn(world, "echo;words=40;gap=0.05")
    events: list = []
    reader = threading.Thread(target=lambda: events.extend(
        read_sse(f"{web_server}/api/messages/{message_id}/stream", key)), daemon=True)
    reader.start()
    stream = stream_key(message_id)
    wait_for(lambda: sum(fields[b"type"] == b"delta" for _, fields in redis_client.xrange(stream)) >= 3,
             what="the turn's first deltas")
    return events, stream, reader


def test_a_late_write_of_a_voided_attempt_does_not_stop_a_reader_following_live(
        world: World, web_server: str, redis_client: redis.Redis) -> None:
    """A worker that lost a turn (a hand-back at shutdown, a takeover) may still flush a delta of its voided
    attempt after the new owner's entries; a reader following the new attempt skips it and stays live,
    instead of waiting for the end as it does for a real gap. The stale write is added to the real stream."""
    import json

    events, stream, reader = _followed_past_its_first_deltas(world, web_server, redis_client)
    redis_client.xadd(stream, {"type": "delta", "a": 0, "o": 0, "data": "voided text"})
    reader.join(timeout=30)
    done = events[-1].json()
    assert done["status"] == "success" and visible_text(events) == done["content"]
    assert "voided" not in "".join(e.json()["text"] for e in events if e.event == "delta")
    assert not any(e.event == "status" and e.json().get("restart") for e in events)
    # Followed live to the end: no delta came from the stored message (its ids begin with `final`), which
    # is where a reader sent to wait for the end gets the rest.
    deltas = [e.id for e in events if e.event == "delta"]
    assert deltas and not any(ident.startswith("final.") for ident in deltas), json.dumps(deltas)


def test_a_status_written_again_unchanged_is_not_sent_again(
        world: World, web_server: str, redis_client: redis.Redis) -> None:
    """A delivery that takes a turn over writes its status as it starts, the same `processing` and model as the
    dead one's: `status` events are sent on a change, so its readers get none for it. The copy is added to the
    real stream, as that delivery would write it."""
    from itertools import pairwise

    events, stream, reader = _followed_past_its_first_deltas(world, web_server, redis_client)
    last_status = [fields for _, fields in cast("list[StreamEntry]", redis_client.xrange(stream))
                   if fields[b"type"] == b"status"][-1]
    redis_client.xadd(stream, cast("dict[FieldT, EncodableT]", last_status))
    reader.join(timeout=30)
    done = events[-1].json()
    assert done["status"] == "success" and visible_text(events) == done["content"]
    statuses = [(e.json()["status"], e.json()["model"]) for e in events if e.event == "status"]
    assert all(earlier != later for earlier, later in pairwise(statuses)), statuses
    assert statuses[-1] == ("success", done["model"])


def test_a_late_write_of_the_primarys_attempt_right_after_the_switch_is_not_adopted(
        world: World, web_server: str, upstream: UpstreamLog, redis_client: redis.Redis) -> None:
    """A reader just past the fallback's switch follows the new attempt after the text it holds; a late delta of
    the primary's attempt (its worker flushing as it lost the turn) must be skipped, not taken for text of the
    new attempt. The stale write is added to the real stream once the switch is there (the `continue` written
    with the fallback's first words, which depart from the primary's)."""
    import threading

    from app.live_stream import stream_key

    key, message_id = turn_falling_back(world, "echo;words=30;gap=0.02;cut_after=6;ttft=1",
                                        "echo;words=8;gap=0.2;ttft=2;word=v")
    events: list = []
    connected = threading.Event()
    reader = threading.Thread(target=lambda: events.extend(
        read_sse(f"{web_server}/api/messages/{message_id}/stream", key, connected=connected)), daemon=True)
    reader.start()
    stream = stream_key(message_id)

    def switch() -> dict | None:
        entries = cast("list[StreamEntry]", redis_client.xrange(stream))
        return next((fields for _, fields in entries if fields[b"type"] == b"continue"), None)

    # The reader must be following the primary's stream when it is cut (its first token comes 1 s after the
    # call), or it would join after the switch, which is another test's case.
    assert connected.wait(timeout=10) and switch() is None
    switched = wait_for(switch, what="the fallback's switch in the live stream")
    redis_client.xadd(stream, {"type": "delta", "a": int(switched[b"from"]), "o": 0, "data": "voided text"})
    reader.join(timeout=30)
    done = events[-1].json()
    assert (done["status"], done["model"]) == ("success", "fallback")
    assert "".join(e.json()["text"] for e in events if e.event == "delta") == done["content"] \
        == "w0 w1 w2 w3 w4 w5\n\n" + " ".join(f"v{i}" for i in range(8))
    assert "voided" not in "".join(e.json()["text"] for e in events if e.event == "delta")
    assert not any(e.event == "status" and e.json().get("restart") for e in events)


def test_a_client_that_disconnects_does_not_stop_the_answer(world: World, web_server: str) -> None:
    key, message_id, _ = start_turn(world, "echo;words=30;gap=0.02")
    read_sse(f"{web_server}/api/messages/{message_id}/stream", key, stop_after=2)
    final = world.wait_terminal(key, message_id)
    assert final["status"] == "success" and final["content"].endswith("w29")
    ledger = world.api.get("/api/me/transactions", key).json["items"]
    assert [t["message_id"] for t in ledger if t["message_id"]] == [message_id]


def test_stop_ends_the_turn_closes_upstream_keeps_the_text_and_charges_it(
        world: World, web_server: str, upstream: UpstreamLog, patient_stops: None) -> None:
    import time

    key, message_id, conversation_id = start_turn(world, "echo;words=400;gap=0.05")
    seen = read_sse(f"{web_server}/api/messages/{message_id}/stream", key, stop_after=5)
    asked = time.monotonic()
    response = world.api.post(f"/api/messages/{message_id}/cancel", key)
    took = time.monotonic() - asked
    # The 202 waits for the worker's end: it carries the turn ended, and the conversation takes a next
    # message at once (it was busy for the worker's half second).
    assert (response.status_code, response.json["status"]) == (202, "cancelled")
    assert took < 5.0, f"stop took {took:.2f}s"  # against 20 s of answer left
    assert world.send(key, conversation_id, "next").status_code == 202
    final = world.message(key, message_id)
    assert final == response.json
    assert final["content"].startswith(visible_text(seen))
    assert 0 < len(final["content"]) < len(" ".join(f"w{i}" for i in range(400)))
    assert final["error_display"] == "The answer was stopped."
    wait_for(lambda: list(upstream.streams().values())[:1] == ["disconnected"], what="upstream to see the close")
    # The stopped stream reported no usage: the prompt and the text kept are estimated, and charged at the
    # model's prices (0.001 and 0.002 a thousand).
    from app.token_estimates import estimate_tokens, estimate_tokens_of_messages

    prompt = [{"role": "system", "content": "You are helpful."}, {"role": "user", "content": "stream me"}]
    expected = (estimate_tokens_of_messages(prompt), estimate_tokens(final["content"]))
    assert (final["prompt_tokens"], final["completion_tokens"]) == expected
    assert Decimal(final["cost"]) == (expected[0] * Decimal("0.001") + expected[1] * Decimal("0.002")) / 1000
    ledger = world.api.get("/api/me/transactions", key).json["items"]
    assert [(t["message_id"], t["amount"]) for t in ledger if t["message_id"]] == [(message_id, f"-{final['cost']}")]
    # The stopped call's attempt row carries the same figures: the charge is that record's.
    from sqlalchemy import select

    from app.db import transaction
    from app.models import ModelAttempt

    with transaction() as session:
        attempts = session.execute(select(ModelAttempt.outcome, ModelAttempt.prompt_tokens,
                                          ModelAttempt.completion_tokens, ModelAttempt.cost)
                                   .where(ModelAttempt.message_id == message_id)).all()
    assert [tuple(row) for row in attempts] == [("cancelled", *expected, Decimal(final["cost"]))]
    user_message = world.message(key, message_id - 1)
    assert user_message["status"] == "cancelled"


def test_a_stopped_answer_is_charged_at_most_the_token_limit_it_was_asked_for(
        world: World, web_server: str, upstream: UpstreamLog, patient_stops: None) -> None:
    """The stopped text is priced at the estimate, a token a character outside ASCII, which is more than a
    model makes of such text: charged at most the `max_tokens` the request was sent with (5 here, against
    an estimate of 7 a word), as a whole answer's usage is. The prompt: 8 + (15 + 360 + 4) + 2 tokens."""
    key, message_id, _ = start_turn(world, "echo;gap=0.05", content="привет " * 60, max_tokens=5)
    read_sse(f"{web_server}/api/messages/{message_id}/stream", key, stop_after=5)
    stopped = world.api.post(f"/api/messages/{message_id}/cancel", key).json
    assert len(stopped["content"].split()) >= 5
    assert (stopped["status"], stopped["prompt_tokens"], stopped["completion_tokens"], stopped["cost"]) == (
        "cancelled", 389, 5, "0.000399")
    ledger = world.api.get("/api/me/transactions", key).json["items"]
    assert [(t["message_id"], t["amount"]) for t in ledger if t["message_id"]] == [(message_id, "-0.000399")]


@pytest.mark.parametrize("upstream_model", ["echo;hang_headers=30", "echo;redirect;hang_headers=30"])
def test_a_stop_before_the_response_headers_ends_the_turn_at_once(
        world: World, upstream: UpstreamLog, upstream_model: str) -> None:
    """A provider that has not sent its response headers yet (queued, overloaded) does not hold a stop for
    the attempt's timeout: the watch has the request's socket from the moment the request is written, and
    the socket of the request a redirect sends next."""
    import time

    key, message_id, _ = start_turn(world, upstream_model)
    calls = 2 if "redirect" in upstream_model else 1
    wait_for(lambda: sum(r["body"]["model"] == upstream_model for r in upstream.requests()) == calls,
             what="the model to be called")
    asked = time.monotonic()
    assert world.api.post(f"/api/messages/{message_id}/cancel", key).status_code == 202
    final = world.wait_terminal(key, message_id, timeout=10)
    took = time.monotonic() - asked
    assert (final["status"], final["content"], final["cost"], final["model"]) == ("cancelled", "", "0.000000", None)
    assert took < 5.0, f"stop took {took:.2f}s"  # against the 30 s the headers are held
    assert world.api.get("/api/me", key).json["balance"] == "10.000000"
    assert [t for t in world.api.get("/api/me/transactions", key).json["items"] if t["message_id"]] == []


def test_deleting_a_conversation_stops_its_turn(world: World, upstream: UpstreamLog) -> None:
    """Once the conversation is hidden its user can no longer stop the turn, so deleting stops it: it ends
    `cancelled` with the text so far, the upstream call is closed, and the user's slot is free by the time
    the 204 answers."""
    from app.db import transaction
    from app.models import ConversationMessage

    earlier = set(upstream.streams())
    key, message_id, conversation_id = start_turn(world, "echo;words=400;gap=0.05")
    call = wait_for(lambda: next((c for c, state in upstream.streams().items()
                                  if c not in earlier and state == "streaming"), None), what="the model to be called")
    assert world.api.delete(f"/api/conversations/{conversation_id}", key).status_code == 204
    # Like a stop's answer, the 204 comes once the worker has ended the turn: the user's slot is free.
    with transaction() as session:
        assert session.get_one(ConversationMessage, message_id).status == "cancelled"
    assert world.api.post(f"/api/messages/{message_id}/cancel", key).status_code == 404
    wait_for(lambda: upstream.streams().get(call) == "disconnected", what="upstream to see the close")


def test_stopping_a_pending_turn_or_a_finished_one(world: World) -> None:
    key, message_id, _ = start_turn(world, "echo;ttft=3")  # a worker that claimed it first stops it too
    assert world.api.post(f"/api/messages/{message_id}/cancel", key).status_code == 202
    final = world.wait_terminal(key, message_id)
    assert final["status"] == "cancelled"
    again = world.api.post(f"/api/messages/{message_id}/cancel", key)
    assert again.status_code == 202 and again.json["status"] == "cancelled"
    _, other = world.user("mallory")
    assert world.api.post(f"/api/messages/{message_id}/cancel", other).status_code == 404
    assert world.api.get(f"/api/messages/{message_id}/stream", other).status_code == 404
    assert world.api.post(f"/api/messages/{message_id - 1}/cancel", other).status_code == 404


def test_an_ended_turn_leaves_no_stop_flag_behind(world: World, redis_client: redis.Redis) -> None:
    """A stop flag outlived its turn by two hours, and stopped at once the turn of the same id in a database made
    again under the same Redis keys (a deleted SQLite file), whose ids start over."""
    from app.stop_requests import stop_key

    key, message_id, _ = start_turn(world, "echo;ttft=3")
    assert world.api.post(f"/api/messages/{message_id}/cancel", key).status_code == 202
    assert world.wait_terminal(key, message_id)["status"] == "cancelled"
    wait_for(lambda: redis_client.exists(stop_key(message_id)) == 0, what="the stop flag dropped with the lock")


def test_a_new_turn_meets_nothing_a_database_made_before_left_under_its_id(
        world: World, web_server: str, redis_client: redis.Redis) -> None:
    """A database made again (a deleted SQLite file, `make clean`) numbers its turns from 1 again, under the same
    Redis keys: the live stream and the stop flag of the earlier database's turn of that id, left by a worker
    stopped mid-answer, showed that turn's text to the new turn's readers and stopped the new turn at the lease
    keeper's first look (the answer takes 2 s here)."""
    from sqlalchemy import text

    from app.db import transaction
    from app.live_stream import stream_key
    from app.stop_requests import stop_key

    agent_id = world.agent(world.model(upstream="echo;words=10;gap=0.2"))
    _, key = world.user(balance="10")
    conversation_id = world.conversation(key, agent_id)
    with transaction() as session:  # the user's message takes the next id, the answer the one after it
        last, called = session.execute(text("SELECT last_value, is_called FROM conversation_messages_id_seq")).one()
    answer_id = last + (2 if called else 1)
    redis_client.xadd(stream_key(answer_id), {"type": "delta", "a": 100, "o": 0, "data": "someone else's secret"})
    redis_client.set(stop_key(answer_id), 1)
    assert world.send(key, conversation_id, "hello").json["assistant_message"]["id"] == answer_id
    events = read_sse(f"{web_server}/api/messages/{answer_id}/stream", key)
    done = events[-1].json()
    assert (events[-1].event, done["status"]) == ("done", "success")
    assert "".join(e.json()["text"] for e in events if e.event == "delta") == done["content"] == \
        " ".join(f"w{i}" for i in range(10))


def test_a_turn_is_stopped_by_the_id_of_its_user_message_too(world: World) -> None:
    """Both messages of a turn carry its status; a stop naming the user's message was a 404 for a message the
    caller owns."""
    key, answer_id, _ = start_turn(world, "echo;ttft=3")
    stopped = world.api.post(f"/api/messages/{answer_id - 1}/cancel", key)
    assert (stopped.status_code, stopped.json["id"], stopped.json["role"]) == (202, answer_id - 1, "user")
    assert world.wait_terminal(key, answer_id)["status"] == "cancelled"
    assert world.api.get(f"/api/messages/{answer_id - 1}", key).json["status"] == "cancelled"


@contextmanager
def a_stop_at_the_settlement(database: str, conversation_id: int) -> Iterator[None]:
    """A trigger records a stop in the same UPDATE that gives the conversation's turn's lease up: the stop
    lands after the worker's last look for one and before the turn's end is written."""
    import psycopg

    trigger = f"agentq_test_late_stop_{conversation_id}"
    with psycopg.connect(database.replace("+psycopg", ""), autocommit=True) as admin:
        admin.execute("CREATE OR REPLACE FUNCTION agentq_test_late_stop() RETURNS trigger LANGUAGE plpgsql AS "
                      "$$ BEGIN NEW.cancel_requested_at := now(); RETURN NEW; END $$")
        admin.execute(f"CREATE TRIGGER {trigger} BEFORE UPDATE ON turns FOR EACH ROW WHEN (OLD.lease_token IS NOT "
                      f"NULL AND NEW.lease_token IS NULL AND NEW.conversation_id = {int(conversation_id)}) "
                      "EXECUTE FUNCTION agentq_test_late_stop()")
        try:
            yield
        finally:
            admin.execute(f"DROP TRIGGER IF EXISTS {trigger} ON turns")


def a_turn_stopped_at_its_settlement(
        world: World, database: str, upstream: str, content: str) -> tuple[str, int, dict[str, Any]]:
    """A user with 10 of credit sends `content` to a model at 1 a 1k tokens served as `upstream`, and a stop
    lands at the turn's settlement: the user's key, the conversation and the turn as it ended."""
    agent_id = world.agent(world.model(upstream=upstream, price_in="1", price_out="1"))
    _, key = world.user(balance="10")
    conversation_id = world.conversation(key, agent_id)
    with a_stop_at_the_settlement(database, conversation_id):
        message_id = world.send(key, conversation_id, content).json["assistant_message"]["id"]
        return key, conversation_id, world.wait_terminal(key, message_id)


def test_a_stop_that_lands_after_the_workers_last_look_still_ends_the_turn_cancelled(
        world: World, database: str) -> None:
    """The stop's 202 promised `cancelled`; the worker looks for a stop twice a second, so one can land after
    its last look and before its answer is written. The turn ends `cancelled` with the whole answer,
    charged for all of it (every token was generated), and adds no tokens to the conversation's total."""
    key, conversation_id, final = a_turn_stopped_at_its_settlement(world, database, "echo", "finish anyway")
    message_id = final["id"]
    assert (final["status"], final["content"], final["error_message"]) == (
        "cancelled", "echo: finish anyway", "stopped on request")
    assert (final["prompt_tokens"], final["completion_tokens"], final["cost"]) == (9, 3, "0.012000")
    cost = Decimal(final["cost"])
    ledger = world.api.get("/api/me/transactions", key).json["items"]
    assert [(t["message_id"], t["amount"]) for t in ledger] == [(message_id, f"{-cost:.6f}"), (None, "10.000000")]
    assert world.api.get(f"/api/conversations/{conversation_id}", key).json["total_tokens"] == 0


def test_a_stop_that_lands_before_a_failures_end_is_written_ends_the_turn_cancelled_unpaid(
        world: World, database: str) -> None:
    """The same promise when the model failed meanwhile (a stream cut after two chunks, no fallback): the
    turn ends `cancelled`, not `llm_error`, keeps the text the failed attempt streamed, and, that text
    being a failed attempt's, is not charged."""
    key, _, final = a_turn_stopped_at_its_settlement(world, database, "echo;cut_after=2;words=6", "fail anyway")
    assert (final["status"], final["error_message"], final["cost"]) == ("cancelled", "stopped on request", None)
    assert final["content"] == "w0 w1"
    assert [(t["message_id"], t["amount"]) for t in world.api.get("/api/me/transactions", key).json["items"]] == [
        (None, "10.000000")]
    assert world.api.get("/api/me", key).json["balance"] == "10.000000"


def test_two_hundred_concurrent_readers_on_one_api_process(world: World, database: str) -> None:
    port = free_port()
    # 200 streams and a quarter of the threads kept for other requests (`app.stream_slots.streams_for`)
    web = Process("web-sse", agentq("web", "--port", str(port), "--workers", "1", "--threads", "272"),
                  child_env(AGENTQ_MAX_STREAMS_PER_USER="200"), LOG_DIR).start()
    try:
        url = f"http://127.0.0.1:{port}"
        wait_http(f"{url}/healthz")
        agent_id = world.agent(world.model(upstream="echo;words=20;gap=0.05"))
        _, key = world.user(balance="100")
        messages = []
        for project in range(3):
            conversation_id = world.conversation(key, agent_id, project_id=project)
            messages.append(world.send(key, conversation_id, f"reader test {project}").json["assistant_message"]["id"])

        def reader(i: int) -> tuple[str, str]:
            events = read_sse(f"{url}/api/messages/{messages[i % 3]}/stream", key, timeout=120)
            return visible_text(events), events[-1].json()["content"]

        with ThreadPoolExecutor(200) as pool:
            results = list(pool.map(reader, range(200)))
        assert len(results) == 200
        assert all(text == content and content.endswith("w19") for text, content in results)
        assert httpx.get(f"{url}/healthz").status_code == 200
        assert "Traceback" not in web.output()
    finally:
        web.stop()


def _web_holding_two_streams_a_user(name: str, heartbeat: str, **env: str) -> tuple[Process, int]:
    """An API process of the test's own whose users may each hold two answer streams; its port."""
    port = free_port()
    web = Process(name, agentq("web", "--port", str(port), "--workers", "1", "--threads", "16"),
                  child_env(AGENTQ_MAX_STREAMS_PER_USER="2", AGENTQ_STREAM_HEARTBEAT_SECONDS=heartbeat, **env), LOG_DIR)
    return web.start(), port


def _a_turn_that_waits_for_its_model(world: World, user: str) -> tuple[int, str, int]:
    """A new user's id and key, and their turn whose model says nothing for a minute (its stream stays quiet)."""
    agent_id = world.agent(world.model(upstream="echo;ttft=60"))
    user_id, key = world.user(user)
    return user_id, key, world.send(key, world.conversation(key, agent_id), "take your time").json[
        "assistant_message"]["id"]


def test_each_user_holds_a_bounded_number_of_open_streams_per_api_process(world: World) -> None:
    """An open stream holds a server thread, so one user cannot take them all: beyond the bound a stream is
    refused with 429 `too_many_streams`, other users are not affected, and a closed stream frees its slot
    (the server notices at its next write, a heartbeat at the latest)."""
    agent_id = world.agent(world.model(upstream="echo;words=400;gap=0.05"))
    (_, key), (_, other_key) = world.user("alice"), world.user("bob")
    message_id, other_message_id = (world.send(k, world.conversation(k, agent_id), "stream me")
                                    .json["assistant_message"]["id"] for k in (key, other_key))
    web, port = _web_holding_two_streams_a_user("web-stream-cap", heartbeat="0.3")
    url = f"http://127.0.0.1:{port}/api/messages/{{}}/stream"
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz")
        with httpx.Client(timeout=30, headers={"Authorization": f"Bearer {key}"}) as mine, \
                httpx.Client(timeout=30, headers={"Authorization": f"Bearer {other_key}"}) as theirs:
            first = mine.send(mine.build_request("GET", url.format(message_id)), stream=True)
            second = mine.send(mine.build_request("GET", url.format(message_id)), stream=True)
            assert (first.status_code, second.status_code) == (200, 200)
            refused = mine.get(url.format(message_id))
            assert refused.status_code == 429
            assert refused.json()["error"]["code"] == "too_many_streams"
            other = theirs.send(theirs.build_request("GET", url.format(other_message_id)), stream=True)
            assert other.status_code == 200
            other.close()
            first.close()

            def admitted() -> bool:
                response = mine.send(mine.build_request("GET", url.format(message_id)), stream=True)
                response.close()
                return response.status_code == 200

            wait_for(admitted, timeout=10, what="the closed stream's slot to be freed")
            second.close()
        assert "Traceback" not in web.output()
    finally:
        web.stop()
        for k, m in ((key, message_id), (other_key, other_message_id)):
            world.api.post(f"/api/messages/{m}/cancel", k)


def test_a_stream_its_client_closed_frees_its_slot_while_the_turn_is_quiet(world: World) -> None:
    """A closed stream was noticed only when a write to it failed, a heartbeat or two after the close: a client
    that closed its streams while the model had not answered yet, and reconnected, was refused 429 for up to
    half a minute though it held none. The server looks at the connection between reads of the live stream."""
    _, key, message_id = _a_turn_that_waits_for_its_model(world, "reconnects")
    web, port = _web_holding_two_streams_a_user("web-closed-streams", heartbeat="60")
    url = f"http://127.0.0.1:{port}/api/messages/{message_id}/stream"
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz")
        with httpx.Client(timeout=30, headers={"Authorization": f"Bearer {key}"}) as client:
            for _ in range(2):
                with client.stream("GET", url) as opened:
                    assert opened.status_code == 200
                    # All the server sent is read (the `status` event, ending in its blank line): closed with
                    # nothing left unread, the connection ends in order, and the server's next write succeeds.
                    lines = opened.iter_lines()
                    while not next(lines).startswith("data:"):
                        pass
                    assert next(lines) == ""
            closed_at = time.monotonic()

            def admitted() -> bool:
                with client.stream("GET", url) as response:
                    return response.status_code == 200

            wait_for(admitted, timeout=9, interval=0.2, what="a slot freed by a closed stream")
            print(f"\nslots freed {time.monotonic() - closed_at:.2f}s after the close (heartbeat 60 s)")
        assert "Traceback" not in web.output()
    finally:
        web.stop()
        world.api.post(f"/api/messages/{message_id}/cancel", key)


def test_a_stream_whose_client_stopped_reading_is_closed_and_frees_its_slot(world: World) -> None:
    """A client that stopped reading without closing held its stream's thread in a write for as long as it stayed
    connected, once the socket's buffers were full, and one of its user's stream slots with it. A write that cannot
    start within `AGENTQ_STREAM_WRITE_TIMEOUT_SECONDS` now ends the response."""
    long_answer = world.agent(world.model(name="long", upstream="echo;words=20000;word=" + "x" * 170),
                              max_tokens=100_000)  # its 3.4 MB within the answer's bound, past any socket buffer
    quiet = world.agent(world.model(name="quiet", upstream="echo;ttft=60"))
    _, key = world.user("stops-reading")
    flood = world.send(key, world.conversation(key, long_answer), "a lot").json["assistant_message"]["id"]
    waiting = world.send(key, world.conversation(key, quiet), "take your time").json["assistant_message"]["id"]
    web, port = _web_holding_two_streams_a_user("web-stalled-stream", heartbeat="60",
                                                AGENTQ_STREAM_WRITE_TIMEOUT_SECONDS="1")
    url = f"http://127.0.0.1:{port}/api/messages/{{}}/stream"
    stalled = socket.socket()
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz")
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stalled.connect(("127.0.0.1", port))
        stalled.sendall(f"GET /api/messages/{flood}/stream HTTP/1.1\r\nHost: agentq\r\n"
                        f"Authorization: Bearer {key}\r\n\r\n".encode())
        stalled.settimeout(30)
        # Its answer begun (read without taking it), it holds one of the user's two slots before the other stream
        # asks: on a loaded host the other was served first, and the one nobody reads was refused 429.
        assert stalled.recv(12, socket.MSG_PEEK) == b"HTTP/1.1 200"
        with httpx.Client(timeout=30, headers={"Authorization": f"Bearer {key}"}) as client:
            held = client.send(client.build_request("GET", url.format(waiting)), stream=True)
            assert held.status_code == 200

            def admitted() -> bool:
                with client.stream("GET", url.format(waiting)) as response:
                    return response.status_code == 200

            wait_for(admitted, timeout=60, interval=0.5, what="the slot of the stream nobody reads to be freed")
            held.close()
        received = bytearray()
        while chunk := stalled.recv(65536):
            received += chunk
        assert b"event: delta" in received
        assert b"event: done" not in received
        output = web.output()
        assert "took nothing for 1.0 s; its connection is closed" in output
        assert "Traceback" not in output
    finally:
        stalled.close()
        web.stop()
        world.api.post(f"/api/messages/{waiting}/cancel", key)


def test_a_replaced_key_ends_the_streams_it_opened(world: World) -> None:
    """A key replaced (a leak) stopped its requests, but the streams it had opened ran to their end, up to
    `AGENTQ_STREAM_MAX_SECONDS`. They now end, without `done`, at the reader's next look, and the reconnect
    with the old key is refused 401."""
    user_id, key, message_id = _a_turn_that_waits_for_its_model(world, "leaked")
    web, port = _web_holding_two_streams_a_user("web-replaced-key", heartbeat="0.3")
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{base}/healthz")
        with httpx.Client(timeout=15) as client:
            with client.stream("GET", f"{base}/api/messages/{message_id}/stream",
                               headers={"Authorization": f"Bearer {key}"}) as opened:
                assert opened.status_code == 200
                lines = opened.iter_lines()
                assert next(lines) == "retry: 1000"
                replaced = client.post(f"{base}/api/admin/users/{user_id}/api-key",
                                       headers={"Authorization": f"Bearer {world.admin_key}"})
                assert replaced.status_code == 200
                key = replaced.json()["api_key"]
                rest = list(lines)  # ends: the server closed the response
            assert "event: done" not in rest
            again = client.get(f"{base}/api/messages/{message_id}/stream",
                               headers={"Authorization": f"Bearer {opened.request.headers['Authorization'][7:]}"})
            assert (again.status_code, again.json()["error"]["code"]) == (401, "invalid_api_key")
        assert "Traceback" not in web.output()
    finally:
        web.stop()
        world.api.post(f"/api/messages/{message_id}/cancel", key)


@contextmanager
def _four_thread_api(name: str, *, open_files: int | None = None, **env: str) -> Iterator[tuple[Process, str]]:
    """One `agentq web` process of 4 threads (with at most `open_files` open), and its URL."""
    port = free_port()
    argv = agentq("web", "--port", str(port), "--workers", "1", "--threads", "4")
    if open_files is not None:
        argv = ["prlimit", f"--nofile={open_files}:{open_files}", *argv]
    web = Process(name, argv, child_env(**env), LOG_DIR).start()
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz")
        yield web, f"http://127.0.0.1:{port}"
    finally:
        web.kill_group()


@contextmanager
def _clients(url: str, count: int, sending: bytes | list[bytes] = b"") -> Iterator[list[socket.socket]]:
    """`count` connections to the API, each having sent `sending` (or its own of a list), closed at the end."""
    port = int(url.rsplit(":", 1)[1])
    connections: list[socket.socket] = []
    try:
        for index in range(count):
            connection = socket.create_connection(("127.0.0.1", port), timeout=15)
            connections.append(connection)
            connection.sendall(sending[index] if isinstance(sending, list) else sending)
        yield connections
    finally:
        for connection in connections:
            connection.close()


def _read_to_the_end(connection: socket.socket, deadline: float | None = None) -> bytes:
    """What the server sends until its FIN (by `deadline`, a `time.monotonic()`, when one is given)."""
    answer = b""
    while True:
        if deadline is not None:
            connection.settimeout(max(deadline - time.monotonic(), 0.001))
        if not (chunk := connection.recv(65536)):
            return answer
        answer += chunk


def test_connections_that_send_nothing_hold_no_thread_and_no_stop() -> None:
    """gunicorn 27 gave each new connection a thread that waited up to 5 s for its first bytes: with 4 threads,
    8 connections that sent nothing (preconnects, TCP health checks, slow clients) held every request of the
    process for 10 s. They wait in the poller now: a request is answered at once, one of them that speaks at
    last is answered, and a stop is not held by the others for gunicorn's graceful timeout (30 s)."""
    with _four_thread_api("web-silent-connections") as (web, url), _clients(url, 8) as silent:
        assert httpx.get(f"{url}/healthz", timeout=5).status_code == 200
        silent[0].sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert _read_to_the_end(silent[0]).startswith(b"HTTP/1.1 200 ")
        assert web.popen is not None
        os.killpg(web.pid, signal.SIGTERM)
        assert web.popen.wait(timeout=15) == 0
        assert "Traceback" not in web.output()


def _peer_ports(pid: int) -> set[int]:
    """The remote ports of the IPv4 TCP sockets process `pid` holds open."""
    inodes = set()
    for descriptor in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{descriptor}")
        except FileNotFoundError:  # closed meanwhile
            continue
        if link.startswith("socket:["):
            inodes.add(int(link[len("socket:["):-1]))
    with open("/proc/net/tcp") as table:
        rows = [line.split() for line in table.readlines()[1:]]
    return {int(row[2].split(":")[1], 16) for row in rows if int(row[9]) in inodes}


def test_connections_the_server_closes_while_their_clients_keep_them_open_hold_up_nothing() -> None:
    """A connection the server closes (here `Connection: close`) lingers until its client closes too; gunicorn
    27 lingered on its event loop, 2 s a connection, one after the other: 8 clients that kept theirs open held
    every request of the process 16 s. All get their answer and the server's FIN at once, another client is
    answered meanwhile, and the server closes them in the end."""
    closing = b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    with _four_thread_api("web-lingering-clients") as (web, url), _clients(url, 8, closing) as lingering:
        [worker] = web.children()
        deadline = time.monotonic() + 5  # one after the other, gunicorn's lingering took 16 s
        for client in lingering:  # each answer, then the server's FIN, while the client keeps its side open
            answer = _read_to_the_end(client, deadline)
            assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b'{"status":"ok"}\n')
        assert httpx.get(f"{url}/healthz", timeout=5).status_code == 200
        # and each connection is closed once its 2 s are up, though its client never closes it
        ports = {client.getsockname()[1] for client in lingering}
        wait_for(lambda: not _peer_ports(worker) & ports, timeout=30, what="the lingering connections to be closed")
        assert "Traceback" not in web.output()


def test_a_worker_out_of_file_descriptors_pauses_accepting_instead_of_ending() -> None:
    """gunicorn let an `accept` failing with EMFILE end the worker, every request and stream it served with it,
    and its replacement the same way while the clients went on. With 128 open files at most and 150 silent
    connections, the worker pauses accepting, says so once, and serves again once they close."""
    with _four_thread_api("web-out-of-files", open_files=128) as (web, url):
        worker = web.children()
        with _clients(url, 150):
            wait_for(lambda: "no new connection can be taken (Too many open files)" in web.output(), timeout=30,
                     what="the worker to run out of file descriptors")
        assert httpx.get(f"{url}/healthz", timeout=10).status_code == 200
        assert web.children() == worker
        assert "Traceback" not in web.output()


def test_a_worker_holding_its_most_connections_closes_its_oldest_idle_ones_to_take_new_ones() -> None:
    """At gunicorn's `worker_connections` (1,000) a worker accepted nothing until one closed, and a connection
    that sent nothing is kept up to the keep-alive time (75 s): a thousand silent ones shut it to everyone for
    that long. It closes the oldest idle ones instead, and a new client is answered at once."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < 2048:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(4096, hard) if hard != resource.RLIM_INFINITY else 4096, hard))
    with _four_thread_api("web-full", open_files=4096) as (web, url):
        worker = web.children()
        with _clients(url, 1000) as silent:
            assert httpx.get(f"{url}/healthz", timeout=10).status_code == 200
            assert "1000 connections held (worker_connections): the oldest idle ones are closed" in web.output()
            assert silent[0].recv(1) == b""  # the oldest, closed by the server
        assert web.children() == worker
        assert "Traceback" not in web.output()


def test_a_lingering_connection_is_waited_for_until_its_client_closes_or_its_time_is_up() -> None:
    """A stopping worker waits for its lingering connections (`ConnectionIntake.run`): the thread holding them ends
    with the process, and the kernel would reset them."""
    from web.lingering_close import Lingerer

    lingerer = Lingerer()
    server, client = socket.socketpair()
    with client:
        lingerer.close(server)
        assert client.recv(1) == b""  # the server's FIN at once
        assert not lingerer.wait_idle(0.2)  # the client keeps its side open
        client.sendall(b"unread bytes, read and dropped")
        assert not lingerer.wait_idle(0.2)
    assert lingerer.wait_idle(5)
    assert server.fileno() == -1


def test_a_client_that_stalls_in_the_middle_of_a_request_is_cut_after_the_client_timeout(world: World) -> None:
    """gunicorn read a request on a blocking socket with no timeout: a client that sent part of its request line,
    its headers or its body and then nothing held its thread for as long as it kept the connection, and four of
    them every request of a 4-thread process. Past AGENTQ_CLIENT_TIMEOUT_SECONDS each is closed, a stalled body
    answered 408 first, with one warning line a client and no traceback; no turn is made of the half body."""
    _, key = world.user("stalled-body")
    conversation = world.conversation(key, world.agent(world.model()))
    half_body = (f"POST /api/conversations/{conversation}/messages HTTP/1.1\r\nHost: x\r\n"
                 f"Authorization: Bearer {key}\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n"
                 '{"content":').encode()
    starts = [b"G", b"GET /healthz HTTP/1.1\r\nHost: x\r\n", half_body, half_body]
    with (_four_thread_api("web-stalled-clients", AGENTQ_CLIENT_TIMEOUT_SECONDS="1") as (web, url),
          _clients(url, 4, starts) as stalled):
        answers = [_read_to_the_end(client) for client in stalled]
        assert answers[:2] == [b"", b""]
        for answer in answers[2:]:
            head, _, body = answer.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 408 ")
            assert json.loads(body)["error"] == {"code": "request_timeout",
                                                 "message": "The request body stopped arriving before its end."}
        assert httpx.get(f"{url}/healthz", timeout=5).status_code == 200
        assert world.api.get(f"/api/conversations/{conversation}/messages", key).json["items"] == []
        output = web.output()
        assert "Traceback" not in output
        assert output.count("a client sent or took nothing for longer than its timeout in the middle of a request") >= 2


def test_each_connection_waits_the_client_timeout_at_most_and_a_stream_gives_it_back_when_it_ends() -> None:
    """The send side of the client timeout (a client that stops reading a large response), which an answer
    stream replaces with its own write timeout while it lasts, and gives back for the connection's next
    requests."""
    from web.client_timeouts import bound_client_waits, timeval
    from web.sse import ClientConnection

    server, client = socket.socketpair()
    with server, client:
        bound_client_waits(server, 60)
        for option in (socket.SO_RCVTIMEO, socket.SO_SNDTIMEO):
            assert server.getsockopt(socket.SOL_SOCKET, option, len(timeval(0))) == timeval(60)
        stream = ClientConnection(server, 30)  # a stream refused before it starts leaves the connection as it was
        assert server.getsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, len(timeval(0))) == timeval(60)
        stream.stream_started()
        assert server.getsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, len(timeval(0))) == timeval(30)
        stream.stream_ended()
        assert server.getsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, len(timeval(0))) == timeval(60)


def test_an_api_process_keeps_a_quarter_of_its_threads_for_requests_other_than_streams(world: World) -> None:
    """Each user within their bound, many users' streams took every thread of a process, and every other
    request waited for one to end. With 4 threads a process holds 3 streams; the fourth is refused, a POST
    and /healthz are still answered at once, and a closed stream lets the next one in."""
    agent_id = world.agent(world.model(upstream="echo;words=400;gap=0.05"))
    users = [world.user(f"reader-{index}") for index in range(4)]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    web = Process("web-stream-total", agentq("web", "--port", str(port), "--workers", "1", "--threads", "4"),
                  child_env(AGENTQ_STREAM_HEARTBEAT_SECONDS="0.3"), LOG_DIR).start()
    messages = [world.send(key, world.conversation(key, agent_id), "stream me").json["assistant_message"]["id"]
                for _, key in users]
    try:
        wait_http(f"{url}/healthz")
        clients = [httpx.Client(timeout=30, headers={"Authorization": f"Bearer {key}"}) for _, key in users]
        streams = [client.send(client.build_request("GET", f"{url}/api/messages/{message}/stream"), stream=True)
                   for client, message in zip(clients[:3], messages[:3], strict=True)]
        assert [stream.status_code for stream in streams] == [200, 200, 200]
        refused = clients[3].get(f"{url}/api/messages/{messages[3]}/stream")
        assert (refused.status_code, refused.json()["error"]["code"]) == (429, "too_many_streams")
        assert "holds all the answer streams it can (3)" in refused.json()["error"]["message"]
        assert httpx.get(f"{url}/healthz", timeout=5).status_code == 200
        conversation = clients[3].post(f"{url}/api/conversations", json={"agent_id": agent_id}, timeout=5)
        assert conversation.status_code == 201
        streams[0].close()

        def admitted() -> bool:
            response = clients[3].send(clients[3].build_request("GET", f"{url}/api/messages/{messages[3]}/stream"),
                                       stream=True)
            response.close()
            return response.status_code == 200

        wait_for(admitted, timeout=10, what="the closed stream's thread to be freed")
        for stream in streams[1:]:
            stream.close()
        for client in clients:
            client.close()
        assert "Traceback" not in web.output()
    finally:
        web.stop()
        for (_, key), message in zip(users, messages, strict=True):
            world.api.post(f"/api/messages/{message}/cancel", key)


def test_a_quiet_stream_gets_its_heartbeat_when_it_is_due_not_a_blocking_read_later(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """Heartbeats were looked for only after whole blocking reads of the live stream (4 s each): one due
    every 5 s came at 8 s, and a proxy whose idle timeout is the heartbeat's cut the stream."""
    from app.answer_stream import HEARTBEAT, follow_answer
    from app.config import get_settings

    key, message_id, _ = start_turn(world, "echo;ttft=30")
    monkeypatch.setenv("AGENTQ_STREAM_HEARTBEAT_SECONDS", "5")
    get_settings.cache_clear()
    try:
        events, last_event = follow_answer(message_id, None), time.monotonic()
        for event in events:  # the status at connect, then the worker's `processing`; no text for 30 s
            if event.event == HEARTBEAT:
                break
            assert event.event == "status"
            last_event = time.monotonic()
        waited = time.monotonic() - last_event
        events.close()
    finally:
        monkeypatch.undo()
        get_settings.cache_clear()
        world.api.post(f"/api/messages/{message_id}/cancel", key)
    assert 4.9 <= waited <= 6.5, f"the heartbeat came after {waited:.2f}s"  # it came at 8 s


def test_a_stop_survives_redis_losing_its_flag(world: World, redis_client: redis.Redis) -> None:
    """The worker reads stop requests from the database too, with each lease renewal: a stop recorded there
    alone (its Redis flag lost, here never written) ends the turn long before its 20 s answer would."""
    from sqlalchemy import update

    from app.db import transaction
    from app.models import Turn
    from app.models.base import utc_now
    from app.stop_requests import stop_key

    key, message_id, _ = start_turn(world, "echo;words=400;gap=0.05")
    wait_for(lambda: world.message(key, message_id)["content"], what="the answer's first words")
    with transaction() as session:
        session.execute(update(Turn).where(Turn.assistant_message_id == message_id)
                        .values(cancel_requested_at=utc_now()))
    assert redis_client.exists(stop_key(message_id)) == 0
    final = world.wait_terminal(key, message_id, timeout=10)
    assert final["status"] == "cancelled"
    assert 0 < len(final["content"].split()) < 400


def test_deltas_queued_together_are_published_as_one_entry_per_stream_and_attempt() -> None:
    """What the publisher sends in one pipeline: contiguous deltas joined, nothing else merged or reordered."""
    from collections import deque

    from app.live_stream_writer import StreamFields, _coalesce

    queued: deque[tuple[str, StreamFields, bool]] = deque([
        ("s1", {"type": "status", "a": 100, "data": "{}"}, True),
        ("s1", {"type": "delta", "a": 100, "o": 0, "data": "Hel"}, False),
        ("s2", {"type": "delta", "a": 100, "o": 0, "data": "x"}, False),
        ("s1", {"type": "delta", "a": 100, "o": 3, "data": "lo"}, False),
        ("s1", {"type": "delta", "a": 101, "o": 0, "data": "new"}, False),
        ("s1", {"type": "delta", "a": 101, "o": 3, "data": "er"}, False),
        ("s2", {"type": "delta", "a": 100, "o": 1, "data": "y"}, False),
        ("s1", {"type": "done", "a": 101, "data": "{}"}, True),
        ("s1", {"type": "delta", "a": 101, "o": 9, "data": "late"}, False),
    ])
    assert _coalesce(queued) == [
        ("s1", {"type": "status", "a": 100, "data": "{}"}, True),
        ("s1", {"type": "delta", "a": 100, "o": 0, "data": "Hello"}, False),
        ("s2", {"type": "delta", "a": 100, "o": 0, "data": "xy"}, False),
        ("s1", {"type": "delta", "a": 101, "o": 0, "data": "newer"}, False),
        ("s1", {"type": "done", "a": 101, "data": "{}"}, True),
        ("s1", {"type": "delta", "a": 101, "o": 9, "data": "late"}, False),
    ]
    assert not queued


def test_a_readers_response_outlasts_the_longest_turn_the_default_settings_allow() -> None:
    """The contract's stream ends with `done`, after which the server closes: with the defaults, a response
    closed after 3,900 s, before a turn with a fallback at the longest timeout (two attempts of 3,600 s) had
    ended, and a reader that does not reconnect never saw its `done`."""
    from app.config import Settings
    from app.models.catalog import TIMEOUT_SECONDS_RANGE

    def default(name: str) -> float:
        return float(Settings.model_fields[name].default)

    longest_turn = (default("max_pending_seconds") + 2 * TIMEOUT_SECONDS_RANGE[1] + default("turn_grace_seconds")
                    + default("lease_seconds") + default("recovery_interval_seconds"))
    assert default("stream_max_seconds") > longest_turn
