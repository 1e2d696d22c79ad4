"""Dead letters through the admin API and `agentq dlq`, with messages that really die in a worker.

A message dies for real: a trigger in PostgreSQL refuses to let the turns of one conversation move to
`processing` (an unexpected database error, as an outage would raise), so every delivery fails,
Dramatiq retries it `AGENTQ_MAX_RETRIES` times with backoff and dead-letters it, and the worker ends
the turn as `error`. Dropping the trigger is fixing the cause; a requeue then runs the turn again.
"""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from contextlib import AbstractContextManager, ExitStack
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import TYPE_CHECKING, Any, cast

import pytest
import redis
from sqlalchemy import select, text

from tests.conftest import child_env
from tests.support import ROOT, agentq, refusing, wait_for

if TYPE_CHECKING:
    from app.redis_client import StreamEntry
    from tests.conftest import Api, UpstreamLog, Workers, World

NAMESPACE = "agentq-dramatiq"


@pytest.fixture(autouse=True)
def _running(workers: Workers, upstream: UpstreamLog, api: Api, redis_client: redis.Redis) -> None:
    """A worker, a clean upstream log, no dead letters left by another test, and recovery past the flush.

    The `clean` fixture empties Redis; the next recovery sweep takes that for lost data and sends every
    pending turn again, which would give a failing turn of this test a second message to die with.
    """
    from app.db import transaction
    from app.redis_epoch import epoch_key

    with transaction() as session:
        session.execute(text("TRUNCATE dead_letters RESTART IDENTITY"))
    wait_for(lambda: redis_client.exists(epoch_key()), what="a recovery sweep after the Redis flush")


def _run_sql(statement: str) -> None:
    from app.db import transaction

    with transaction() as session:
        session.execute(text(statement))


def claims_refused(table: str, column: str, value: int) -> AbstractContextManager[None]:
    """Every attempt to move a row of `table` whose `column` is `value` to `processing` (a claim) raises a
    database error, until the block ends."""
    return refusing(_run_sql, f"agentq_test_refuse_{table}_{int(value)}", table, "UPDATE",
                    f"NEW.status = 'processing' AND NEW.{column} = {int(value)}")


def claims_fail(conversation_id: int) -> AbstractContextManager[None]:
    """Every attempt to start a turn of this conversation fails."""
    return claims_refused("conversation_messages", "conversation_id", conversation_id)


def dead_turns(world: Any, key: str, agent_id: int, *contents: str) -> list[tuple[int, dict[str, Any]]]:
    """Submit turns (at most the user's three at once) whose every delivery fails, in conversations of their
    own, all at once so that their retries run side by side; return each one's conversation and the turn as
    it ended."""
    conversations, accepted = [], []
    with ExitStack() as failing:
        for content in contents:  # a conversation with no message yet would be created again (the dedup window)
            conversations.append(world.conversation(key, agent_id))
            failing.enter_context(claims_fail(conversations[-1]))
            accepted.append(world.send(key, conversations[-1], content))
        assert [a.status_code for a in accepted] == [202] * len(contents), [a.json for a in accepted]
        ended = [world.wait_terminal(key, a.json["assistant_message"]["id"]) for a in accepted]
    return list(zip(conversations, ended, strict=True))


def dead_turn(world: Any, key: str, agent_id: int, content: str) -> tuple[int, dict[str, Any]]:
    return dead_turns(world, key, agent_id, content)[0]


def dead_test_run(world: Any, agent_id: int) -> tuple[int, dict[str, Any]]:
    """An admin test run of the agent whose every delivery failed: its id, and its dead letter."""
    api, admin = world.api, world.admin_key
    with claims_refused("admin_debug_logs", "agent_id", agent_id):
        run_id = api.post(f"/api/admin/agents/{agent_id}/debug/execute", admin, {"content": "hi"}).json["debug_log_id"]
        wait_for(lambda: api.get(f"/api/admin/debug-logs/{run_id}", admin).json["status"] == "error",
                 what="the test run to die")
    letter = wait_for(lambda: api.get("/api/admin/dead-letters", admin).json["items"], what="the dead letter")[0]
    assert (letter["actor"], letter["args"]) == ("run_debug_run", [run_id])
    return run_id, letter


def dead_count(redis_client: Any, queue: str = "turns") -> int:
    return int(redis_client.zcard(f"{NAMESPACE}:{queue}.XQ"))


def queue_of(api: Any, admin_key: str, name: str) -> dict[str, Any]:
    body = api.get("/api/admin/queues", admin_key).json
    return next(q for q in body["queues"] if q["name"] == name)


def ledger_rows(message_id: int) -> int:
    from app.db import transaction
    from app.models import CreditTransaction

    with transaction() as session:
        return len(session.scalars(select(CreditTransaction).where(CreditTransaction.message_id == message_id)).all())


def deliveries_of(turn_id: int) -> int:
    from app.db import transaction
    from app.models import Turn

    with transaction() as session:
        return session.get_one(Turn, turn_id).deliveries


def answer_text(body: str) -> str:
    """What a client shows after reading an event stream: the deltas since the last `restart`."""
    text = ""
    for block in body.split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line and not line.startswith(":"))
        if fields.get("event") == "status" and json.loads(fields["data"]).get("restart"):
            text = ""
        elif fields.get("event") == "delta":
            text += json.loads(fields["data"])["text"]
    return text


