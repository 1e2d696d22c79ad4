"""Admin debugging through the API, the CLI, real workers and the mock upstream: nothing here charges anyone.

Token counts come from the mock: prompt_tokens = sum(len(content)//4 + 1) over the messages sent,
completion_tokens = the number of words of "echo: <last user message>". The route test and the prompt
preview use the estimate of `app.llm_client`: (len+3)//4 + 4 a message, + 2.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import httpx
import pytest
from sqlalchemy import func, select

from tests.conftest import MOCK_URL, UpstreamLog, World, child_env
from tests.support import ROOT, agentq, wait_for

if TYPE_CHECKING:
    from tests.conftest import Workers


@pytest.fixture(autouse=True)
def _running(workers: Workers, upstream: UpstreamLog) -> None:
    """Execution tests need a worker, and every test reads a clean upstream log."""


def _count(table: str, where: str = "") -> int:
    from sqlalchemy import text

    from app.db import transaction

    with transaction() as session:
        return session.scalar(text(f"SELECT count(*) FROM {table} {where}")) or 0


def _balances() -> dict[int, tuple[Decimal, Decimal]]:
    from app.db import transaction
    from app.models import User

    with transaction() as session:
        return {i: (b, r) for i, b, r in session.execute(select(User.id, User.balance, User.reserved))}


def _ledger_size() -> int:
    from app.db import transaction
    from app.models import CreditTransaction

    with transaction() as session:
        return session.scalar(select(func.count()).select_from(CreditTransaction)) or 0


def _attempts(debug_log_id: int) -> list[tuple[str, str, str | None]]:
    from app.db import transaction
    from app.models import ModelAttempt

    with transaction() as session:
        rows = session.execute(select(ModelAttempt.model_name, ModelAttempt.outcome, ModelAttempt.message_id)
                               .where(ModelAttempt.debug_log_id == debug_log_id).order_by(ModelAttempt.id))
        return [tuple(r) for r in rows]  # type: ignore[misc]


def _moderated(upstream: UpstreamLog) -> list[Any]:
    return [r["body"]["input"] for r in upstream.requests("/v1/moderations")]


def _admin_id(world: World) -> int:
    return world.api.get("/api/me", world.admin_key).json["id"]


def _execute(world: World, agent_id: int, content: str, key: str | None = None) -> int:
    response = world.api.post(f"/api/admin/agents/{agent_id}/debug/execute", key or world.admin_key,
                              {"content": content})
    assert response.status_code == 202, response.json
    assert set(response.json) == {"debug_log_id"}
    return response.json["debug_log_id"]


def _wait_log(world: World, log_id: int) -> dict[str, Any]:
    def finished() -> dict[str, Any] | None:
        log = world.api.get(f"/api/admin/debug-logs/{log_id}", world.admin_key).json
        return log if log["status"] not in ("pending", "processing") else None

    return wait_for(finished, timeout=30, what=f"debug log {log_id} to end")


def _money(amount: Decimal | int) -> str:
    return f"{Decimal(amount):.6f}"


def _turn(world: World, key: str, conversation_id: int, content: str) -> dict[str, Any]:
    accepted = world.send(key, conversation_id, content)
    assert accepted.status_code == 202, accepted.json
    return world.wait_terminal(key, accepted.json["assistant_message"]["id"])


MODERATION = {"AGENTQ_BLOCKED_TERMS": "forbidden", "AGENTQ_MODERATION_URL": MOCK_URL}
"""The moderation policy these tests pin: a blocked term, then the mock's endpoint (it flags "flag-me")."""


@pytest.fixture
def moderation(settings_of: Callable[..., None]) -> None:
    """The in-process API's settings with the pinned moderation policy, restored afterwards."""
    settings_of(**MODERATION)


