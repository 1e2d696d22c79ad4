"""Admin CRUD of models and agents, what users see of agents, and the service endpoints."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from sqlalchemy import text

if TYPE_CHECKING:
    import pytest
    import redis

    from tests.conftest import Api, World


def test_models_can_be_created_read_changed_and_deleted(world: World) -> None:
    admin = world.admin_key
    created = world.api.post("/api/admin/models", admin, {
        "name": "gpt", "model": "gpt-4o-mini", "base_url": "https://api.example.test/v1", "api_key_env": "GPT_API_KEY",
        "input_price_per_1k": "0.00015", "output_price_per_1k": 0.0006, "context_window": 128000})
    assert created.status_code == 201
    model = created.json
    assert {k: model[k] for k in ("name", "model", "base_url", "api_key_env", "input_price_per_1k",
                                  "output_price_per_1k", "context_window")} == {
        "name": "gpt", "model": "gpt-4o-mini", "base_url": "https://api.example.test/v1", "api_key_env": "GPT_API_KEY",
        "input_price_per_1k": "0.000150", "output_price_per_1k": "0.000600", "context_window": 128000}
    assert world.api.get(f"/api/admin/models/{model['id']}", admin).json == model
    assert [m["id"] for m in world.api.get("/api/admin/models", admin).json["items"]] == [model["id"]]
    patched = world.api.patch(f"/api/admin/models/{model['id']}", admin, {"output_price_per_1k": "0.001"}).json
    assert patched["output_price_per_1k"] == "0.001000" and patched["input_price_per_1k"] == "0.000150"
    assert world.api.delete(f"/api/admin/models/{model['id']}", admin).status_code == 204
    assert world.api.get(f"/api/admin/models/{model['id']}", admin).status_code == 404
    assert world.api.get("/api/admin/models", admin).json["items"] == []
    again = world.api.post("/api/admin/models", admin, {"name": "gpt", "model": "x", "input_price_per_1k": "0",
                                                        "output_price_per_1k": "0"})
    assert again.status_code == 201


def test_a_model_whose_base_url_ends_with_the_path_the_sdk_adds_is_refused(world: World) -> None:
    """A provider's documentation shows the whole path, `…/v1/chat/completions`, and such a base_url was stored:
    the SDK adds `/chat/completions` to it, and every call of every agent on the model answered 404 (`llm_error`)."""
    admin = world.admin_key
    body = {"name": "gpt", "model": "gpt-4o-mini", "input_price_per_1k": "1", "output_price_per_1k": "1"}
    says = ("Invalid value for 'base_url': must be the API's base URL, to which the client adds "
            "/chat/completions: drop /chat/completions from its end (https://host/v1).")
    for url in ("https://api.example.test/v1/chat/completions", "https://api.example.test/v1/Chat/Completions/"):
        refused = world.api.post("/api/admin/models", admin, {**body, "base_url": url})
        assert (refused.status_code, refused.json["error"]["code"]) == (422, "validation_failed")
        assert refused.json["error"]["message"] == says
    model = world.api.post("/api/admin/models", admin, {**body, "base_url": "https://api.example.test/v1"}).json
    patched = world.api.patch(f"/api/admin/models/{model['id']}", admin,
                              {"base_url": "https://api.example.test/v1/chat/completions"})
    assert (patched.status_code, patched.json["error"]["code"]) == (422, "validation_failed")
    assert world.api.get(f"/api/admin/models/{model['id']}", admin).json["base_url"] == "https://api.example.test/v1"


def test_agents_can_be_created_read_changed_and_deleted(world: World) -> None:
    admin = world.admin_key
    primary, fallback = world.model("primary"), world.model("fallback")
    created = world.api.post("/api/admin/agents", admin, {"name": "Helper", "system_prompt": "Be brief.",
                                                          "model_id": primary, "fallback_model_id": fallback,
                                                          "temperature": 0.2, "max_tokens": 256})
    assert created.status_code == 201
    agent = created.json
    assert agent["timeout_seconds"] == 120
    assert (agent["model_id"], agent["fallback_model_id"], float(agent["temperature"]), agent["max_tokens"]) == (
        primary, fallback, 0.2, 256)
    assert world.api.get(f"/api/admin/agents/{agent['id']}", admin).json == agent
    patched = world.api.patch(f"/api/admin/agents/{agent['id']}", admin,
                              {"timeout_seconds": 30, "fallback_model_id": None}).json
    assert (patched["timeout_seconds"], patched["fallback_model_id"], patched["name"]) == (30, None, "Helper")
    _, key = world.user()
    assert world.api.get("/api/agents", key).json == {"items": [{"id": agent["id"], "name": "Helper"}]}
    assert world.api.delete(f"/api/admin/models/{primary}", admin).json["error"]["code"] == "model_in_use"
    assert world.api.delete(f"/api/admin/agents/{agent['id']}", admin).status_code == 204
    assert world.api.get("/api/agents", key).json == {"items": []}
    assert world.api.get(f"/api/admin/agents/{agent['id']}", admin).status_code == 404
    assert world.api.post("/api/conversations", key, {"agent_id": agent["id"]}).status_code == 404
    assert world.api.delete(f"/api/admin/models/{primary}", admin).status_code == 204


def test_service_endpoints(api: Api) -> None:
    assert api.get("/healthz").json == {"status": "ok"}
    ready = api.get("/readyz")
    assert ready.status_code == 200
    assert ready.json == {"status": "ready", "checks": {"database": "ok", "redis": "ok"}}
    document = api.get("/openapi.json").json
    assert document["openapi"].startswith("3.")
    paths = document["paths"]
    for path in ("/api/conversations/{conversation_id}/messages", "/api/messages/{message_id}/stream",
                 "/api/messages/{message_id}/cancel", "/api/admin/agents", "/api/me/transactions"):
        assert path in paths, path
    assert "bearerAuth" in document["components"]["securitySchemes"]
    metrics = api.get("/metrics")
    assert metrics.status_code == 200
    assert "agentq_turns_in_flight" in metrics.get_data(as_text=True)


def test_a_request_that_finds_no_free_database_connection_in_time_is_503_with_retry_after(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """The pool has no overflow: when every connection stays busy past the pool timeout, the API says
    the service is saturated (503, retry shortly) instead of failing with an internal error."""
    import time

    from sqlalchemy import text

    from app.config import get_settings
    from app.db import dispose_engines, transaction

    _, key = world.user()
    world.api.get("/api/me", key)  # the key is known now; the next request needs the pool only once
    monkeypatch.setenv("AGENTQ_DB_POOL_SIZE", "1")
    monkeypatch.setenv("AGENTQ_DB_POOL_TIMEOUT_SECONDS", "0.3")
    get_settings.cache_clear()
    dispose_engines()
    try:
        with transaction() as holder:
            holder.execute(text("SELECT 1"))
            started = time.monotonic()
            saturated = world.api.get("/api/conversations", key)
            waited = time.monotonic() - started
        assert saturated.status_code == 503
        assert saturated.json["error"]["code"] == "service_unavailable"
        assert saturated.headers["Retry-After"] == "1"
        assert 0.3 <= waited < 5
        assert world.api.get("/api/conversations", key).status_code == 200
    finally:
        monkeypatch.undo()
        get_settings.cache_clear()
        dispose_engines()


def test_a_conversation_whose_agent_was_deleted_takes_no_new_message(world: World, redis_client: redis.Redis) -> None:
    """A deleted agent takes no new work: its conversations stay readable, but a message to one is refused
    (it was accepted, run on the deleted agent and charged, and went on after its models were deleted)."""
    from app.conversation_locks import slots_key

    agent_id = world.agent(world.model())
    user_id, key = world.user()
    conversation_id = world.conversation(key, agent_id)
    assert world.api.delete(f"/api/admin/agents/{agent_id}", world.admin_key).status_code == 204
    refused = world.send(key, conversation_id, "still there?")
    assert (refused.status_code, refused.json["error"]["code"]) == (404, "agent_deleted")
    assert world.api.get(f"/api/conversations/{conversation_id}/messages", key).json["items"] == []
    assert world.api.get(f"/api/conversations/{conversation_id}", key).json["message_count"] == 0
    assert redis_client.zcard(slots_key(user_id)) == 0


def _blocked_by(holder: Any, database: str, request: Callable[[], int]) -> int:
    """`request`'s status when it runs while `holder` (an open transaction that took a model's row) commits:
    it must wait for the holder, then answer from what the holder committed."""
    import threading

    import psycopg

    from tests.support import wait_for

    answers: list[int] = []
    thread = threading.Thread(target=lambda: answers.append(request()))
    thread.start()
    with psycopg.connect(database.replace("+psycopg", ""), autocommit=True) as watcher:
        wait_for(lambda: answers or watcher.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE %s = ANY(pg_blocking_pids(pid))", (holder.info.backend_pid,)
        ).fetchall()[0][0], what="the request to wait for the row, or to answer")
    holder.commit()
    thread.join(timeout=30)
    return answers[0]


def test_an_agent_cannot_be_pointed_at_a_model_being_deleted_nor_the_model_deleted_meanwhile(
        world: World, database: str) -> None:
    """Deleting a model and pointing an agent at it, at once: each takes the model's row, so the second waits
    for the first and answers from what it committed (both committed before, leaving a live agent on a
    deleted model that went on serving turns)."""
    import psycopg

    admin = world.admin_key
    agent_id, target = world.agent(world.model("first")), world.model("target")
    with psycopg.connect(database.replace("+psycopg", "")) as deleting:  # a delete under way
        deleting.execute("SELECT id FROM llm_models WHERE id = %s FOR UPDATE", (target,))
        deleting.execute("UPDATE llm_models SET deleted_at = now() WHERE id = %s", (target,))
        patched = _blocked_by(deleting, database, lambda: world.api.patch(
            f"/api/admin/agents/{agent_id}", admin, {"model_id": target}).status_code)
    assert patched == 404
    assert world.api.get(f"/api/admin/agents/{agent_id}", admin).json["model_id"] != target

    other = world.model("other")
    with psycopg.connect(database.replace("+psycopg", "")) as pointing:  # an agent being pointed at it
        pointing.execute("SELECT id FROM llm_models WHERE id = %s FOR SHARE", (other,))
        pointing.execute("UPDATE agents SET model_id = %s WHERE id = %s", (other, agent_id))
        deleted = _blocked_by(pointing, database, lambda: world.api.delete(f"/api/admin/models/{other}",
                                                                          admin).status_code)
    assert deleted == 409
    assert world.api.get(f"/api/admin/models/{other}", admin).status_code == 200


def test_a_test_run_asked_for_while_its_agent_is_being_deleted_waits_for_the_delete_and_is_refused(
        world: World, database: str) -> None:
    """The test run read its agent unlocked: asked for while a delete was under way, it was accepted (202) from
    the agent as it stood, after the delete had answered 204, and ran on a model deleted after that. It now reads
    the agent's row shared-locked, as a dead letter's requeue does: it waits for the delete and is refused."""
    import psycopg

    agent_id = world.agent(world.model())
    with psycopg.connect(database.replace("+psycopg", "")) as deleting:
        deleting.execute("UPDATE agents SET deleted_at = now() WHERE id = %s", (agent_id,))
        executed = _blocked_by(deleting, database, lambda: world.api.post(
            f"/api/admin/agents/{agent_id}/debug/execute", world.admin_key, {"content": "hi"}).status_code)
    assert executed == 404
    from app.db import transaction

    with transaction() as session:
        assert session.scalar(text("SELECT count(*) FROM admin_debug_logs WHERE agent_id = :a"), {"a": agent_id}) == 0


def test_metrics_can_ask_for_a_token_and_read_the_shared_state_once_a_second(
        api: Api, settings_of: Callable[..., None]) -> None:
    """/metrics needs no API key, and each scrape counted every queue and dead letter in the database and
    Redis: a client scraping in a loop cost a read per request. A read now serves the scrapes of the next
    `AGENTQ_METRICS_SNAPSHOT_SECONDS`, and `AGENTQ_METRICS_TOKEN` keeps strangers out."""
    from app.db import transaction

    def dead_letters_gauge(**headers: str) -> str:
        scraped = api.client.get("/metrics", headers=headers)
        assert scraped.status_code == 200, scraped.get_data(as_text=True)
        return next(line for line in scraped.get_data(as_text=True).splitlines()
                    if line.startswith('agentq_dead_letters{queue="turns"}'))

    assert dead_letters_gauge() == 'agentq_dead_letters{queue="turns"} 0.0'  # read: the suite's setting is 0
    settings_of(AGENTQ_METRICS_SNAPSHOT_SECONDS="60")
    with transaction() as session:
        session.execute(text("INSERT INTO dead_letters (redis_message_id, queue, actor, args, error) "
                             "VALUES ('m-1', 'turns', 'run_turn', '[]', 'boom')"))
    assert dead_letters_gauge() == 'agentq_dead_letters{queue="turns"} 0.0'  # the first scrape's read
    settings_of(AGENTQ_METRICS_SNAPSHOT_SECONDS="0")
    assert dead_letters_gauge() == 'agentq_dead_letters{queue="turns"} 1.0'
    from app import operations

    # A scrape that comes while another reads (one waiting out an outage, say) answers the last snapshot at
    # once, instead of queueing behind that read.
    with operations._scrape_read, transaction() as session:
        session.execute(text("INSERT INTO dead_letters (redis_message_id, queue, actor, args, error) "
                             "VALUES ('m-2', 'turns', 'run_turn', '[]', 'boom')"))
    with operations._scrape_read:
        assert dead_letters_gauge() == 'agentq_dead_letters{queue="turns"} 1.0'
    assert dead_letters_gauge() == 'agentq_dead_letters{queue="turns"} 2.0'

    settings_of(AGENTQ_METRICS_TOKEN="a-scrape-token-of-some-length")
    for headers in ({}, {"Authorization": "Bearer a-scrape-token-of-another-length"}):
        refused = api.client.get("/metrics", headers=headers)
        assert (refused.status_code, refused.json["error"]["code"]) == (401, "invalid_metrics_token")
    assert dead_letters_gauge(Authorization="Bearer a-scrape-token-of-some-length").endswith(" 2.0")