def dlq(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(agentq("dlq", *args), env=child_env(), capture_output=True, text=True, cwd=ROOT,
                          timeout=60)


def _set_fell_back(turn_id: int) -> None:
    from sqlalchemy import update

    from app.db import transaction
    from app.models import Turn

    with transaction() as session:
        session.execute(update(Turn).where(Turn.assistant_message_id == turn_id).values(fell_back=True))


def _fell_back_of(turn_id: int) -> bool:
    from app.db import transaction
    from app.models import Turn

    with transaction() as session:
        return session.get_one(Turn, turn_id).fell_back


def test_the_queue_view_counts_admin_test_runs_in_flight_beside_turns(world: World) -> None:
    """Test runs share the workers with turns (the `debug` queue): an operator looking for what holds them saw
    only the turns."""
    from app.db import transaction
    from app.models import DebugRun
    from app.models.base import utc_now

    agent_id = world.agent(world.model())
    admin_id = world.api.get("/api/me", world.admin_key).json["id"]
    with transaction() as session:  # held out of the workers' reach: a lease an hour ahead, sent just now
        session.add_all([DebugRun(agent_id=agent_id, admin_id=admin_id, input="x", status=status,
                                  lease_token="held", lease_expires_at=utc_now() + timedelta(hours=1),
                                  enqueued_at=utc_now())
                         for status in ("pending", "processing", "processing", "success")])
    queues = world.api.get("/api/admin/queues", world.admin_key).json
    assert (queues["turns"], queues["test_runs"]) == ({"pending": 0, "processing": 0}, {"pending": 1, "processing": 2})


def test_a_turn_whose_retries_run_out_is_a_dead_letter_and_runs_again_when_requeued(
        world: World, redis_client: redis.Redis) -> None:
    api, admin = world.api, world.admin_key
    agent_id = world.agent(world.model(price_in="1", price_out="1"))
    _, key = world.user(balance="10")
    conversation_id, ended = dead_turn(world, key, agent_id, "try me")
    turn_id = ended["id"]

    assert ended["status"] == "error"
    # The user reads the exception's type; its message (here the SQL and its parameters) is the dead letter's.
    assert ended["error_message"] == "retries exhausted after 3 attempts: sqlalchemy.exc.ProgrammingError"
    assert world.api.get("/api/me", key).json["balance"] == "10.000000"
    assert dead_count(redis_client) == 1
    assert queue_of(api, admin, "turns")["dead_letters"] == 1
    queues = api.get("/api/admin/queues", admin).json
    assert (queues["turns"], queues["test_runs"]) == ({"pending": 0, "processing": 0}, {"pending": 0, "processing": 0})

    items = api.get("/api/admin/dead-letters", admin).json["items"]
    assert len(items) == 1
    item = items[0]
    assert (item["queue"], item["actor"], item["args"], item["retries"]) == ("turns", "run_turn", [turn_id], 2)
    assert "simulated database failure" in item["error"]
    assert "from the broker's copy" not in item["error"]
    died = datetime.fromisoformat(item["dead_at"])
    assert timedelta(0) <= datetime.now(UTC) - died < timedelta(seconds=30)
    assert (item["run_status"], item["in_broker"]) == ("error", True)
    detail = api.get(f"/api/admin/dead-letters/{item['id']}", admin).json
    assert {k: detail[k] for k in item} == item
    assert "RaiseException" in detail["traceback"]
    _set_fell_back(turn_id)  # a switch to the fallback before the run died does not outlive its requeue

    requeued = api.post(f"/api/admin/dead-letters/{item['id']}/requeue", admin)
    assert requeued.status_code == 202, requeued.json
    assert requeued.json == {"requeued": [item["id"]], "skipped": []}
    assert _fell_back_of(turn_id) is False
    done = world.wait_terminal(key, turn_id)
    assert done["status"] == "success"
    assert done["content"] == "echo: try me"
    assert done["error_message"] is None
    assert ledger_rows(turn_id) == 1
    assert (done["cost"], world.api.get("/api/me", key).json["balance"]) == ("0.010000", "9.990000")
    assert [m["status"] for m in api.get(f"/api/conversations/{conversation_id}/messages", key).json["items"]] \
        == ["success", "success"]
    assert deliveries_of(turn_id) == 1001
    # A client that followed a run from before the requeue (its first delivery's attempt, 100) resumes with
    # that run's event id: it is told to start over and gets the whole new answer, not its tail.
    resumed = api.get(f"/api/messages/{turn_id}/stream", key, headers={"Last-Event-ID": f"{turn_id}/0-0.100.3"})
    assert resumed.status_code == 200
    assert answer_text(resumed.get_data(as_text=True)) == "echo: try me"

    assert api.get("/api/admin/dead-letters", admin).json["items"] == []
    assert dead_count(redis_client) == 0
    assert queue_of(api, admin, "turns")["dead_letters"] == 0
    again = api.post(f"/api/admin/dead-letters/{item['id']}/requeue", admin)
    requeued_already = (f"Dead letter {item['id']} was requeued already; its run went back to the queue and it is "
                        "no longer a dead letter.")
    assert (again.status_code, again.json["error"]["message"]) == (404, requeued_already)
    for method in ("GET", "DELETE"):
        shown = api.call(method, f"/api/admin/dead-letters/{item['id']}", admin)
        assert (shown.status_code, shown.json["error"]["message"]) == (404, requeued_already)


def test_a_requeued_turn_does_not_show_the_text_its_dead_run_kept(world: World, redis_client: redis.Redis) -> None:
    """A run that ends `error` keeps what its readers were sent; requeued, the turn is pending again and its
    answer starts over: it showed the old run's text and model until the new run ended."""
    from app.db import transaction
    from app.turn_state import reopen_turn

    agent_id = world.agent(world.model())
    _, key = world.user()
    _, ended = dead_turn(world, key, agent_id, "start me over")
    with transaction() as session:
        session.execute(text("UPDATE conversation_messages SET content = 'kept', model = 'kept-model' "
                             "WHERE id = :id"), {"id": ended["id"]})
    with transaction() as session:
        reopen_turn(session, ended["id"], datetime.now(UTC))
    reopened = world.message(key, ended["id"])
    assert (reopened["status"], reopened["content"], reopened["model"], reopened["error_message"]) == (
        "pending", "", None, None)


def test_purging_dead_letters_through_the_api_leaves_none(world: World, redis_client: redis.Redis) -> None:
    api, admin = world.api, world.admin_key
    agent_id = world.agent(world.model())
    _, key = world.user()
    ended = [turn for _, turn in dead_turns(world, key, agent_id, "doomed 0", "doomed 1")]
    assert [t["status"] for t in ended] == ["error", "error"]
    assert dead_count(redis_client) == 2

    ids = [i["id"] for i in api.get("/api/admin/dead-letters", admin).json["items"]]
    assert len(ids) == 2
    _, user_key = world.user("mallory")
    assert api.delete(f"/api/admin/dead-letters/{ids[0]}", user_key).status_code == 403
    assert api.delete(f"/api/admin/dead-letters/{ids[0]}").status_code == 401
    assert api.delete(f"/api/admin/dead-letters/{ids[0]}", admin).status_code == 204
    assert api.delete(f"/api/admin/dead-letters/{ids[0]}", admin).status_code == 404
    assert [i["id"] for i in api.get("/api/admin/dead-letters", admin).json["items"]] == ids[1:]
    assert dead_count(redis_client) == 1
    assert api.delete(f"/api/admin/dead-letters/{ids[1]}", admin).status_code == 204

    assert api.get("/api/admin/dead-letters", admin).json["items"] == []
    assert dead_count(redis_client) == 0
    assert queue_of(api, admin, "turns")["dead_letters"] == 0
    assert [world.message(key, t["id"])["status"] for t in ended] == ["error", "error"]


@pytest.mark.parametrize("deleted", ["conversation", "agent"])
def test_a_dead_turn_of_a_deleted_conversation_or_agent_is_not_run_again(world: World, deleted: str) -> None:
    """Deleting the conversation was its user's last word: a requeue is refused (409) and the turn stays `error`,
    instead of running, hidden, charged and holding a slot the user could no longer free. A deleted agent
    takes no new work, a requeued turn included."""
    api, admin = world.api, world.admin_key
    agent_id = world.agent(world.model())
    _, key = world.user(balance="10")
    conversation_id, ended = dead_turn(world, key, agent_id, "gone")
    gone = api.delete(f"/api/conversations/{conversation_id}", key) if deleted == "conversation" else api.delete(
        f"/api/admin/agents/{agent_id}", admin)
    assert gone.status_code == 204
    item = api.get("/api/admin/dead-letters", admin).json["items"][0]
    refused = api.post(f"/api/admin/dead-letters/{item['id']}/requeue", admin)
    assert (refused.status_code, refused.json["error"]["code"]) == (409, f"{deleted}_deleted")
    assert api.post("/api/admin/dead-letters/requeue-all", admin).json["requeued"] == []
    from app.db import transaction
    from app.models import ConversationMessage

    with transaction() as session:
        assert session.get_one(ConversationMessage, ended["id"]).status == "error"
    assert ledger_rows(ended["id"]) == 0


def test_a_conversation_deleted_while_its_dead_turn_is_being_requeued_does_not_get_it_run(
        world: World, web_server: str, database: str) -> None:
    """The delete committed between the requeue's read of the conversation and its commit: it found no turn
    in flight to stop, and the requeued turn ran, charged, in a conversation its user could no longer see or
    stop. The test holds the agent's row, which the requeue reads after the conversation, until the delete
    is done; the requeue must then find the conversation deleted."""
    from concurrent.futures import ThreadPoolExecutor

    import httpx
    import psycopg

    api, admin = world.api, world.admin_key
    agent_id = world.agent(world.model())
    _, key = world.user(balance="10")
    conversation_id, ended = dead_turn(world, key, agent_id, "requeued as it goes")
    item = api.get("/api/admin/dead-letters", admin).json["items"][0]
    url = database.replace("+psycopg", "")
    with psycopg.connect(url) as holder, psycopg.connect(url, autocommit=True) as watcher, \
            ThreadPoolExecutor(1) as pool:
        holder.execute("SELECT 1 FROM agents WHERE id = %s FOR UPDATE", (agent_id,))
        requeue = pool.submit(httpx.post, f"{web_server}/api/admin/dead-letters/{item['id']}/requeue",
                              headers={"Authorization": f"Bearer {admin}"}, timeout=30)
        wait_for(lambda: watcher.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query ILIKE %s",
            ("%FROM agents%",)).fetchone()[0] == 1, what="the requeue to wait for the agent")  # type: ignore[index]
        assert api.delete(f"/api/conversations/{conversation_id}", key).status_code == 204
        holder.rollback()
        refused = requeue.result()
    assert (refused.status_code, refused.json()["error"]["code"]) == (409, "conversation_deleted")
    from app.db import transaction
    from app.models import ConversationMessage

    with transaction() as session:
        assert session.get_one(ConversationMessage, ended["id"]).status == "error"
    assert ledger_rows(ended["id"]) == 0