def test_route_test_reports_the_decision_without_calling_a_model_or_recording_cost(
        world: World, upstream: UpstreamLog, moderation: None) -> None:
    primary = world.model("primary", price_in="1", price_out="2", context_window=4096)
    backup = world.model("backup", price_in="10", price_out="1")
    agent_id = world.agent(primary, backup, timeout_seconds=30, max_tokens=100)

    response = world.api.post(f"/api/admin/agents/{agent_id}/debug/route", world.admin_key,
                              {"content": "hello world"})

    assert response.status_code == 200
    # prompt estimate: system (16+3)//4+4 = 8, user (11+3)//4+4 = 7, +2 = 17. The cost is the reservation a
    # turn makes, the worst case: the prompt at the most a provider may count (its bytes, 8 a message for the
    # framing, 8 for the reply's priming: 16+8 + 11+8 + 8 = 51) and 100 answer tokens, on the dearer model,
    # here the fallback
    assert response.json == {
        "model": "primary", "fallback_model": "backup", "timeout_seconds": 30, "moderation": "pass",
        "moderation_reason": None, "estimated_prompt_tokens": 17,
        "estimated_cost": _money(max(Decimal(51 * 1 + 100 * 2), Decimal(51 * 10 + 100 * 1)) / 1000),
    }
    assert response.json["estimated_cost"] == "0.610000"
    assert upstream.requests() == []
    assert _moderated(upstream) == ["hello world"]
    assert (_count("admin_debug_logs"), _count("model_attempts")) == (0, 0)


def test_route_test_reports_a_moderation_violation_as_the_worker_would(
        world: World, upstream: UpstreamLog, moderation: None) -> None:
    agent_id = world.agent(world.model(price_in="1", price_out="1"))
    url = f"/api/admin/agents/{agent_id}/debug/route"

    blocked = world.api.post(url, world.admin_key, {"content": "say something FORBIDDEN"})
    flagged = world.api.post(url, world.admin_key, {"content": "please flag-me"})

    assert (blocked.status_code, flagged.status_code) == (200, 200)
    assert blocked.json == {
        "model": "primary", "fallback_model": None, "timeout_seconds": 120, "moderation": "violation",
        "moderation_reason": "blocked term 'forbidden'", "estimated_prompt_tokens": 8 + 10 + 2,
        "estimated_cost": _money(Decimal((16 + 8 + 23 + 8 + 8) * 1 + 1024 * 1) / 1000),  # the prompt's bytes
    }
    assert (flagged.json["moderation"], flagged.json["moderation_reason"]) == (
        "violation", "flagged by the moderation endpoint")
    assert upstream.requests() == []
    assert _moderated(upstream) == ["please flag-me"]
    assert (_count("admin_debug_logs"), _count("model_attempts")) == (0, 0)


@pytest.mark.parametrize("action", ["route", "prompt", "execute"])
def test_debug_requests_are_checked_like_a_turn(world: World, action: str) -> None:
    agent_id = world.agent(world.model())
    gone = world.agent(world.model("other"))
    assert world.api.delete(f"/api/admin/agents/{gone}", world.admin_key).status_code == 204
    url = f"/api/admin/agents/{{}}/debug/{action}"
    cases = [(agent_id, {"content": "   "}, 422, "validation_failed"),
             (agent_id, {"content": "x" * 32001}, 413, "content_too_large"),
             (agent_id, {"content": 5}, 422, "validation_failed"),
             (agent_id, {}, 422, "validation_failed"),
             (999, {"content": "hi"}, 404, "not_found"),
             (gone, {"content": "hi"}, 404, "not_found")]
    for agent, body, status, code in cases:
        response = world.api.post(url.format(agent), world.admin_key, body)
        assert (response.status_code, response.json["error"]["code"]) == (status, code), (agent, body)
    assert _count("admin_debug_logs") == 0


def test_prompt_preview_is_exactly_what_the_worker_sends(world: World, upstream: UpstreamLog) -> None:
    agent_id = world.agent(world.model())
    _, alice = world.user("alice")
    conversation_id = world.conversation(alice, agent_id)
    assert _turn(world, alice, conversation_id, "first")["status"] == "success"
    upstream.clear()

    preview = world.api.post(f"/api/admin/agents/{agent_id}/debug/prompt", world.admin_key,
                             {"content": "second", "conversation_id": conversation_id})

    assert preview.status_code == 200
    assert preview.json == {
        "messages": [{"role": "system", "content": "You are helpful."}, {"role": "user", "content": "first"},
                     {"role": "assistant", "content": "echo: first"}, {"role": "user", "content": "second"}],
        "estimated_prompt_tokens": 8 + 6 + 7 + 6 + 2,
    }
    assert (upstream.requests(), _moderated(upstream)) == ([], [])
    assert (_count("admin_debug_logs"), _count("model_attempts", "WHERE debug_log_id IS NOT NULL")) == (0, 0)
    assert _count("model_attempts") == 1

    assert _turn(world, alice, conversation_id, "second")["status"] == "success"
    assert upstream.requests()[-1]["body"]["messages"] == preview.json["messages"]

    other_agent = world.agent(world.model("other"))
    refused = world.api.post(f"/api/admin/agents/{other_agent}/debug/prompt", world.admin_key,
                             {"content": "second", "conversation_id": conversation_id})
    assert (refused.status_code, refused.json["error"]["code"]) == (422, "conversation_of_another_agent")


