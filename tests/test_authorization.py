"""Keys and ownership: 401 without a known key, 403 on admin routes for users, 404 on others' resources."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import pytest

from tests.support import wait_for

if TYPE_CHECKING:
    from tests.conftest import Api, UpstreamLog, Workers, World


@pytest.fixture
def owned(world: World, workers: Workers, upstream: UpstreamLog) -> dict[str, Any]:
    """Alice's conversation with one finished turn, and Bob's key."""
    agent_id = world.agent(world.model())
    _, alice = world.user("alice")
    _, bob = world.user("bob")
    conversation_id = world.conversation(alice, agent_id)
    assistant = world.send(alice, conversation_id, "mine").json["assistant_message"]
    world.wait_terminal(alice, assistant["id"])
    return {"alice": alice, "bob": bob, "conversation": conversation_id, "message": assistant["id"],
            "user_message": assistant["id"] - 1, "agent": agent_id}


def test_another_users_resources_are_not_found_on_every_route(world: World, owned: dict[str, Any]) -> None:
    c, m, um = owned["conversation"], owned["message"], owned["user_message"]
    routes = [
        ("GET", f"/api/conversations/{c}", None),
        ("DELETE", f"/api/conversations/{c}", None),
        ("GET", f"/api/conversations/{c}/messages", None),
        ("POST", f"/api/conversations/{c}/messages", {"content": "hijack"}),
        ("GET", f"/api/messages/{m}", None),
        ("GET", f"/api/messages/{um}", None),
    ]
    for method, path, body in routes:
        response = world.api.call(method, path, owned["bob"], json=body)
        assert response.status_code == 404, (method, path, response.json)
        assert response.json["error"]["code"] == "not_found"
    assert world.api.get("/api/conversations", owned["bob"]).json["items"] == []
    assert world.api.get(f"/api/conversations/{c}", owned["alice"]).status_code == 200


def test_another_users_busy_conversation_is_not_found_not_busy(
        world: World, workers: Workers, upstream: UpstreamLog) -> None:
    """A refusal from the Redis fast path must not reveal that someone else's conversation is busy."""
    agent_id = world.agent(world.model(upstream="echo;ttft=1"))
    _, alice = world.user("alice")
    _, bob = world.user("bob")
    conversation_id = world.conversation(alice, agent_id)
    assistant = world.send(alice, conversation_id).json["assistant_message"]
    assert world.send(alice, conversation_id).status_code == 409
    intruder = world.send(bob, conversation_id)
    assert intruder.status_code == 404 and intruder.json["error"]["code"] == "not_found"
    world.wait_terminal(alice, assistant["id"])


USER_ROUTES = [("GET", "/api/me"), ("GET", "/api/me/transactions"), ("GET", "/api/agents"),
               ("GET", "/api/conversations"), ("POST", "/api/conversations"), ("GET", "/api/conversations/1"),
               ("DELETE", "/api/conversations/1"), ("GET", "/api/conversations/1/messages"),
               ("POST", "/api/conversations/1/messages"), ("GET", "/api/messages/1")]
ADMIN_ROUTES = [("POST", "/api/admin/users"), ("POST", "/api/admin/users/1/credits"),
                ("POST", "/api/admin/users/1/api-key"),
                ("POST", "/api/admin/models"), ("GET", "/api/admin/models"), ("GET", "/api/admin/models/1"),
                ("PATCH", "/api/admin/models/1"), ("DELETE", "/api/admin/models/1"),
                ("POST", "/api/admin/agents"), ("GET", "/api/admin/agents"), ("GET", "/api/admin/agents/1"),
                ("PATCH", "/api/admin/agents/1"), ("DELETE", "/api/admin/agents/1"), ("GET", "/api/admin/workers")]


@pytest.mark.parametrize(("method", "path"), USER_ROUTES + ADMIN_ROUTES)
@pytest.mark.parametrize(("header", "code"), [
    (None, "missing_api_key"), ("Bearer aq_not-a-real-key", "invalid_api_key"), ("Basic abc", "missing_api_key"),
    ("Bearer ", "missing_api_key")])
def test_every_api_route_needs_a_known_key(api: Api, method: str, path: str, header: str | None, code: str) -> None:
    headers = {"Authorization": header} if header else {}
    response = api.call(method, path, headers=headers, json={})
    assert (response.status_code, response.json["error"]["code"], response.headers["WWW-Authenticate"]) == (
        401, code, "Bearer")


@pytest.mark.parametrize(("method", "path"), ADMIN_ROUTES)
def test_admin_routes_are_forbidden_to_users(world: World, method: str, path: str) -> None:
    _, key = world.user()
    response = world.api.call(method, path, key, json={})
    assert response.status_code == 403
    assert response.json == {"error": {"code": "forbidden", "message": "This route is for administrators."}}


def test_admin_can_create_users_and_move_credit_never_below_zero(world: World) -> None:
    created = world.api.post("/api/admin/users", world.admin_key, {"name": "carol", "balance": "5.5"})
    assert created.status_code == 201
    assert created.json["balance"] == "5.500000" and created.json["api_key"].startswith("aq_")
    user_id, key = created.json["id"], created.json["api_key"]
    assert world.api.get("/api/me", key).json["balance"] == "5.500000"
    assert world.api.post(f"/api/admin/users/{user_id}/credits", world.admin_key,
                          {"amount": "-2.25"}).json == {"balance": "3.250000", "credited": "-2.250000"}
    assert world.api.post(f"/api/admin/users/{user_id}/credits", world.admin_key,
                          {"amount": "-100"}).json == {"balance": "0.000000", "credited": "-3.250000"}
    assert world.api.post(f"/api/admin/users/{user_id}/credits", world.admin_key,
                          {"amount": "-1"}).json == {"balance": "0.000000", "credited": "0.000000"}
    ledger = world.api.get("/api/me/transactions", key).json["items"]
    assert [t["amount"] for t in ledger] == ["-3.250000", "-2.250000", "5.500000"]
    assert [t["balance_after"] for t in ledger] == ["0.000000", "3.250000", "5.500000"]
    assert all(t["message_id"] is None for t in ledger)
    first = world.api.get("/api/me/transactions?limit=2", key).json
    assert [t["amount"] for t in first["items"]] == ["-3.250000", "-2.250000"]
    rest = world.api.get(f"/api/me/transactions?limit=2&cursor={first['next_cursor']}", key).json
    assert ([t["amount"] for t in rest["items"]], rest["next_cursor"]) == (["5.500000"], None)
    assert world.api.get("/api/me/transactions?limit=3", key).json["next_cursor"] is None
    assert world.api.post("/api/admin/users/999999/credits", world.admin_key, {"amount": "1"}).status_code == 404