def test_a_dead_test_run_of_a_deleted_agent_is_not_run_again(world: World, upstream: UpstreamLog) -> None:
    """An admin's test run dead-lettered, then its agent (and its model) deleted: the requeue is refused as a
    turn's is (409 `agent_deleted`), instead of calling a deleted model and logging its cost."""
    from app.db import transaction
    from app.models import DebugRun

    api, admin = world.api, world.admin_key
    model_id = world.model()
    agent_id = world.agent(model_id)
    run_id, item = dead_test_run(world, agent_id)
    assert api.delete(f"/api/admin/agents/{agent_id}", admin).status_code == 204
    assert api.delete(f"/api/admin/models/{model_id}", admin).status_code == 204
    refused = api.post(f"/api/admin/dead-letters/{item['id']}/requeue", admin)
    assert (refused.status_code, refused.json["error"]["code"]) == (409, "agent_deleted")
    assert api.post("/api/admin/dead-letters/requeue-all", admin).json["requeued"] == []
    with transaction() as session:
        assert session.get_one(DebugRun, run_id).status == "error"
    assert upstream.requests() == []


def test_a_dead_letter_whose_test_run_is_processing_again_is_not_requeued(world: World, upstream: UpstreamLog) -> None:
    """A dead letter's run that a delivery runs again (another of its dead letters requeued, by another
    operator) is not reopened: moving it from `processing` back to `pending` would drop its live lease and
    run it twice. The status rule allows `pending` from `error` alone."""
    from app.db import transaction
    from app.models import DebugRun

    api, admin = world.api, world.admin_key
    run_id, item = dead_test_run(world, world.agent(world.model()))
    with transaction() as session:
        session.execute(text("UPDATE admin_debug_logs SET status = 'processing', lease_token = 'live', "
                             "lease_expires_at = now() + interval '1 hour' WHERE id = :id"), {"id": run_id})
    refused = api.post(f"/api/admin/dead-letters/{item['id']}/requeue", admin)
    assert (refused.status_code, refused.json["error"]["code"]) == (409, "run_not_in_error")
    assert refused.json["error"]["message"] == (f"Dead letter {item['id']}: its run is processing, not in error, "
                                                "so it cannot be requeued.")
    with transaction() as session:
        run = session.get_one(DebugRun, run_id)
        assert (run.status, run.lease_token) == ("processing", "live")
    assert upstream.requests() == []


def test_a_requeued_test_run_starts_again_from_its_primary(world: World, upstream: UpstreamLog) -> None:
    """A test run that had switched to its fallback before it died starts over from its primary when requeued,
    as a requeued turn does: kept, the switch sent the new run to the fallback alone, logged under its name.
    Its deliveries are numbered on from the next thousand, as a turn's: they started over at 1, so the attempts
    of its two lives were recorded under the same delivery numbers."""
    from sqlalchemy import update

    from app.db import transaction
    from app.models import DebugRun, ModelAttempt

    api, admin = world.api, world.admin_key
    run_id, item = dead_test_run(world, world.agent(world.model("first"), world.model("second")))
    with transaction() as session:
        session.execute(update(DebugRun).where(DebugRun.id == run_id).values(fell_back=True))
    assert api.post(f"/api/admin/dead-letters/{item['id']}/requeue", admin).status_code == 202
    ran = wait_for(lambda: (run := api.get(f"/api/admin/debug-logs/{run_id}", admin).json)["status"] == "success"
                   and run, what="the requeued run to answer")
    assert (ran["model"], ran["output"]) == ("first", "echo: hi")
    with transaction() as session:
        run = session.get_one(DebugRun, run_id)
        assert (run.fell_back, run.deliveries) == (False, 1001)
        attempts = session.execute(select(ModelAttempt.delivery, ModelAttempt.model_name, ModelAttempt.outcome)
                                   .where(ModelAttempt.debug_log_id == run_id)).all()
        assert [tuple(a) for a in attempts] == [(1001, "first", "success")]


def test_a_dead_turn_of_a_user_at_the_limit_of_active_conversations_is_refused(world: World) -> None:
    """A requeued turn becomes one of its user's active conversations: with the user at the limit it is
    refused 429, as the user's own message would be, and stays `error`."""
    from app.db import transaction

    api, admin = world.api, world.admin_key
    agent_id = world.agent(world.model())
    _, key = world.user()
    turn = dead_turn(world, key, agent_id, "later")[1]
    item = api.get("/api/admin/dead-letters", admin).json["items"][0]
    others = [world.conversation(key, agent_id, project_id=i) for i in range(3)]
    with transaction() as session:  # the user's three (AGENTQ_MAX_ACTIVE_CONVERSATIONS) conversations in flight
        session.execute(text("INSERT INTO conversation_messages (conversation_id, seq, role, content, status, "
                             "created_at, updated_at) SELECT id, 1, 'assistant', '', 'processing', now(), now() "
                             "FROM conversations WHERE id = ANY(:ids)"), {"ids": others})
    try:
        refused = api.post(f"/api/admin/dead-letters/{item['id']}/requeue", admin)
        assert (refused.status_code, refused.json["error"]["code"]) == (429, "too_many_active_conversations")
        assert world.message(key, turn["id"])["status"] == "error"
    finally:  # no turn holds them: no one else would end them
        with transaction() as session:
            session.execute(text("DELETE FROM conversation_messages WHERE conversation_id = ANY(:ids)"),
                            {"ids": others})


def test_a_dead_turn_of_a_busy_conversation_is_refused_in_the_operators_words(world: World) -> None:
    """The conversation has another turn in flight: the requeue is 409 `conversation_busy`, with the dead
    letter named, as the limit's refusal is, rather than the user's sentence."""
    api, admin = world.api, world.admin_key
    agent_id = world.agent(world.model(upstream="echo;ttft=60"))
    _, key = world.user(balance="10")
    conversation_id, ended = dead_turn(world, key, agent_id, "first")
    assert ended["status"] == "error"
    running = world.send(key, conversation_id, "second").json["assistant_message"]["id"]
    item = api.get("/api/admin/dead-letters", admin).json["items"][0]
    refused = api.post(f"/api/admin/dead-letters/{item['id']}/requeue", admin)
    assert refused.status_code == 409
    assert refused.json["error"] == {"code": "conversation_busy", "message": f"Dead letter {item['id']}: its "
                                     "conversation has a turn in flight; requeue it when that turn ends."}
    assert api.post(f"/api/messages/{running}/cancel", key).status_code == 202
    assert world.wait_terminal(key, running)["status"] == "cancelled"