def test_prompt_preview_drops_failed_turns_and_the_oldest_history_like_the_worker(
        world: World, upstream: UpstreamLog) -> None:
    """Window 45, answer room 10, head+tail 16: 19 tokens of history fit, the last turn (6+8) but not more."""
    small = world.model("small", context_window=45)
    failing = world.model("failing", upstream="echo;fail=500")
    agent_id = world.agent(small, max_tokens=10)
    _, alice = world.user("alice")
    conversation_id = world.conversation(alice, agent_id)
    assert _turn(world, alice, conversation_id, "alpha one")["status"] == "success"
    world.api.patch(f"/api/admin/agents/{agent_id}", world.admin_key, {"model_id": failing})
    assert _turn(world, alice, conversation_id, "lost turn")["status"] == "llm_error"
    world.api.patch(f"/api/admin/agents/{agent_id}", world.admin_key, {"model_id": small})
    assert _turn(world, alice, conversation_id, "beta two")["status"] == "success"
    upstream.clear()

    preview = world.api.post(f"/api/admin/agents/{agent_id}/debug/prompt", world.admin_key,
                             {"content": "gamma", "conversation_id": conversation_id})

    assert preview.status_code == 200
    assert preview.json == {
        "messages": [{"role": "system", "content": "You are helpful."}, {"role": "user", "content": "beta two"},
                     {"role": "assistant", "content": "echo: beta two"}, {"role": "user", "content": "gamma"}],
        "estimated_prompt_tokens": 8 + 6 + 8 + 6 + 2,
    }
    assert (upstream.requests(), _moderated(upstream)) == ([], [])
    assert _turn(world, alice, conversation_id, "gamma")["status"] == "success"
    assert upstream.requests()[-1]["body"]["messages"] == preview.json["messages"]


def test_prompt_preview_of_an_unknown_or_deleted_conversation_is_not_found(world: World) -> None:
    agent_id = world.agent(world.model())
    _, alice = world.user("alice")
    conversation_id = world.conversation(alice, agent_id)
    assert world.api.delete(f"/api/conversations/{conversation_id}", alice).status_code == 204
    for conversation in (conversation_id, 999):
        response = world.api.post(f"/api/admin/agents/{agent_id}/debug/prompt", world.admin_key,
                                  {"content": "hi", "conversation_id": conversation})
        assert (response.status_code, response.json["error"]["code"]) == (404, "not_found")
    without = world.api.post(f"/api/admin/agents/{agent_id}/debug/prompt", world.admin_key, {"content": "hi"})
    assert without.json["messages"] == [{"role": "system", "content": "You are helpful."},
                                        {"role": "user", "content": "hi"}]


def test_an_execution_test_is_logged_at_the_models_prices_and_charges_nobody(
        world: World, upstream: UpstreamLog) -> None:
    agent_id = world.agent(world.model(price_in="1", price_out="2"))
    alice_id, alice = world.user("alice", balance="10")
    assert _turn(world, alice, world.conversation(alice, agent_id), "a paid turn")["status"] == "success"
    upstream.clear()
    balances, ledger_size = _balances(), _ledger_size()

    log_id = _execute(world, agent_id, "hello world")
    log = _wait_log(world, log_id)

    prompt_tokens, completion_tokens = 16 // 4 + 1 + 11 // 4 + 1, 3
    assert (prompt_tokens, completion_tokens) == (8, 3)
    assert log == {
        "id": log_id, "agent_id": agent_id, "admin_id": _admin_id(world), "status": "success",
        "input": "hello world", "output": "echo: hello world", "model": "primary",
        "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
        "cost": _money(Decimal(prompt_tokens * 1 + completion_tokens * 2) / 1000), "latency_ms": log["latency_ms"],
        "error_message": None, "created_at": log["created_at"],
    }
    assert log["cost"] == "0.014000"
    assert isinstance(log["latency_ms"], int) and log["latency_ms"] >= 0
    assert [r["body"]["messages"] for r in upstream.requests()] == [
        [{"role": "system", "content": "You are helpful."}, {"role": "user", "content": "hello world"}]]
    assert _count("admin_debug_logs") == 1
    assert _attempts(log_id) == [("primary", "success", None)]
    assert _balances() == balances
    assert _ledger_size() == ledger_size == 2
    assert balances[alice_id][1] == 0