def test_an_opening_balance_below_one_is_credited_with_its_ledger_row(world: World) -> None:
    """A user opened with a fraction of a unit has it, and the ledger row that explains it; one opened with nothing
    has no row, so that the ledger's sum is the balance either way."""
    created = world.api.post("/api/admin/users", world.admin_key, {"name": "erin", "balance": "0.5"})
    assert (created.status_code, created.json["balance"]) == (201, "0.500000")
    key = created.json["api_key"]
    me = world.api.get("/api/me", key).json
    assert (me["balance"], me["available_balance"]) == ("0.500000", "0.500000")
    assert [(t["amount"], t["balance_after"], t["message_id"]) for t in world.api.get(
        "/api/me/transactions", key).json["items"]] == [("0.500000", "0.500000", None)]
    empty = world.api.post("/api/admin/users", world.admin_key, {"name": "fred", "balance": "0"})
    assert (empty.status_code, empty.json["balance"]) == (201, "0.000000")
    assert world.api.get("/api/me/transactions", empty.json["api_key"]).json["items"] == []


def test_a_users_ledger_holds_only_their_own_rows(world: World) -> None:
    _, alice = world.user("alice", balance="7")
    bob_id, bob = world.user("bob", balance="3")
    assert world.api.post(f"/api/admin/users/{bob_id}/credits", world.admin_key, {"amount": "2"}).status_code == 200
    mine = world.api.get("/api/me/transactions", alice).json["items"]
    assert [(t["amount"], t["balance_after"]) for t in mine] == [("7.000000", "7.000000")]
    paged = world.api.get("/api/me/transactions?limit=1", alice).json
    assert (len(paged["items"]), paged["next_cursor"]) == (1, None)
    assert [t["amount"] for t in world.api.get("/api/me/transactions", bob).json["items"]] == ["2.000000", "3.000000"]


def test_the_bearer_scheme_is_read_in_any_case(world: World) -> None:
    """HTTP's authentication schemes are case-insensitive (RFC 9110, 11.1): a client or proxy that writes `bearer`
    is the same caller."""
    user_id, key = world.user("dora", balance="1")
    for scheme in ("bearer", "BEARER", "Bearer"):
        response = world.api.get("/api/me", headers={"Authorization": f"{scheme} {key}"})
        assert (response.status_code, response.json["id"]) == (200, user_id), scheme


def test_a_user_message_has_no_answer_stream(world: World) -> None:
    """Only an assistant message is streamed: the id of the user's own message beside it is not found."""
    agent_id = world.agent(world.model())
    _, key = world.user()
    accepted = world.send(key, world.conversation(key, agent_id), "hello")
    assert accepted.status_code == 202
    response = world.api.get(f"/api/messages/{accepted.json['user_message']['id']}/stream", key)
    assert (response.status_code, response.json["error"]["code"]) == (404, "not_found")
    opened = world.api.get(f"/api/messages/{accepted.json['assistant_message']['id']}/stream", key, buffered=False)
    try:
        assert opened.status_code == 200
    finally:
        opened.close()


def test_a_users_key_can_be_replaced_and_the_old_one_stops_working(world: World, database: str) -> None:
    """A leaked key could only be revoked by editing the database. A new one is shown once, by the API or the
    command line; the old one is refused at once by the process that replaced it, and by the others within
    the 10 s they remember a key they saw."""
    import json
    import subprocess

    from tests.conftest import child_env
    from tests.support import ROOT, VENV_BIN

    user_id, first = world.user(balance="2")
    assert world.api.get("/api/me", first).status_code == 200  # now remembered by this process
    replaced = world.api.post(f"/api/admin/users/{user_id}/api-key", world.admin_key)
    assert replaced.status_code == 200
    assert (replaced.json["id"], replaced.json["balance"]) == (user_id, "2.000000")
    second = replaced.json["api_key"]
    assert second.startswith("aq_") and second != first
    refused = world.api.get("/api/me", first)
    assert (refused.status_code, refused.json["error"]["code"]) == (401, "invalid_api_key")
    assert world.api.get("/api/me", second).json["id"] == user_id

    ran = subprocess.run([str(VENV_BIN / "agentq"), "users", "replace-key", str(user_id)], env=child_env(), cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert ran.returncode == 0, ran.stderr
    third = json.loads(ran.stdout)
    assert third["id"] == user_id and third["api_key"] not in (first, second)
    assert world.api.get("/api/me", third["api_key"]).json["id"] == user_id
    started = time.monotonic()
    wait_for(lambda: world.api.get("/api/me", second).status_code == 401, timeout=15, what="the old key's refusal")
    assert time.monotonic() - started <= 10.5
    missing = world.api.post("/api/admin/users/999999/api-key", world.admin_key)
    assert (missing.status_code, missing.json["error"]["code"]) == (404, "not_found")