def test_a_turn_stopped_while_its_message_waits_for_a_retry_ends_cancelled_at_once(world: World) -> None:
    """Its first delivery failed after the claim (the answer could not be written), so the turn is
    `processing` with no worker holding it; the stop ends it `cancelled` at once, charging nothing (it was
    flagged for a retry that failed too, and the message's death ended the turn `error`, then, once the stop
    came first, `cancelled`), and the retries that follow find it ended."""
    from app.db import transaction
    from app.models import Turn

    agent_id = world.agent(world.model())
    _, key = world.user(balance="10")
    conversation_id = world.conversation(key, agent_id)
    with ExitStack() as failing:
        failing.enter_context(refusing(_run_sql, f"agentq_test_no_answer_{conversation_id}", "conversation_messages",
                                       "UPDATE", f"NEW.status = 'success' AND NEW.conversation_id = {conversation_id}"))
        # Each retry's claim fails a second into its statement: the stop has seconds to land before the death.
        failing.enter_context(refusing(_run_sql, f"agentq_test_no_retry_{conversation_id}", "turns", "UPDATE",
                                       f"NEW.deliveries >= 2 AND NEW.conversation_id = {conversation_id}",
                                       after_seconds=1))
        turn = world.send(key, conversation_id).json["assistant_message"]["id"]

        def handed_to_retry() -> bool:
            with transaction() as session:
                row = session.get_one(Turn, turn)
                session.refresh(row)
                return row.deliveries == 1 and row.lease_token is None and row.lease_expires_at is not None

        wait_for(handed_to_retry, interval=0.02, what="the first delivery to fail and hand the turn to a retry")
        stopped = world.api.post(f"/api/messages/{turn}/cancel", key)
        assert (stopped.status_code, stopped.json["status"]) == (202, "cancelled")
        ended = world.wait_terminal(key, turn)
    assert (ended["status"], ended["error_message"]) == ("cancelled", "stopped on request")
    assert world.api.get("/api/me", key).json["balance"] == "10.000000"
    assert ledger_rows(turn) == 0


def test_a_purged_dead_letter_is_not_brought_back_by_a_late_record(world: World) -> None:
    """The worker's record of a death can come after the operator purged the letter (the listing adopted it
    from the broker first): the broker no longer holds the message, so no row comes back."""
    import dramatiq

    from app.db import transaction
    from app.dead_letters import record_death
    from app.models import DeadLetter

    message: dramatiq.Message[Any] = dramatiq.Message(queue_name="turns", actor_name="run_turn", args=(123,), kwargs={},
                               options={"redis_message_id": uuid.uuid4().hex, "retries": 3,
                                        "traceback": "Traceback...\nRuntimeError: boom"})
    record_death(message)
    with transaction() as session:
        assert session.scalars(select(DeadLetter)).all() == []


def test_a_turn_requeued_before_the_worker_ended_its_dead_run_is_not_ended_with_it(world: World) -> None:
    """The worker records a dead message's letter, then ends its run. A run given up is `error` before its
    message dies, so its letter can be requeued at once (a listing adopts it from the broker): a requeue in
    between was undone, the turn pending again ended `error` with it and its letter, marked requeued, gone.
    The end now takes the letter's row first and leaves a requeued run alone."""
    import dramatiq

    from app.db import transaction
    from app.message_outcomes import message_died
    from app.models import ConversationMessage, DeadLetter

    admin = world.admin_key
    agent_id = world.agent(world.model())
    _, key = world.user(balance="10")
    conversation_id, ended = dead_turn(world, key, agent_id, "again, please")
    turn_id = ended["id"]
    item = world.api.get("/api/admin/dead-letters", admin).json["items"][0]
    with transaction() as session:
        letter = session.get_one(DeadLetter, item["id"]).redis_message_id
    with claims_fail(conversation_id):  # the requeued turn stays pending meanwhile
        assert world.api.post(f"/api/admin/dead-letters/{item['id']}/requeue", admin).status_code == 202
        late: dramatiq.Message[Any] = dramatiq.Message(
            queue_name="turns", actor_name="run_turn", args=(turn_id,), kwargs={},
            options={"redis_message_id": letter, "retries": 3,
                     "traceback": "app.deliveries.RunGivenUp: gave up after 3 deliveries\n"})
        message_died(late)
        with transaction() as session:
            assert session.get_one(ConversationMessage, turn_id).status == "pending"
    done = world.wait_terminal(key, turn_id)
    assert (done["status"], done["content"]) == ("success", "echo: again, please")
    assert ledger_rows(turn_id) == 1


def test_a_dead_message_of_a_turn_that_ended_leaves_its_end_and_its_charge(world: World) -> None:
    """A duplicate delivery of a turn that another already ended (a redelivery after a broker's failover) may
    run out of retries during an outage and die: its end of the run is refused by the turns' status guard,
    which alone protects an ended turn (it holds no lease), so the answer, its status and its charge stand."""
    import dramatiq

    from app.message_outcomes import message_died

    agent_id = world.agent(world.model())
    _, key = world.user(balance="10")
    done = world.wait_terminal(key, world.send(key, world.conversation(key, agent_id)).json["assistant_message"]["id"])
    assert done["status"] == "success"
    late: dramatiq.Message[Any] = dramatiq.Message(
        queue_name="turns", actor_name="run_turn", args=(done["id"],), kwargs={},
        options={"redis_message_id": uuid.uuid4().hex, "retries": 3,
                 "traceback": "psycopg.OperationalError: the database went away\n"})
    message_died(late)
    assert world.message(key, done["id"]) == done
    assert ledger_rows(done["id"]) == 1
    assert world.api.get("/api/me", key).json["balance"] == f"{Decimal(10) - Decimal(done['cost']):.6f}"


def test_requeue_all_skips_with_its_reason_a_deleted_conversations_letter_and_one_of_a_user_at_the_limit(
        world: World) -> None:
    """Requeue-all skips, each with the reason a single requeue would give, a letter whose conversation was
    deleted and one whose user has the most conversations in flight (a 429 alone), and requeues it once the
    user is under the limit again."""
    from app.db import transaction

    api, admin = world.api, world.admin_key
    agent_id = world.agent(world.model())
    _, key = world.user(balance="10")
    (gone_conversation, gone), (_, kept) = dead_turns(world, key, agent_id, "gone", "kept")
    assert api.delete(f"/api/conversations/{gone_conversation}", key).status_code == 204
    letters = {item["args"][0]: item["id"] for item in api.get("/api/admin/dead-letters", admin).json["items"]}
    gone_letter, kept_letter = letters[gone["id"]], letters[kept["id"]]
    others = [world.conversation(key, agent_id, project_id=i) for i in range(3)]
    with transaction() as session:  # three conversations in flight: AGENTQ_MAX_ACTIVE_CONVERSATIONS
        session.execute(text("INSERT INTO conversation_messages (conversation_id, seq, role, content, status, "
                             "created_at, updated_at) SELECT id, 1, 'assistant', '', 'processing', now(), now() "
                             "FROM conversations WHERE id = ANY(:ids)"), {"ids": others})
    try:
        refused = api.post("/api/admin/dead-letters/requeue-all", admin)
        assert (refused.status_code, refused.json["requeued"]) == (202, [])
        assert {item["id"]: item["reason"] for item in refused.json["skipped"]} == {
            gone_letter: f"Dead letter {gone_letter}: its conversation was deleted, so its turn is not run again.",
            kept_letter: f"Dead letter {kept_letter}: its user already has 3 conversations with a turn in flight; "
                         "requeue it when one ends."}
        assert world.message(key, kept["id"])["status"] == "error"
    finally:
        with transaction() as session:
            session.execute(text("DELETE FROM conversation_messages WHERE conversation_id = ANY(:ids)"),
                            {"ids": others})
    again = api.post("/api/admin/dead-letters/requeue-all", admin)
    assert (again.status_code, again.json["requeued"]) == (202, [kept_letter])
    assert [item["id"] for item in again.json["skipped"]] == [gone_letter]
    assert world.wait_terminal(key, kept["id"])["status"] == "success"