def test_an_execution_test_falls_back_like_a_turn(world: World, upstream: UpstreamLog) -> None:
    flaky = world.model("flaky", upstream="echo;fail=500", price_in="1", price_out="1")
    backup = world.model("backup", price_in="2", price_out="3")
    agent_id = world.agent(flaky, backup, timeout_seconds=5)
    balances, ledger_size = _balances(), _ledger_size()

    log = _wait_log(world, _execute(world, agent_id, "hello world"))

    assert (log["status"], log["model"], log["output"]) == ("success", "backup", "echo: hello world")
    assert (log["prompt_tokens"], log["completion_tokens"]) == (8, 3)
    assert log["cost"] == _money(Decimal(8 * 2 + 3 * 3) / 1000)
    assert log["error_message"] is None
    assert upstream.models() == ["echo;fail=500", "echo"]
    assert _attempts(log["id"]) == [("flaky", "server_error", None), ("backup", "success", None)]
    assert _count("model_attempts") == 2
    assert (_balances(), _ledger_size()) == (balances, ledger_size)
    assert _fell_back(log["id"]) is True  # what a delivery taking the run over would read


def _fell_back(log_id: int) -> bool:
    from app.db import transaction
    from app.models import DebugRun

    with transaction() as session:
        return session.get_one(DebugRun, log_id).fell_back


def test_an_execution_test_that_switched_to_its_fallback_before_its_worker_died_calls_the_fallback_alone(
        world: World, upstream: UpstreamLog, workers: Workers, unreachable_broker: None) -> None:
    """A run is sent again after its worker died during the fallback's call (here: marked so while its send
    waits for the sweep, the workers stopped until then): that delivery called the primary, which had failed,
    again; it calls the fallback alone, as a turn's delivery does, since a run switches once."""
    from sqlalchemy import update

    from app.db import transaction
    from app.models import DebugRun

    agent_id = world.agent(world.model("flaky", upstream="echo;fail=500"), world.model("backup"), timeout_seconds=5)
    workers.stop_all()
    try:
        log_id = _execute(world, agent_id, "hello again")
        with transaction() as session:
            session.execute(update(DebugRun).where(DebugRun.id == log_id).values(fell_back=True))
    finally:
        workers.start()

    log = _wait_log(world, log_id)
    assert (log["status"], log["model"], log["output"]) == ("success", "backup", "echo: hello again")
    assert upstream.models() == ["echo"]
    assert _attempts(log_id) == [("backup", "success", None)]


@pytest.mark.parametrize(("upstream_model", "output", "outcome", "error"), [
    ("echo;fail=503", "", "server_error", "HTTP 503"),
    ("echo;cut_after=2", "echo: hello", "stream_cut", "the stream broke"),
    # a typo in a test's model was played as plain `echo`: the mock refuses it, and the admin reads which part
    ("echo;gpa=0.1", "", "bad_request", "HTTP 400: Error code: 400 - the mock upstream knows no directive 'gpa'"),
])
def test_an_execution_test_whose_models_all_fail_ends_as_llm_error_with_the_text_they_sent(
        world: World, upstream: UpstreamLog, upstream_model: str, output: str, outcome: str, error: str) -> None:
    """A run whose stream broke keeps the text sent before the break, as a failed turn keeps it (it kept
    none), and names no model: none answered."""
    agent_id = world.agent(world.model("broken", upstream=upstream_model))

    log = _wait_log(world, _execute(world, agent_id, "hello there friend"))

    assert (log["status"], log["model"], log["output"], log["cost"]) == ("llm_error", None, output, None)
    assert (log["prompt_tokens"], log["completion_tokens"]) == (None, None)
    assert error in log["error_message"]
    assert _attempts(log["id"]) == [("broken", outcome, None)]


