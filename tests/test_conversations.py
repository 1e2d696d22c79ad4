"""Conversation rules: de-duplication, the listing filter and order, deletion, statistics."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from tests.support import wait_for

if TYPE_CHECKING:
    from tests.conftest import UpstreamLog, Workers, World


@pytest.fixture(autouse=True)
def _running(workers: Workers, upstream: UpstreamLog) -> None:
    """Turns here run on a real worker."""


def test_creating_twice_within_the_window_returns_the_same_empty_conversation(world: World) -> None:
    agent_id = world.agent(world.model())
    _, key = world.user()
    first = world.api.post("/api/conversations", key, {"agent_id": agent_id, "project_id": 7})
    again = world.api.post("/api/conversations", key, {"agent_id": agent_id, "project_id": 7})
    assert (first.status_code, again.status_code) == (201, 200)
    assert again.json["id"] == first.json["id"]
    other_project = world.api.post("/api/conversations", key, {"agent_id": agent_id, "project_id": 8})
    no_project = world.api.post("/api/conversations", key, {"agent_id": agent_id})
    assert (other_project.status_code, no_project.status_code) == (201, 201)
    assert len({first.json["id"], other_project.json["id"], no_project.json["id"]}) == 3
    _, other_key = world.user("bob")
    theirs = world.api.post("/api/conversations", other_key, {"agent_id": agent_id, "project_id": 7})
    assert theirs.status_code == 201 and theirs.json["id"] != first.json["id"]


def test_a_conversation_with_messages_is_not_reused(world: World) -> None:
    agent_id = world.agent(world.model())
    _, key = world.user()
    first = world.conversation(key, agent_id)
    world.wait_terminal(key, world.send(key, first).json["assistant_message"]["id"])
    second = world.api.post("/api/conversations", key, {"agent_id": agent_id})
    assert second.status_code == 201 and second.json["id"] != first


def test_an_empty_conversation_older_than_the_window_is_not_reused(world: World) -> None:
    """The window bounds the reuse: a user coming back to an agent after it creates a new conversation."""
    from datetime import timedelta

    from sqlalchemy import update

    from app.config import get_settings
    from app.db import transaction
    from app.models import Conversation
    from app.models.base import utc_now

    agent_id = world.agent(world.model())
    _, key = world.user()
    first = world.api.post("/api/conversations", key, {"agent_id": agent_id})
    window = timedelta(seconds=get_settings().dedup_window_seconds)
    with transaction() as session:
        session.execute(update(Conversation).where(Conversation.id == first.json["id"])
                        .values(created_at=utc_now() - window - timedelta(seconds=1)))
    again = world.api.post("/api/conversations", key, {"agent_id": agent_id})
    assert (first.status_code, again.status_code) == (201, 201) and again.json["id"] != first.json["id"]


def test_dedup_window_zero_always_creates(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    from app.config import Settings, get_settings

    agent_id = world.agent(world.model())
    _, key = world.user()
    monkeypatch.setattr("app.conversations.get_settings",
                        lambda: Settings(**{**get_settings().model_dump(), "dedup_window_seconds": 0}))
    a = world.api.post("/api/conversations", key, {"agent_id": agent_id})
    b = world.api.post("/api/conversations", key, {"agent_id": agent_id})
    assert (a.status_code, b.status_code) == (201, 201) and a.json["id"] != b.json["id"]


def test_listing_shows_only_conversations_with_a_successful_answer_newest_first(world: World) -> None:
    good = world.model("good")
    bad = world.model("bad", upstream="echo;fail=503")
    good_agent, bad_agent = world.agent(good), world.agent(bad)
    _, key = world.user()
    empty = world.conversation(key, good_agent, project_id=1)
    failed = world.conversation(key, bad_agent)
    world.wait_terminal(key, world.send(key, failed).json["assistant_message"]["id"])
    answered = []
    for project in (2, 3, 4):
        conversation_id = world.conversation(key, good_agent, project_id=project)
        world.wait_terminal(key, world.send(key, conversation_id).json["assistant_message"]["id"])
        answered.append(conversation_id)
    listing = world.api.get("/api/conversations", key).json
    assert [c["id"] for c in listing["items"]] == list(reversed(answered))
    assert listing["next_cursor"] is None
    assert empty not in [c["id"] for c in listing["items"]]
    # parameters sent empty, as the contract writes the route, are parameters not sent (`limit` was a 422)
    assert world.api.get("/api/conversations?limit=&cursor=", key).json == listing
    everything = world.api.get("/api/me/transactions", key).json
    assert world.api.get("/api/me/transactions?limit=&cursor=", key).json == everything

    page1 = world.api.get("/api/conversations?limit=2", key).json
    assert [c["id"] for c in page1["items"]] == [answered[2], answered[1]]
    page2 = world.api.get(f"/api/conversations?limit=2&cursor={page1['next_cursor']}", key).json
    assert [c["id"] for c in page2["items"]] == [answered[0]]
    assert page2["next_cursor"] is None

    world.wait_terminal(key, world.send(key, answered[0], "again").json["assistant_message"]["id"])
    assert world.api.get("/api/conversations", key).json["items"][0]["id"] == answered[0]


def test_deleting_hides_the_conversation_and_its_messages(world: World) -> None:
    agent_id = world.agent(world.model())
    _, key = world.user()
    conversation_id = world.conversation(key, agent_id)
    assistant = world.send(key, conversation_id).json["assistant_message"]
    world.wait_terminal(key, assistant["id"])
    deleted = world.api.delete(f"/api/conversations/{conversation_id}", key)
    assert (deleted.status_code, deleted.data, "Content-Type" in deleted.headers) == (204, b"", False)
    assert world.api.get(f"/api/conversations/{conversation_id}", key).status_code == 404
    assert world.api.get(f"/api/conversations/{conversation_id}/messages", key).status_code == 404
    assert world.api.get(f"/api/messages/{assistant['id']}", key).status_code == 404
    assert world.send(key, conversation_id).status_code == 404
    assert world.api.get("/api/conversations", key).json["items"] == []
    assert world.api.delete(f"/api/conversations/{conversation_id}", key).status_code == 404


def test_statistics_count_every_message_and_only_successful_tokens(world: World) -> None:
    good, bad = world.model("good"), world.model("bad", upstream="echo;fail=429")
    agent_id = world.agent(good)
    _, key = world.user()
    conversation_id = world.conversation(key, agent_id)
    ok = world.wait_terminal(key, world.send(key, conversation_id, "a b c").json["assistant_message"]["id"])
    world.api.patch(f"/api/admin/agents/{agent_id}", world.admin_key, {"model_id": bad})
    failed = world.wait_terminal(key, world.send(key, conversation_id).json["assistant_message"]["id"])
    assert failed["status"] == "llm_error"
    # A stopped turn has tokens (it is paid for those generated), and they are not a success's either.
    world.api.patch(f"/api/admin/agents/{agent_id}", world.admin_key,
                    {"model_id": world.model("slow", upstream="echo;words=400;gap=0.05")})
    slow_id = world.send(key, conversation_id).json["assistant_message"]["id"]
    wait_for(lambda: world.message(key, slow_id)["content"], what="the slow answer's first words")
    assert world.api.post(f"/api/messages/{slow_id}/cancel", key).status_code == 202
    stopped = world.wait_terminal(key, slow_id)
    assert (stopped["status"], stopped["total_tokens"]) == (
        "cancelled", stopped["prompt_tokens"] + stopped["completion_tokens"])
    assert stopped["completion_tokens"] > 0
    stats = world.api.get(f"/api/conversations/{conversation_id}", key).json
    assert (stats["message_count"], stats["total_tokens"]) == (6, ok["prompt_tokens"] + ok["completion_tokens"])
    assert ok["completion_tokens"] > 0


@pytest.mark.parametrize("batch", [3, 4])
def test_a_conversations_messages_are_listed_whole_across_read_batches(
        world: World, monkeypatch: pytest.MonkeyPatch, batch: int) -> None:
    """The list is read a batch at a time and written as it is read: every message once, in `seq` order,
    whether the last batch is full (3) or not (4), and the same JSON a client would get in one piece."""
    from app import conversations

    monkeypatch.setattr(conversations, "MESSAGE_BATCH", batch)
    agent_id = world.agent(world.model())
    _, key = world.user()
    conversation_id = world.conversation(key, agent_id)
    for question in ("one", "two", "three"):
        answer = world.send(key, conversation_id, question).json["assistant_message"]
        world.wait_terminal(key, answer["id"])
    response = world.api.get(f"/api/conversations/{conversation_id}/messages", key)
    assert (response.status_code, response.mimetype) == (200, "application/json")
    items = response.json["items"]
    assert [m["seq"] for m in items] == [1, 2, 3, 4, 5, 6]
    assert [m["content"] for m in items] == ["one", "echo: one", "two", "echo: two", "three", "echo: three"]
    assert items[1] == world.message(key, items[1]["id"])