def test_a_requeued_letter_the_broker_still_holds_is_taken_out_by_the_next_listing(
        world: World, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    """The requeue's own take of the broker's entry failed (Redis refused it): the letter is requeued all the same,
    and the next listing takes the entry out, so that it is neither listed nor requeued again."""
    import app.dead_letter_requeue

    api, admin = world.api, world.admin_key
    agent_id = world.agent(world.model())
    _, key = world.user()
    turn = dead_turn(world, key, agent_id, "kept by the broker")[1]
    item = api.get("/api/admin/dead-letters", admin).json["items"][0]

    def refused(queue: str, ident: str) -> None:
        raise redis.ConnectionError("refused")

    with monkeypatch.context() as patched:
        patched.setattr(app.dead_letter_requeue, "take_entry", refused)
        assert api.post(f"/api/admin/dead-letters/{item['id']}/requeue", admin).status_code == 202
    assert world.wait_terminal(key, turn["id"])["status"] == "success"
    assert dead_count(redis_client) == 1
    assert api.get("/api/admin/dead-letters", admin).json["items"] == []
    assert dead_count(redis_client) == 0


def test_the_dlq_command_lists_shows_requeues_and_purges(world: World, redis_client: redis.Redis) -> None:
    agent_id = world.agent(world.model())
    _, key = world.user()
    first, second, third = (ended for _, ended in dead_turns(world, key, agent_id, "first", "second", "third"))

    listed = dlq("list")
    assert listed.returncode == 0, listed.stderr
    items = json.loads(listed.stdout)["items"]
    assert sorted(i["args"][0] for i in items) == sorted([first["id"], second["id"], third["id"]])
    assert {(i["queue"], i["actor"], i["retries"]) for i in items} == {("turns", "run_turn", 2)}
    assert all("simulated database failure" in i["error"] and i["dead_at"] for i in items)
    by_turn = {i["args"][0]: i["id"] for i in items}

    shown = dlq("show", str(by_turn[first["id"]]))
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["args"] == [first["id"]]
    assert "simulated database failure" in json.loads(shown.stdout)["traceback"]

    requeued = dlq("requeue", str(by_turn[first["id"]]))
    assert requeued.returncode == 0, requeued.stderr
    assert json.loads(requeued.stdout) == {"requeued": [by_turn[first["id"]]], "skipped": []}
    assert world.wait_terminal(key, first["id"])["status"] == "success"

    purged = dlq("purge", str(by_turn[second["id"]]))
    assert purged.returncode == 0, purged.stderr
    assert json.loads(purged.stdout) == {"purged": [by_turn[second["id"]]]}
    assert [i["args"] for i in json.loads(dlq("list").stdout)["items"]] == [[third["id"]]]

    everything = dlq("requeue", "--all")
    assert everything.returncode == 0, everything.stderr
    assert json.loads(everything.stdout) == {"requeued": [by_turn[third["id"]]], "skipped": []}
    assert world.wait_terminal(key, third["id"])["status"] == "success"
    assert world.message(key, second["id"])["status"] == "error"
    assert [ledger_rows(t["id"]) for t in (first, second, third)] == [1, 0, 1]
    assert json.loads(dlq("list").stdout) == {"items": []}
    assert dead_count(redis_client) == 0

    missing = dlq("show", "999999")
    assert missing.returncode == 1
    assert json.loads(missing.stderr)["error"]["code"] == "not_found"
    assert dlq("purge").returncode == 2  # a usage error, like every other
    assert dlq("requeue", "1", "--all").returncode == 2


def test_purge_all_empties_the_dead_letter_queue(world: World, redis_client: redis.Redis) -> None:
    agent_id = world.agent(world.model())
    _, key = world.user()
    dead_turns(world, key, agent_id, "gone 0", "gone 1")
    assert dead_count(redis_client) == 2

    purged = dlq("purge", "--all")
    assert purged.returncode == 0, purged.stderr
    assert len(json.loads(purged.stdout)["purged"]) == 2
    assert dead_count(redis_client) == 0
    assert json.loads(dlq("list").stdout) == {"items": []}
    assert queue_of(world.api, world.admin_key, "turns")["dead_letters"] == 0


def test_a_dead_letter_the_worker_could_not_record_is_adopted_from_the_broker(
        world: World, redis_client: redis.Redis) -> None:
    from app.db import transaction

    api, admin = world.api, world.admin_key
    agent_id = world.agent(world.model())
    _, key = world.user()
    turn = dead_turn(world, key, agent_id, "unrecorded")[1]
    with transaction() as session:
        session.execute(text("DELETE FROM dead_letters"))

    assert queue_of(api, admin, "turns")["dead_letters"] == 1
    items = api.get("/api/admin/dead-letters", admin).json["items"]
    assert len(items) == 1
    assert (items[0]["args"], items[0]["retries"], items[0]["in_broker"]) == ([turn["id"]], 2, True)
    assert "simulated database failure" in items[0]["error"]
    assert "from the broker's copy" in items[0]["error"]
    assert api.post(f"/api/admin/dead-letters/{items[0]['id']}/requeue", admin).status_code == 202
    assert world.wait_terminal(key, turn["id"])["status"] == "success"


def test_a_dead_letter_lost_by_redis_is_still_listed_and_requeued_from_its_row(
        world: World, redis_client: redis.Redis) -> None:
    api, admin = world.api, world.admin_key
    agent_id = world.agent(world.model())
    _, key = world.user()
    turn = dead_turn(world, key, agent_id, "forgotten")[1]
    redis_client.delete(f"{NAMESPACE}:turns.XQ", f"{NAMESPACE}:turns.XQ.msgs")

    assert queue_of(api, admin, "turns")["dead_letters"] == 1  # counted as listed, not from the broker alone
    items = api.get("/api/admin/dead-letters", admin).json["items"]
    assert [(i["args"], i["in_broker"]) for i in items] == [([turn["id"]], False)]
    assert api.post("/api/admin/dead-letters/requeue-all", admin).json == {"requeued": [items[0]["id"]],
                                                                          "skipped": []}
    assert world.wait_terminal(key, turn["id"])["status"] == "success"
    assert api.get("/api/admin/dead-letters", admin).json["items"] == []
    assert queue_of(api, admin, "turns")["dead_letters"] == 0


def test_with_redis_out_of_reach_dead_letters_are_listed_and_counted_from_their_rows(
        world: World, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    """The rows are the durable record: with Redis out of reach the listing says it cannot tell whether the
    broker holds each letter (`in_broker` null, as the API's schema allows) and the queues report the
    letters by their rows, the counts only Redis holds as null."""
    from app.config import get_settings

    api, admin = world.api, world.admin_key
    agent_id = world.agent(world.model())
    _, key = world.user()
    turn = dead_turn(world, key, agent_id, "listed without redis")[1]
    with monkeypatch.context() as patched:
        patched.setenv("REDIS_URL", "redis://127.0.0.1:9/0")
        get_settings.cache_clear()
        items = api.get("/api/admin/dead-letters", admin).json["items"]
        assert [(i["args"], i["in_broker"]) for i in items] == [([turn["id"]], None)]
        assert api.get(f"/api/admin/dead-letters/{items[0]['id']}", admin).json["in_broker"] is None
        body = api.get("/api/admin/queues", admin).json
    get_settings.cache_clear()
    assert body["redis_error"].startswith("ConnectionError")
    assert {q["name"]: (q["ready"], q["delayed"], q["dead_letters"]) for q in body["queues"]} == {
        "turns": (None, None, 1), "debug": (None, None, 0)}


def test_a_dead_letter_whose_turn_ended_otherwise_is_not_requeued(world: World, redis_client: redis.Redis) -> None:
    from app.db import transaction

    api, admin = world.api, world.admin_key
    agent_id = world.agent(world.model())
    _, key = world.user()
    turn = dead_turn(world, key, agent_id, "settled")[1]
    with transaction() as session:
        session.execute(text("UPDATE conversation_messages SET status = 'cancelled' WHERE id = :id"),
                        {"id": turn["id"]})
    item = api.get("/api/admin/dead-letters", admin).json["items"][0]
    assert item["run_status"] == "cancelled"
    # Its user at the limit of conversations in flight: the letter's own state is what the operator is told
    # (the limit was checked first, and answered 429 "You already have...", worded for the user).
    others = [world.conversation(key, agent_id, project_id=i) for i in range(3)]
    with transaction() as session:
        session.execute(text("INSERT INTO conversation_messages (conversation_id, seq, role, content, status, "
                             "created_at, updated_at) SELECT id, 1, 'assistant', '', 'processing', now(), now() "
                             "FROM conversations WHERE id = ANY(:ids)"), {"ids": others})
    refused = api.post(f"/api/admin/dead-letters/{item['id']}/requeue", admin)
    assert refused.status_code == 409
    assert refused.json["error"]["code"] == "run_not_in_error"
    assert api.post("/api/admin/dead-letters/requeue-all", admin).json["requeued"] == []
    assert world.message(key, turn["id"])["status"] == "cancelled"
    assert dead_count(redis_client) == 1


UNKNOWN: tuple[str, list[object]] = ("unknown", [])


@pytest.mark.parametrize(("changes", "score", "read"), [
    ({"options": {"retries": "many"}}, 1, UNKNOWN), ({"options": []}, 1, UNKNOWN),
    ({"options": {"traceback": 5}}, 1, UNKNOWN), ({"options": {}}, 1e300, ("run_turn", [2])),
    ({"options": {"retries": 2**40}}, 1, UNKNOWN), ({"options": {"traceback": "nul\x00here"}}, 1, UNKNOWN),
    ({"options": {"traceback": "half\ud800pair"}}, 1, UNKNOWN), ({"args": ["half\ud800pair"]}, 1, UNKNOWN),
    ({"args": [float("nan")]}, 1, UNKNOWN), ({"args": [1, float("inf")]}, 1, UNKNOWN),
    ({"actor_name": "run\x00turn"}, 1, UNKNOWN), ({"actor_name": "a" * 201}, 1, UNKNOWN),
])
def test_a_dead_body_of_odd_shape_in_redis_is_listed_not_a_500(
        world: World, redis_client: redis.Redis, changes: dict[str, Any], score: float,
        read: tuple[str, list[object]]) -> None:
    """These keys are open to whatever writes to Redis: one body whose options were a list, whose retries
    were a word or past a 32-bit integer, whose traceback a number or text no database stores (a NUL, a lone
    surrogate), whose arguments held such text or a NaN, whose actor's name was such text or longer than a
    row keeps, or a score past any date, made every listing of every dead letter (API and `agentq dlq list`)
    fail with a 500 until the entry was deleted by hand."""
    import json

    api, admin = world.api, world.admin_key
    body = {"queue_name": "turns", "actor_name": "run_turn", "args": [2], "kwargs": {}, "options": {},
            "message_id": "odd-body", "message_timestamp": 1, **changes}
    # Scored as it dies now: Dramatiq's broker maintenance (now and then, in any worker) purges dead messages
    # past their time to live, so a score of 1 ms after the epoch could vanish before the listing.
    redis_client.zadd(f"{NAMESPACE}:turns.XQ", {"odd-body": time.time() * 1000 if score == 1 else score})
    redis_client.hset(f"{NAMESPACE}:turns.XQ.msgs", "odd-body", json.dumps(body))
    listed = api.get("/api/admin/dead-letters", admin)
    assert listed.status_code == 200, listed.json
    [item] = listed.json["items"]
    assert (item["actor"], item["args"], item["retries"], item["in_broker"]) == (*read, 0, True)
    assert api.delete(f"/api/admin/dead-letters/{item['id']}", admin).status_code == 204
    assert dead_count(redis_client) == 0


def test_a_run_given_up_after_a_retry_is_a_dead_letter_that_counts_that_retry() -> None:
    """Dramatiq counts a failure it judges in `retries` before it dead-letters the message (the dead letter
    shows one less: the retries made); a give-up, which it does not judge (`throws`), was not counted, so a
    run given up at its retry showed no retry."""
    import dramatiq

    from app.deliveries import RunGivenUp
    from app.message_outcomes import delivery_failed

    message: dramatiq.Message[None] = dramatiq.Message(queue_name="turns", actor_name="run_turn", args=(7,), kwargs={},
                               options={"retries": 1})
    delivery_failed(message, RunGivenUp("gave up after 5 deliveries"))
    assert (message.options["retries"], message.options["traceback"]) == (
        2, "app.deliveries.RunGivenUp: gave up after 5 deliveries\n")


def test_a_dead_letters_error_is_the_exceptions_line_not_postgresqls_hint() -> None:
    """PostgreSQL points at the SQL with an indented caret; the line after it (`HINT:`) was taken for the error."""
    from app.dead_letters import error_summary

    trace = "\n".join([
        "Traceback (most recent call last):", '  File "/srv/a.py", line 3, in run', "    claim()", "    ^^^^^^^",
        "sqlalchemy.exc.ProgrammingError: (psycopg.errors.UndefinedFunction) operator does not exist: bigint = text",
        "LINE 1: ...WHERE turns.assistant_message_id = 'abc'", "                                           ^",
        "HINT:  No operator matches the given name and argument types.", "[SQL: SELECT 1]"])
    assert error_summary(trace) == ("sqlalchemy.exc.ProgrammingError: (psycopg.errors.UndefinedFunction) operator "
                                    "does not exist: bigint = text")
    assert error_summary("app.deliveries.RunGivenUp: gave up after 5 deliveries\n") == (
        "app.deliveries.RunGivenUp: gave up after 5 deliveries")


def test_a_dead_letter_id_dramatiq_never_writes_is_left_out_not_a_500(world: World, redis_client: redis.Redis) -> None:
    """Ids in the dead-letter zset that are not printable ASCII or longer than a row keeps (64) made the
    listing, the queues and /metrics answer 500 while they were there; they are left out of all three (and
    logged), and a real dead letter beside them is still listed."""
    api, admin = world.api, world.admin_key
    junk = [b"\xff\xfe-id", b"id\x00nul", b"x" * 65, b"tab\there"]
    redis_client.zadd(f"{NAMESPACE}:turns.XQ", dict.fromkeys([*junk, b"real-id"], time.time() * 1000))
    redis_client.hset(f"{NAMESPACE}:turns.XQ.msgs", mapping=dict.fromkeys([*junk, b"real-id"], b"{}"))
    try:
        listed = api.get("/api/admin/dead-letters", admin)
        assert listed.status_code == 200, listed.json
        assert [item["actor"] for item in listed.json["items"]] == ["unknown"]
        queues = api.get("/api/admin/queues", admin)
        assert queues.status_code == 200, queues.json
        assert [q["dead_letters"] for q in queues.json["queues"] if q["name"] == "turns"] == [1]
        assert api.get("/metrics").status_code == 200
    finally:
        redis_client.delete(f"{NAMESPACE}:turns.XQ", f"{NAMESPACE}:turns.XQ.msgs")


def test_a_dead_message_whose_argument_is_no_runs_id_leaves_the_dead_letters_manageable(
        world: World, redis_client: redis.Redis) -> None:
    """A message agentq did not send (here a turn id past a BIGINT) dies like any other; its record names no
    run. Before, every look at it queried the turns with that id: the listing answered 500 and `agentq dlq`
    failed, for every dead letter, until its Redis entry was deleted by hand."""
    import dramatiq

    from workers.broker import install_broker

    api, admin = world.api, world.admin_key
    install_broker().enqueue(dramatiq.Message(queue_name="turns", actor_name="run_turn", args=(2**70,), kwargs={},
                                              options={}))
    wait_for(lambda: dead_count(redis_client) == 1, timeout=30, what="the message to die")
    [item] = wait_for(lambda: api.get("/api/admin/dead-letters", admin).json["items"], what="its record")
    assert (item["actor"], item["args"], item["retries"]) == ("run_turn", [2**70], 2)
    requeued = api.post(f"/api/admin/dead-letters/{item['id']}/requeue", admin)
    assert (requeued.status_code, requeued.json["error"]["code"]) == (409, "conflict")
    listed = subprocess.run(agentq("dlq", "list"), env=child_env(), capture_output=True, text=True, cwd=ROOT,
                            timeout=60)
    assert listed.returncode == 0, listed.stderr
    assert api.delete(f"/api/admin/dead-letters/{item['id']}", admin).status_code == 204
    assert dead_count(redis_client) == 0


@pytest.mark.parametrize("actor", ["run_turn", "run_debug_run"])
def test_a_dead_letter_of_a_run_that_does_not_exist_is_refused_as_such(
        world: World, redis_client: redis.Redis, actor: str) -> None:
    """A dead message naming a run id no row has (written by hand, or for another database: a worker acknowledges
    such a message, so it is found only in a broker's keys) was refused as 409 `run_not_in_error`, "its run is no
    longer in error", which it never was: it is `run_not_found`, purge it."""
    import json

    api, admin = world.api, world.admin_key
    queue = "turns" if actor == "run_turn" else "debug"
    body = {"queue_name": queue, "actor_name": actor, "args": [987654321], "kwargs": {}, "options": {},
            "message_id": "no-such-run", "message_timestamp": 1}
    redis_client.zadd(f"{NAMESPACE}:{queue}.XQ", {"no-such-run": time.time() * 1000})
    redis_client.hset(f"{NAMESPACE}:{queue}.XQ.msgs", "no-such-run", json.dumps(body))
    [item] = api.get("/api/admin/dead-letters", admin).json["items"]
    requeued = api.post(f"/api/admin/dead-letters/{item['id']}/requeue", admin)
    assert (requeued.status_code, requeued.json["error"]["code"]) == (409, "run_not_found")
    assert "run 987654321, which does not exist" in requeued.json["error"]["message"]
    assert api.delete(f"/api/admin/dead-letters/{item['id']}", admin).status_code == 204


def test_more_dead_letters_than_a_statement_takes_parameters_are_still_listed_and_counted(
        world: World, redis_client: redis.Redis) -> None:
    """Every id in an `IN (...)` list is a bound parameter, and PostgreSQL takes at most 65,535 a statement: past
    that, the listing, the queues and /metrics failed, read as a database outage (503, `up` 0), for as long as
    the dead letters stayed."""
    from app.db import transaction

    count = 70_000
    with transaction() as session:
        session.execute(text(
            "INSERT INTO dead_letters (redis_message_id, queue, actor, args, run_id, retries, error, dead_at) "
            "SELECT 'm-' || i, 'turns', 'run_turn', json_build_array(i), i, 0, 'boom', now() "
            "FROM generate_series(1, :count) AS i"), {"count": count})
    redis_client.zadd(f"{NAMESPACE}:turns.XQ", {f"m-{i}": time.time() * 1000 for i in range(1, count + 1)})
    try:
        api, admin = world.api, world.admin_key
        queues = api.get("/api/admin/queues", admin)
        assert queues.status_code == 200, queues.json
        assert [q["dead_letters"] for q in queues.json["queues"] if q["name"] == "turns"] == [count]
        listed = api.get("/api/admin/dead-letters", admin)
        assert listed.status_code == 200, listed.json
        items = listed.json["items"]
        assert (len(items), {item["in_broker"] for item in items}) == (count, {True})
        metrics = api.get("/metrics").get_data(as_text=True)
        assert 'agentq_backing_service_up{service="database"} 1.0' in metrics
    finally:
        redis_client.delete(f"{NAMESPACE}:turns.XQ")


def test_a_run_given_up_keeps_the_traceback_of_the_last_failure_retried() -> None:
    """A run that failed the same way at every delivery until it was given up showed only the give-up, and
    not what had failed: the earlier traceback follows the reason, indented, and the error is the reason."""
    import dramatiq

    from app.dead_letters import error_summary
    from app.deliveries import RunGivenUp
    from app.message_outcomes import delivery_failed

    earlier = 'Traceback (most recent call last):\n  File "/srv/a.py", line 3, in run\n    settle()\nValueError: boom\n'
    message: dramatiq.Message[None] = dramatiq.Message(queue_name="turns", actor_name="run_turn", args=(7,), kwargs={},
                               options={"retries": 4, "traceback": earlier})
    delivery_failed(message, RunGivenUp("gave up after 5 deliveries"))
    assert message.options["traceback"] == (
        "app.deliveries.RunGivenUp: gave up after 5 deliveries\nThe last failure retried before it:\n"
        '    Traceback (most recent call last):\n      File "/srv/a.py", line 3, in run\n        settle()\n'
        "    ValueError: boom\n")
    assert error_summary(message.options["traceback"]) == "app.deliveries.RunGivenUp: gave up after 5 deliveries"
    assert message.options["retries"] == 5


def test_a_listing_reads_the_bodies_of_the_dead_letters_no_row_records_only(
        world: World, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    """A dead message's body holds its traceback, kilobytes each; every listing (the operators' page looks
    every 3 s) read every letter's body from Redis, a hundred thousand letters after a bad deploy. Only the
    bodies of messages no row records yet are read, to adopt them."""
    import json

    from app.db import transaction
    from app.redis_client import get_redis

    with transaction() as session:
        session.execute(text(
            "INSERT INTO dead_letters (redis_message_id, queue, actor, args, run_id, retries, error, dead_at) "
            "SELECT 'recorded-' || i, 'turns', 'run_turn', json_build_array(i), i, 0, 'boom', now() "
            "FROM generate_series(1, 3) AS i"))
    ids = ["recorded-1", "recorded-2", "recorded-3", "unrecorded"]
    redis_client.zadd(f"{NAMESPACE}:turns.XQ", dict.fromkeys(ids, time.time() * 1000))
    body = {"queue_name": "turns", "actor_name": "run_turn", "args": [9], "kwargs": {}, "options": {},
            "message_id": "unrecorded", "message_timestamp": 1}
    redis_client.hset(f"{NAMESPACE}:turns.XQ.msgs", mapping={i: json.dumps({**body, "message_id": i}) for i in ids})
    client, read = get_redis(), []
    hmget = client.hmget

    def reading(name: str, keys: list[str], *rest: Any) -> Any:
        read.extend(keys)
        return hmget(name, keys, *rest)

    monkeypatch.setattr(client, "hmget", reading)
    try:
        listed = world.api.get("/api/admin/dead-letters", world.admin_key)
        assert listed.status_code == 200, listed.json
        assert sorted(item["args"][0] for item in listed.json["items"]) == [1, 2, 3, 9]
        assert read == ["unrecorded"]
        read.clear()
        assert world.api.get("/api/admin/dead-letters", world.admin_key).status_code == 200
        assert read == []  # adopted by the first listing
    finally:
        redis_client.delete(f"{NAMESPACE}:turns.XQ", f"{NAMESPACE}:turns.XQ.msgs")


def test_dead_letters_are_paged_newest_first_with_ties_broken_by_id(world: World) -> None:
    """With `limit`, a page and the cursor of the next, in the order of the whole listing (most recent death
    first, the higher id first among deaths at one time), in the API and in `agentq dlq list`; a requeued
    letter is in none. Before, every look listed every letter, tens of thousands with their tracebacks."""
    now = datetime.now(UTC)
    deaths = {1: now - timedelta(seconds=3), 2: now - timedelta(seconds=1), 3: now - timedelta(seconds=1),
              4: now - timedelta(seconds=1), 5: now - timedelta(seconds=2), 6: now, 7: now - timedelta(seconds=5)}
    from app.db import transaction

    with transaction() as session:
        for ident, dead_at in deaths.items():
            session.execute(text(
                "INSERT INTO dead_letters (id, redis_message_id, queue, actor, args, run_id, error, traceback, "
                "dead_at, requeued_at) VALUES (:id, :mid, 'turns', 'run_turn', '[]', NULL, 'boom', 'a long trace', "
                ":dead_at, :requeued_at)"),
                {"id": ident, "mid": f"m-{ident}", "dead_at": dead_at, "requeued_at": now if ident == 6 else None})
    newest_first = [4, 3, 2, 5, 1, 7]
    api, admin = world.api, world.admin_key

    whole = api.get("/api/admin/dead-letters", admin)
    assert (whole.status_code, [item["id"] for item in whole.json["items"]]) == (200, newest_first)
    assert "next_cursor" not in whole.json and "traceback" not in whole.json["items"][0]
    pages, cursor = [], ""
    while cursor is not None:
        page = api.get(f"/api/admin/dead-letters?limit=2&cursor={cursor}", admin)
        assert page.status_code == 200, page.json
        pages.append([item["id"] for item in page.json["items"]])
        cursor = page.json["next_cursor"]
    assert pages == [[4, 3], [2, 5], [1, 7]]
    for query in ("limit=2&cursor=not-one-of-ours", "cursor=not-one-of-ours"):
        refused = api.get(f"/api/admin/dead-letters?{query}", admin)
        assert (refused.status_code, refused.json["error"]["code"]) == (422, "invalid_cursor")
    # A cursor without a limit: the rest of the list after it, not the whole list again.
    after_first_page = api.get("/api/admin/dead-letters?limit=2", admin).json["next_cursor"]
    rest = api.get(f"/api/admin/dead-letters?cursor={after_first_page}", admin).json
    assert [item["id"] for item in rest["items"]] == [2, 5, 1, 7]

    def listed(*flags: str) -> dict[str, Any]:
        done = subprocess.run(agentq("dlq", "list", *flags), env=child_env(), capture_output=True, text=True, cwd=ROOT,
                              timeout=60)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    first = listed("--limit", "4")
    assert [item["id"] for item in first["items"]] == [4, 3, 2, 5]
    rest = listed("--limit", "4", "--cursor", first["next_cursor"])
    assert ([item["id"] for item in rest["items"]], rest["next_cursor"]) == ([1, 7], None)
    assert [item["id"] for item in listed()["items"]] == newest_first
    assert [item["id"] for item in listed("--cursor", first["next_cursor"])["items"]] == [1, 7]


def test_runs_waiting_for_a_retry_are_listed_soonest_first_with_their_last_error(
        world: World, redis_client: redis.Redis) -> None:
    """Operators saw only how many messages waited in a delay queue, not which runs, how often they had failed
    or why. The broker's own delayed sends (what Dramatiq's Retries middleware does) are listed, with the
    run's status, the retry count, the last failure and when it runs again; a body agentq cannot read is
    listed as `unknown`, last."""
    import dramatiq

    from workers.broker import install_broker

    agent_id = world.agent(world.model())
    _, key = world.user()
    turn = world.send(key, world.conversation(key, agent_id), "retry me").json["assistant_message"]["id"]
    assert world.wait_terminal(key, turn)["status"] == "success"
    trace = 'Traceback (most recent call last):\n  File "/srv/a.py", line 3, in run\n    claim()\nOSError: boom\n'
    broker = install_broker()
    sent_at = time.time()
    for delay, retries in ((60_000, 1), (30_000, 2)):
        broker.enqueue(dramatiq.Message(queue_name="turns", actor_name="run_turn", args=(turn,), kwargs={},
                                        options={"retries": retries, "traceback": trace}), delay=delay)
    redis_client.hset(f"{NAMESPACE}:turns.DQ.msgs", "not-a-message", b"\xff not json")  # type: ignore[arg-type]

    listed = world.api.get("/api/admin/retries", world.admin_key)
    assert listed.status_code == 200, listed.json
    items = listed.json["items"]
    assert [(i["actor"], i["args"], i["run_id"], i["run_status"], i["retries"], i["error"]) for i in items] == [
        ("run_turn", [turn], turn, "success", 2, "OSError: boom"),
        ("run_turn", [turn], turn, "success", 1, "OSError: boom"),
        ("unknown", [], None, None, 0, None)]
    first_retry = datetime.fromisoformat(items[0]["retry_at"].replace("Z", "+00:00")).timestamp()
    assert sent_at + 29 < first_retry < time.time() + 31
    assert items[2]["retry_at"] is None and items[2]["broker_message_id"] == "not-a-message"
    assert {i["queue"] for i in items} == {"turns"}
    from_shell = subprocess.run(agentq("dlq", "retries"), env=child_env(), capture_output=True, text=True, cwd=ROOT,
                                timeout=60)
    assert from_shell.returncode == 0, from_shell.stderr
    assert json.loads(from_shell.stdout) == listed.json
    redis_client.delete(f"{NAMESPACE}:turns.DQ.msgs", f"{NAMESPACE}:turns.DQ")


def test_a_requeued_turn_is_followed_live_from_its_new_run_not_its_dead_runs_stream(
        world: World, redis_client: redis.Redis) -> None:
    """A turn's live stream (`RunKind.streams_live`) is dropped when its dead letter is requeued, so that a
    reader follows the new run, not the dead run's text to its `done`."""
    from app.live_stream import stream_key

    agent_id = world.agent(world.model())
    _, key = world.user()
    _, ended = dead_turn(world, key, agent_id, "stream me again")
    turn_id = ended["id"]
    redis_client.xadd(stream_key(turn_id), {"type": "delta", "a": 100, "o": 0, "data": "the dead run's text"})
    letter = world.api.get("/api/admin/dead-letters", world.admin_key).json["items"][0]
    assert world.api.post(f"/api/admin/dead-letters/{letter['id']}/requeue", world.admin_key).status_code == 202
    assert world.wait_terminal(key, turn_id)["status"] == "success"
    held = [str(fields) for _, fields in cast("list[StreamEntry]", redis_client.xrange(stream_key(turn_id)))]
    assert held and not any("the dead run's text" in fields for fields in held), held