def test_an_execution_test_accepted_while_redis_is_unreachable_is_sent_by_recovery(
        world: World, workers: Workers, unreachable_broker: None) -> None:
    """The workers are stopped until the run is seen unsent: a sweep of theirs could send and end it first."""
    from app.db import transaction
    from app.models import DebugRun

    agent_id = world.agent(world.model())
    workers.stop_all()
    try:
        log_id = _execute(world, agent_id, "while redis is away")
        with transaction() as session:
            run = session.get_one(DebugRun, log_id)
            assert (run.status, run.enqueued_at) == ("pending", None)
    finally:
        workers.start()
    assert _wait_log(world, log_id)["status"] == "success"


DEBUG_ROUTES = [("POST", "/api/admin/agents/1/debug/route", {"content": "hi"}),
                ("POST", "/api/admin/agents/1/debug/prompt", {"content": "hi"}),
                ("POST", "/api/admin/agents/1/debug/execute", {"content": "hi"}),
                ("GET", "/api/admin/debug-logs/1", None),
                ("GET", "/api/admin/debug-logs", None),
                ("GET", "/api/admin/debug-costs", None)]


@pytest.mark.parametrize(("method", "path", "body"), DEBUG_ROUTES)
def test_debug_routes_are_for_admins_only(
        world: World, upstream: UpstreamLog, method: str, path: str, body: dict[str, str] | None) -> None:
    agent_id = world.agent(world.model())
    assert agent_id == 1
    log_id = _execute(world, agent_id, "an admin's run")
    _, alice = world.user("alice")

    anonymous = world.api.call(method, path, None, json=body)
    unknown = world.api.call(method, path, "aq_not-a-real-key", json=body)
    user = world.api.call(method, path, alice, json=body)

    assert (anonymous.status_code, anonymous.json["error"]["code"]) == (401, "missing_api_key")
    assert (unknown.status_code, unknown.json["error"]["code"]) == (401, "invalid_api_key")
    assert (user.status_code, user.json["error"]["code"]) == (403, "forbidden")
    assert _count("admin_debug_logs") == 1
    _wait_log(world, log_id)
    assert len(upstream.requests()) == 1


def test_debug_logs_are_listed_newest_first_in_pages(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without `limit`, every log in the contract's shape (read two at a time here, across pages); with it, pages."""
    import app.debugging

    monkeypatch.setattr(app.debugging, "PAGE_OF_A_WHOLE_LIST", 2)
    first_agent, second_agent = world.agent(world.model()), world.agent(world.model("other"))
    ids = [_execute(world, agent, f"run {n}") for n, agent in enumerate([first_agent, second_agent, first_agent,
                                                                         first_agent, second_agent])]
    for log_id in ids:
        _wait_log(world, log_id)

    def page(query: str) -> tuple[list[int], int | None]:
        response = world.api.get(f"/api/admin/debug-logs{query}", world.admin_key)
        assert response.status_code == 200
        assert list(response.json) == (["items", "next_before_id"] if "limit=" in query else ["items"])
        return [item["id"] for item in response.json["items"]], response.json.get("next_before_id")

    assert page("") == (ids[::-1], None)
    assert page(f"?before_id={ids[4]}") == (ids[3::-1], None)
    assert page("?limit=2") == ([ids[4], ids[3]], ids[3])
    assert page(f"?limit=2&before_id={ids[3]}") == ([ids[2], ids[1]], ids[1])
    assert page(f"?limit=2&before_id={ids[1]}") == ([ids[0]], None)
    assert page(f"?agent_id={first_agent}") == ([ids[3], ids[2], ids[0]], None)
    assert page(f"?agent_id={first_agent}&limit=1&before_id={ids[3]}") == ([ids[2]], ids[2])
    assert page("?agent_id=999") == ([], None)
    listed = world.api.get("/api/admin/debug-logs?limit=1", world.admin_key).json["items"][0]
    assert listed == world.api.get(f"/api/admin/debug-logs/{ids[4]}", world.admin_key).json
    assert listed["input"] == "run 4" and listed["agent_id"] == second_agent
    for query in ("?limit=0", "?limit=201", "?before_id=0", "?agent_id=x"):
        response = world.api.get(f"/api/admin/debug-logs{query}", world.admin_key)
        assert (response.status_code, response.json["error"]["code"]) == (422, "validation_failed"), query
    missing = world.api.get("/api/admin/debug-logs/999", world.admin_key)
    assert (missing.status_code, missing.json["error"]["code"]) == (404, "not_found")


def test_an_execution_test_of_a_blocked_input_calls_no_model(world: World, upstream: UpstreamLog) -> None:
    """A test run is moderated as a user's turn is: a blocked input ends it `content_violation`, no model
    called, no cost logged, no balance touched."""
    agent_id = world.agent(world.model(price_in="1", price_out="2"))
    world.user("alice", balance="10")
    balances, ledger_size = _balances(), _ledger_size()
    log = _wait_log(world, _execute(world, agent_id, "please say the Forbidden-Word now"))
    assert (log["status"], log["error_message"], log["model"], log["cost"], log["output"]) == (
        "content_violation", "moderation: blocked term 'forbidden-word'", None, None, "")
    assert upstream.requests() == []
    assert (_balances(), _ledger_size()) == (balances, ledger_size)


def test_a_log_written_before_its_model_id_was_kept_counts_under_the_live_model_of_its_name(world: World) -> None:
    """Names recur after deletes: such a log counts, by model, under the live model of its name, not under a
    deleted namesake (here the newer row), nor under none."""
    from app.db import transaction
    from app.models import DebugRun

    live, gone = world.model("placeholder"), world.model("named")
    agent_id = world.agent(live)
    assert world.api.delete(f"/api/admin/models/{gone}", world.admin_key).status_code == 204
    assert world.api.patch(f"/api/admin/models/{live}", world.admin_key, {"name": "named"}).status_code == 200
    assert gone > live
    admin_id = world.api.get("/api/me", world.admin_key).json["id"]
    with transaction() as session:
        session.add(DebugRun(agent_id=agent_id, admin_id=admin_id, input="old", status="success", output="x",
                             model="named", model_id=None, prompt_tokens=3, completion_tokens=2,
                             cost=Decimal("0.5")))
    response = world.api.get("/api/admin/debug-costs?group_by=model", world.admin_key)
    assert (response.status_code, response.json["items"]) == (200, [
        {"key": live, "runs": 1, "prompt_tokens": 3, "completion_tokens": 2, "cost": "0.500000"}])


def test_the_cost_summary_adds_up_across_runs_agents_models_and_admins(world: World) -> None:
    from app.users import create_user

    cheap = world.model("cheap", price_in="1", price_out="2")
    dear = world.model("dear", price_in="3", price_out="5")
    broken = world.model("broken", upstream="echo;fail=500", price_in="7", price_out="7")
    on_cheap, on_dear = world.agent(cheap), world.agent(dear)
    on_broken, rescued = world.agent(broken), world.agent(broken, cheap)
    first_admin = _admin_id(world)
    second = create_user("second admin", is_admin=True)
    balances, ledger_size = _balances(), _ledger_size()

    runs = [(on_cheap, None, "hello world"),            # cheap: 8 prompt, 3 completion -> 0.014
            (on_cheap, second.api_key, "one two three four"),  # cheap: 5+5, 5 -> 0.020
            (on_dear, None, "hi"),                      # dear: 5+1, 2 -> 0.028
            (on_broken, second.api_key, "hello"),      # no model answered: nothing
            (rescued, None, "hello world")]             # cheap after broken failed: 8, 3 -> 0.014
    logs = [_wait_log(world, _execute(world, agent, content, key)) for agent, key, content in runs]
    assert [(log["status"], log["model"], log["cost"]) for log in logs] == [
        ("success", "cheap", "0.014000"), ("success", "cheap", "0.020000"), ("success", "dear", "0.028000"),
        ("llm_error", None, None), ("success", "cheap", "0.014000")]

    def summary(group_by: str) -> list[dict[str, Any]]:
        response = world.api.get(f"/api/admin/debug-costs?group_by={group_by}", world.admin_key)
        assert response.status_code == 200
        return response.json["items"]

    def line(key: int, runs: int, prompt: int, completion: int, cost: str) -> dict[str, Any]:
        return {"key": key, "runs": runs, "prompt_tokens": prompt, "completion_tokens": completion, "cost": cost}

    assert summary("agent") == [line(on_cheap, 2, 18, 8, "0.034000"), line(on_dear, 1, 6, 2, "0.028000"),
                                line(on_broken, 1, 0, 0, "0.000000"), line(rescued, 1, 8, 3, "0.014000")]
    assert summary("model") == [line(cheap, 3, 26, 11, "0.048000"), line(dear, 1, 6, 2, "0.028000")]
    # A model's runs stay its own when it is renamed (and a new model under its old name gets none of them).
    assert world.api.patch(f"/api/admin/models/{cheap}", world.admin_key, {"name": "cheap v2"}).status_code == 200
    world.model("cheap", price_in="1", price_out="2")
    assert summary("model") == [line(cheap, 3, 26, 11, "0.048000"), line(dear, 1, 6, 2, "0.028000")]
    assert summary("admin") == [line(first_admin, 3, 22, 8, "0.056000"), line(second.user.id, 2, 10, 5, "0.020000")]
    assert world.api.get("/api/admin/debug-costs", world.admin_key).json["items"] == summary("agent")
    total = sum(Decimal(log["cost"] or 0) for log in logs)
    for group_by in ("agent", "model", "admin"):
        assert sum(Decimal(item["cost"]) for item in summary(group_by)) == total == Decimal("0.076")
    bad = world.api.get("/api/admin/debug-costs?group_by=user", world.admin_key)
    assert (bad.status_code, bad.json["error"]["code"]) == (422, "validation_failed")
    assert (_balances(), _ledger_size()) == (balances, ledger_size)


def _cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(agentq("debug", *args), env=child_env(**{**MODERATION, **env}), cwd=ROOT,
                          capture_output=True, text=True, timeout=60)


def test_the_cli_twin_prints_what_the_api_answers(world: World, upstream: UpstreamLog, moderation: None) -> None:
    agent_id = world.agent(world.model(price_in="1", price_out="2"), max_tokens=50)
    _, alice = world.user("alice")
    conversation_id = world.conversation(alice, agent_id)
    assert _turn(world, alice, conversation_id, "first")["status"] == "success"
    upstream.clear()
    admin = str(_admin_id(world))
    base = f"/api/admin/agents/{agent_id}/debug"

    route = _cli("route", str(agent_id), "hello world", "--admin-id", admin)
    assert (route.returncode, route.stderr) == (0, "")
    assert json.loads(route.stdout) == world.api.post(f"{base}/route", world.admin_key,
                                                      {"content": "hello world"}).json
    assert json.loads(route.stdout)["estimated_cost"] == _money(Decimal(51 * 1 + 50 * 2) / 1000)
    prompt = _cli("prompt", str(agent_id), "second", "--admin-id", admin, "--conversation-id", str(conversation_id))
    assert prompt.returncode == 0
    assert json.loads(prompt.stdout) == world.api.post(f"{base}/prompt", world.admin_key,
                                                       {"content": "second", "conversation_id": conversation_id}).json
    assert len(json.loads(prompt.stdout)["messages"]) == 4
    blocked = _cli("route", str(agent_id), "a Secret plan", "--admin-id", admin, AGENTQ_BLOCKED_TERMS="secret")
    assert json.loads(blocked.stdout)["moderation_reason"] == "blocked term 'secret'"
    assert upstream.requests() == []
    assert _moderated(upstream) == ["hello world", "hello world"]
    assert (_count("admin_debug_logs"), _count("model_attempts", "WHERE debug_log_id IS NOT NULL")) == (0, 0)

    started = _cli("execute", str(agent_id), "hello world", "--admin-id", admin)
    assert started.returncode == 0
    log_id = json.loads(started.stdout)["debug_log_id"]
    assert _wait_log(world, log_id)["status"] == "success"
    waited = _cli("execute", str(agent_id), "hello again", "--admin-id", admin, "--wait")
    assert waited.returncode == 0
    printed = json.loads(waited.stdout)
    assert printed == world.api.get(f"/api/admin/debug-logs/{printed['id']}", world.admin_key).json
    assert (printed["status"], printed["admin_id"], printed["output"]) == ("success", int(admin), "echo: hello again")
    assert printed["cost"] == _money(Decimal(5 + 3 + 3 * 2) / 1000)
    assert _count("admin_debug_logs") == 2
    down = world.agent(world.model("down", upstream="echo;fail=503"))
    failed = _cli("execute", str(down), "hello", "--admin-id", admin, "--wait")
    ran = json.loads(failed.stdout)  # printed as a success is: the run is the answer either way
    assert (failed.returncode, ran["status"], ran["output"]) == (3, "llm_error", "")
    assert ran == world.api.get(f"/api/admin/debug-logs/{ran['id']}", world.admin_key).json
    assert json.loads(failed.stderr)["error"] == {
        "code": "run_unsuccessful", "message": f"test run {ran['id']} ended llm_error: {ran['error_message']}"}
    assert ran["error_message"]


def test_the_route_test_of_a_conversation_shows_what_its_next_turn_holds(world: World, upstream: UpstreamLog) -> None:
    """A user refused `insufficient_balance` in a long conversation was refused on a reservation that counts
    the conversation's history, which the route test, on a new conversation's turn, did not show. Given the
    conversation, its `estimated_cost` is what the next turn of it holds of the balance while it runs."""
    agent_id = world.agent(world.model("weighed", upstream="echo;ttft=1", price_in="1", price_out="2"),
                           max_tokens=50)
    _, key = world.user(balance="10")
    conversation_id = world.conversation(key, agent_id)
    assert _turn(world, key, conversation_id, "a first question, answered")["status"] == "success"
    route = f"/api/admin/agents/{agent_id}/debug/route"
    fresh = world.api.post(route, world.admin_key, {"content": "and a second"}).json
    routed = world.api.post(route, world.admin_key, {"content": "and a second", "conversation_id": conversation_id})
    # A prompt of 52 and of 126 tokens at most (its bytes, the history's too, as a reservation counts them) at 1
    # a thousand, and 50 answer tokens at 2.
    assert (routed.status_code, fresh["estimated_cost"], routed.json["estimated_cost"]) == (200, "0.152000", "0.226000")
    shell = _cli("route", str(agent_id), "and a second", "--admin-id", str(_admin_id(world)),
                 "--conversation-id", str(conversation_id))
    assert (shell.returncode, json.loads(shell.stdout)) == (0, routed.json)

    second = world.send(key, conversation_id, "and a second").json["assistant_message"]["id"]
    holding = wait_for(lambda: (me := world.api.get("/api/me", key).json)["available_balance"] != me["balance"] and me,
                       what="the second turn's reservation")
    assert _money(Decimal(holding["balance"]) - Decimal(holding["available_balance"])) == routed.json["estimated_cost"]
    assert world.wait_terminal(key, second)["status"] == "success"
    other = world.conversation(world.user()[1], world.agent(world.model("elsewhere")))
    refused = world.api.post(route, world.admin_key, {"content": "x", "conversation_id": other})
    assert (refused.status_code, refused.json["error"]["code"]) == (422, "conversation_of_another_agent")


def test_the_cli_twin_refuses_a_non_admin_identity(world: World) -> None:
    agent_id = world.agent(world.model())
    alice_id, _ = world.user("alice")
    for command in ("route", "prompt", "execute"):
        refused = _cli(command, str(agent_id), "hello", "--admin-id", str(alice_id))
        assert (refused.returncode, refused.stdout) == (1, "")
        assert json.loads(refused.stderr)["error"] == {
            "code": "forbidden",
            "message": f"User {alice_id} is not an administrator; debugging is for administrators."}
    unknown = _cli("route", str(agent_id), "hello", "--admin-id", "999")
    assert (unknown.returncode, json.loads(unknown.stderr)["error"]["code"]) == (1, "not_found")
    missing = _cli("route", str(agent_id), "hello")
    assert missing.returncode == 2 and "--admin-id" in missing.stderr
    assert _count("admin_debug_logs") == 0


def test_the_mock_counts_tokens_as_these_tests_assume(upstream: UpstreamLog) -> None:
    """Guards the arithmetic above: a change to the mock's counting must show up here first."""
    body = {"model": "echo", "messages": [{"role": "system", "content": "You are helpful."},
                                          {"role": "user", "content": "hello world"}]}
    usage = httpx.post(f"{upstream.base}/v1/chat/completions", json=body).json()["usage"]
    assert (usage["prompt_tokens"], usage["completion_tokens"]) == (8, 3)
