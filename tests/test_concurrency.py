"""One turn per conversation, N active conversations per user, balances under concurrency, crashed holders.

Bursts go over real HTTP to `agentq web` (gunicorn) so requests really race; the database is the
authority, so the same guarantees are checked with the API's Redis unreachable.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from typing import TYPE_CHECKING, Any, cast

import httpx
import psycopg
import pytest
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError

from app.db import transaction
from app.models import ConversationMessage, CreditTransaction, User
from tests.conftest import api_process
from tests.support import wait_for

if TYPE_CHECKING:
    import redis

    from tests.conftest import UpstreamLog, Workers, World


@pytest.fixture(autouse=True)
def _running(workers: Workers, upstream: UpstreamLog) -> None:
    """Turns here run on real workers."""


def burst(url: str, key: str, conversation_id: int, count: int = 12) -> list[int]:
    """`count` POSTs released together on one shared client: made one by one, each client's set-up spread the
    burst over a second on a loaded host, long enough for the first turn to end and a late POST to be taken."""
    ready = threading.Barrier(count)
    with httpx.Client(timeout=30, headers={"Authorization": f"Bearer {key}"},
                      limits=httpx.Limits(max_connections=count)) as client:
        def post(i: int) -> int:
            ready.wait(timeout=30)
            return client.post(f"{url}/api/conversations/{conversation_id}/messages",
                               json={"content": f"burst {i}"}).status_code

        with ThreadPoolExecutor(count) as pool:
            return sorted(pool.map(post, range(count)))


def test_a_burst_of_posts_to_one_idle_conversation_gets_exactly_one_202(world: World, web_server: str) -> None:
    """The first turn's answer takes 3 s to start: the burst's POSTs all come while it is in flight."""
    agent_id = world.agent(world.model(upstream="echo;ttft=3"))
    _, key = world.user()
    conversation_id = world.conversation(key, agent_id)
    assert burst(web_server, key, conversation_id) == [202] + [409] * 11
    busy = world.send(key, conversation_id)
    assert busy.status_code == 409
    assert busy.json["error"]["code"] == "conversation_busy"
    messages = world.api.get(f"/api/conversations/{conversation_id}/messages", key).json["items"]
    assert len(messages) == 2
    world.wait_terminal(key, messages[1]["id"])
    assert world.send(key, conversation_id).status_code == 202


def test_the_database_alone_keeps_one_turn_per_conversation_when_redis_is_unreachable(world: World) -> None:
    """An API whose Redis is down still answers; the turn it stores is sent by the workers' recovery."""
    with api_process("web-no-redis", threads=16, REDIS_URL="redis://127.0.0.1:9/0") as (url, web):
        assert httpx.get(f"{url}/readyz").status_code == 503
        agent_id = world.agent(world.model())
        _, key = world.user()
        conversation_id = world.conversation(key, agent_id)
        assert burst(url, key, conversation_id) == [202] + [409] * 11
        # Every request meets the outage alike: it is said once, not once a request.
        assert web.output().count("; the database alone guards it (") == 1
        assistant = world.api.get(f"/api/conversations/{conversation_id}/messages", key).json["items"][1]
        assert world.wait_terminal(key, assistant["id"])["status"] == "success"


def test_the_per_user_limit_refuses_the_next_conversation_and_frees_slots_at_the_end(world: World) -> None:
    slow = world.model("slow", upstream="echo;ttft=1.5")
    agent_id = world.agent(slow, timeout_seconds=10)
    _, key = world.user()
    _, other = world.user("bob")
    conversations = [world.conversation(key, agent_id, project_id=i) for i in range(4)]
    accepted = [world.send(key, c).json["assistant_message"]["id"] for c in conversations[:3]]
    refused = world.send(key, conversations[3])
    assert refused.status_code == 429
    assert refused.json["error"]["code"] == "too_many_active_conversations"
    assert world.send(other, world.conversation(other, agent_id)).status_code == 202
    for message_id in accepted:
        assert world.wait_terminal(key, message_id)["status"] == "success"
    assert world.send(key, conversations[3]).status_code == 202


def test_a_lock_and_slots_left_by_ended_turns_refuse_nothing_the_database_allows(
        world: World, workers: Workers, redis_client: redis.Redis) -> None:
    """Redis holds what a worker failed to free: the conversation's lock, named by a turn that has ended, and
    the user's three slots, for conversations now idle. Each refusal is confirmed against the database before
    it is given; the slots were once taken as final when the lock had been found stale first (a 429)."""
    import time as clock

    from app.conversation_locks import lock_key, slots_key, turn_owner

    agent_id = world.agent(world.model())
    user_id, key = world.user()
    conversations = [world.conversation(key, agent_id, project_id=i) for i in range(4)]
    ended = world.send(key, conversations[0]).json["assistant_message"]["id"]
    assert world.wait_terminal(key, ended)["status"] == "success"
    # The worker frees its lock after the settlement commits: planted before, the lock would go with it.
    wait_for(lambda: redis_client.get(lock_key(conversations[0])) is None, what="the worker to free its lock")
    expires = int(clock.time() * 1000) + 60_000
    redis_client.set(lock_key(conversations[0]), turn_owner(ended), px=60_000)
    redis_client.zadd(slots_key(user_id), {str(c): expires for c in conversations[1:]})

    accepted = world.send(key, conversations[0])
    assert accepted.status_code == 202, accepted.json
    assert world.wait_terminal(key, accepted.json["assistant_message"]["id"])["status"] == "success"


def test_a_killed_worker_frees_its_lock_and_slot_by_itself(
        world: World, workers: Workers, redis_client: redis.Redis) -> None:
    """kill -9 of the only worker mid-answer: its turns are taken over once the 3 s lease runs out."""
    stalled = world.model("stalled", upstream="echo;ttft=60")
    agent_id = world.agent(stalled, timeout_seconds=120)
    _, key = world.user()
    conversations = [world.conversation(key, agent_id, project_id=i) for i in range(4)]
    held = [world.send(key, c).json["assistant_message"]["id"] for c in conversations[:3]]
    wait_for(lambda: all(world.message(key, m)["status"] == "processing" for m in held), what="turns to start")
    assert redis_client.exists(f"agentq:conversation:{conversations[0]}:lock") == 1
    for process in list(workers.processes):
        process.kill_group(signal.SIGKILL)
    workers.processes.clear()
    assert world.send(key, conversations[0]).status_code == 409
    assert world.send(key, conversations[3]).status_code == 429

    fast = world.model("fast")
    world.api.patch(f"/api/admin/agents/{agent_id}", world.admin_key, {"model_id": fast})
    workers.start()
    killed_at = time.monotonic()  # from the workers' boot, which a loaded host makes slow
    for message_id in held:
        done = world.wait_terminal(key, message_id, timeout=30)
        assert (done["status"], done["model"]) == ("success", "fast")
    recovered_in = time.monotonic() - killed_at
    assert recovered_in < 15, f"takeover took {recovered_in:.1f}s"
    assert world.send(key, conversations[3]).status_code == 202
    assert world.send(key, conversations[0]).status_code == 202


def test_fifty_concurrent_turns_never_overdraw_and_the_ledger_adds_up(
        world: World, monkeypatch: pytest.MonkeyPatch, app: Any) -> None:
    from app.config import Settings, get_settings

    raised = Settings(**{**get_settings().model_dump(), "max_active_conversations": 100})
    monkeypatch.setattr("app.in_flight.get_settings", lambda: raised)
    monkeypatch.setattr("app.conversation_locks.get_settings", lambda: raised)
    agent_id = world.agent(world.model(upstream="echo;words=50", price_in="0", price_out="2"), max_tokens=50)
    user_id, key = world.user(balance="1")
    conversations = [world.conversation(key, agent_id, project_id=i) for i in range(50)]

    def post(conversation_id: int) -> Any:
        client = app.test_client()
        response = client.post(f"/api/conversations/{conversation_id}/messages", json={"content": "spend"},
                               headers={"Authorization": f"Bearer {key}"})
        return response.status_code, response.json["assistant_message"]["id"]

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(post, conversations))
    assert [status for status, _ in results] == [202] * 50
    finals = [world.wait_terminal(key, message_id, timeout=60) for _, message_id in results]
    statuses = sorted(m["status"] for m in finals)
    assert statuses == ["insufficient_balance"] * 40 + ["success"] * 10
    assert all(m["cost"] == "0.100000" for m in finals if m["status"] == "success")
    with transaction() as session:
        user = session.get_one(User, user_id)
        ledger_sum = session.scalar(select(func.sum(CreditTransaction.amount))
                                    .where(CreditTransaction.user_id == user_id))
        charges = session.scalar(select(func.count()).select_from(CreditTransaction)
                                 .where(CreditTransaction.user_id == user_id, CreditTransaction.kind == "charge"))
    assert user.balance == Decimal("0") and user.reserved == Decimal("0")
    assert ledger_sum == user.balance
    assert charges == 10


def test_the_database_refuses_a_second_turn_in_flight(world: World) -> None:
    agent_id = world.agent(world.model())
    _, key = world.user()
    conversation_id = world.conversation(key, agent_id)
    with pytest.raises(IntegrityError) as refused, transaction() as session:
        for seq in (1, 2):
            session.add(ConversationMessage(conversation_id=conversation_id, seq=seq, role="assistant",
                                            content="", status="pending"))
        session.flush()
    assert refused.value.orig.diag.constraint_name == "uq_conversation_messages_in_flight"  # type: ignore[union-attr]


def question_of(turn_id: int) -> int:
    """The user message of a turn (what `finish_turn` moves with the answer)."""
    from app.models import Turn

    with transaction() as session:
        return session.get_one(Turn, turn_id).user_message_id


def backend_pid(session: Any) -> int:
    from sqlalchemy import text

    return int(session.execute(text("SELECT pg_backend_pid()")).scalar())


def blocked_by(database: str, waiter: list[int], holder: Any) -> Callable[[], bool]:
    """Whether the session whose backend is `waiter[0]` (once its thread has put it there) waits for a lock that the
    transaction of session `holder` holds, by PostgreSQL's own account (`pg_blocking_pids`), looked at from a
    connection of its own (a transaction sees one snapshot of `pg_stat_activity`). Other sessions the holder
    blocks (a worker's lease renewal of the same turn) do not count."""
    holder_pid = backend_pid(holder)

    def look() -> bool:
        if not waiter:
            return False
        with psycopg.connect(database.replace("+psycopg", ""), autocommit=True) as watcher:
            row = watcher.execute("SELECT %s = ANY(pg_blocking_pids(%s))", (holder_pid, waiter[0])).fetchone()
        return bool(row and row[0])

    return look


def the_only_call(upstream: UpstreamLog) -> str:
    """The upstream call of this test's turn, once it is the only one streaming.

    Later checks follow this call by its id: a call left over from an earlier test may still change state."""
    streams = wait_for(lambda: (found := upstream.streams()) and list(found.values()) == ["streaming"] and found,
                       what="the worker to call the model")
    return next(iter(streams))


def a_turn_in_a_workers_hands(world: World, upstream: UpstreamLog) -> tuple[int, str, int, dict[str, Any]]:
    """A user with a balance of 5 and a turn a worker holds, waiting for a first token that takes a minute:
    its user's id and key, its conversation and its answer message."""
    agent_id = world.agent(world.model(upstream="echo;ttft=60"), timeout_seconds=120)
    user_id, key = world.user(balance="5")
    conversation_id = world.conversation(key, agent_id)
    assistant = world.send(key, conversation_id).json["assistant_message"]
    the_only_call(upstream)
    return user_id, key, conversation_id, assistant


def test_a_claim_its_user_cannot_cover_holds_nothing_of_the_balance_or_on_the_turn(
        world: World, upstream: UpstreamLog) -> None:
    """A takeover whose worst case has grown past what the user can cover is refused (`affordable` false) and
    ends the turn `insufficient_balance`: the turn's row must keep only what its earlier delivery holds, since
    a later end or takeover releases that amount from the user's reservations (more would free other turns'
    holds), and the user's reservations stay as they were."""
    from app.models import Turn, User
    from app.turn_state import claim_turn

    agent_id = world.agent(world.model(upstream="echo;ttft=60"), timeout_seconds=120)
    user_id, key = world.user(balance="5")
    assistant = world.send(key, world.conversation(key, agent_id)).json["assistant_message"]
    the_only_call(upstream)
    with transaction() as session:
        before = (session.get_one(Turn, assistant["id"]).reserved_amount, session.get_one(User, user_id).reserved)
        assert before[0] == before[1] > 0
        session.get_one(Turn, assistant["id"]).lease_expires_at = None  # its worker taken for dead
        session.flush()
        claim = claim_turn(session, assistant["id"], lease_seconds=300, hold=lambda _claim: Decimal("6"))
        assert (claim.outcome.value, claim.affordable) == ("taken_over", False)
        assert (session.get_one(Turn, assistant["id"]).reserved_amount,
                session.get_one(User, user_id).reserved) == before
        session.rollback()  # the turn is the session worker's again, as it was


def test_a_worker_that_lost_its_lease_stops_and_cannot_write(world: World, upstream: UpstreamLog) -> None:
    """Another owner takes the turn over: the first worker stops its upstream call and writes nothing."""
    from app.claims import LeaseLost
    from app.models import Turn
    from app.turn_state import claim_turn, finish_turn
    from app.turn_status import TurnStatus

    agent_id = world.agent(world.model(upstream="echo;ttft=60"), timeout_seconds=120)
    _, key = world.user()
    assistant = world.send(key, world.conversation(key, agent_id)).json["assistant_message"]
    call = the_only_call(upstream)
    with transaction() as session:
        assert claim_turn(session, assistant["id"], lease_seconds=300).outcome.value == "owned_elsewhere"
    with transaction() as session:
        # The lease runs out and is taken over in one transaction: the owner's lease keeper renews every
        # second, and a renewal committed between the two would leave the lease alive.
        session.get_one(Turn, assistant["id"]).lease_expires_at = None
        session.flush()
        takeover = claim_turn(session, assistant["id"], lease_seconds=300)
    assert takeover.outcome.value == "taken_over" and takeover.token
    wait_for(lambda: upstream.streams().get(call) == "disconnected", what="the first worker to give up")
    with pytest.raises(LeaseLost), transaction() as session:
        finish_turn(session, assistant["id"], question_of(assistant["id"]), "not-the-owner", TurnStatus.SUCCESS,
                    content="overwrite")
    with transaction() as session:
        finish_turn(session, assistant["id"], question_of(assistant["id"]), takeover.token, TurnStatus.SUCCESS,
                    content="the new owner's")
    final = world.message(key, assistant["id"])
    assert (final["status"], final["content"]) == ("success", "the new owner's")


def test_a_claim_that_waited_for_the_owners_final_commit_sees_the_turn_finished(
        world: World, upstream: UpstreamLog, database: str) -> None:
    """A redelivered message blocks on the turn while its owner settles; once the owner commits, the
    waiting claim must see the turn ended (not a processing turn without a lease) and call no model."""
    import threading

    from app.models import Turn
    from app.turn_state import claim_turn, finish_turn
    from app.turn_status import TurnStatus

    agent_id = world.agent(world.model(upstream="echo;ttft=60"), timeout_seconds=120)
    _, key = world.user()
    assistant = world.send(key, world.conversation(key, agent_id)).json["assistant_message"]
    call = the_only_call(upstream)
    with transaction() as session:
        token = session.get_one(Turn, assistant["id"]).lease_token
    assert token

    claims = []
    settled = threading.Event()
    question = question_of(assistant["id"])
    with transaction() as owner:
        finish_turn(owner, assistant["id"], question, token, TurnStatus.SUCCESS, content="settled by the owner")

        claimer: list[int] = []

        def redelivered() -> None:
            with transaction() as session:
                claimer.append(backend_pid(session))
                outcome = claim_turn(session, assistant["id"], lease_seconds=300).outcome
            claims.append((settled.is_set(), outcome))

        waiting = threading.Thread(target=redelivered)
        waiting.start()
        wait_for(blocked_by(database, claimer, owner), timeout=10,
                 what="the second claim to wait for the owner's row locks")
        assert waiting.is_alive()
        settled.set()
    waiting.join(timeout=10)
    assert [(after, outcome.value) for after, outcome in claims] == [(True, "finished")]
    final = world.message(key, assistant["id"])
    assert (final["status"], final["content"]) == ("success", "settled by the owner")
    wait_for(lambda: upstream.streams().get(call) == "disconnected", what="the worker to give up its call")
    assert len(upstream.requests()) == 1


def test_a_new_turn_racing_a_settlement_of_the_same_conversation_is_refused_without_a_deadlock(
        world: World, upstream: UpstreamLog, database: str) -> None:
    """A settlement locks the conversation, then the user; the database part of intake must never
    lock them the other way round (it runs alone when Redis is unreachable or its lock was lost)."""
    import threading

    from app import ledger
    from app.auth import Principal
    from app.conversations import record_turn_end
    from app.errors import ConversationBusy
    from app.models import Turn
    from app.turn_intake import _insert_turn
    from app.turn_state import finish_turn
    from app.turn_status import TurnStatus

    agent_id = world.agent(world.model(upstream="echo;ttft=60"), timeout_seconds=120)
    user_id, key = world.user()
    conversation_id = world.conversation(key, agent_id)
    assistant = world.send(key, conversation_id).json["assistant_message"]
    the_only_call(upstream)
    with transaction() as session:
        token = session.get_one(Turn, assistant["id"]).lease_token
    assert token

    refusals: list[BaseException] = []
    intaker: list[int] = []

    def intake() -> None:
        try:
            with transaction() as session:
                intaker.append(backend_pid(session))
                _insert_turn(session, Principal(user_id, "alice", False), conversation_id, "racing", None)
        except BaseException as exc:
            refusals.append(exc)

    question = question_of(assistant["id"])
    with transaction() as settling:
        finish_turn(settling, assistant["id"], question, token, TurnStatus.SUCCESS, content="settled")
        record_turn_end(settling, conversation_id, 3)
        racing = threading.Thread(target=intake)
        racing.start()
        # The intake either refuses at once (it reads the turn still in flight) or waits for a lock the settlement
        # holds; the charge then takes the user's row, which an intake that locked the conversation first would
        # hold: a deadlock.
        blocked = blocked_by(database, intaker, settling)
        wait_for(lambda: not racing.is_alive() or blocked(), timeout=10, what="the intake to end or to wait")
        ledger.charge_turn(settling, user_id, assistant["id"], Decimal("0.000001"), Decimal(0))
    racing.join(timeout=10)
    assert not racing.is_alive()
    assert [type(exc) for exc in refusals] == [ConversationBusy]
    assert world.message(key, assistant["id"])["status"] == "success"


def test_a_turn_accepted_while_its_conversation_is_being_deleted_is_stopped(
        world: World, upstream: UpstreamLog) -> None:
    """Deleting stops the conversation's turn in flight, since its user can no longer stop it. A turn whose
    intake has written its rows but not committed is invisible to the delete's look; the delete's write
    waits for the intake's commit, and a second look after the delete's own commit stops that turn (it
    would otherwise run and be charged, and a stop from its user would be 404)."""
    import threading

    from sqlalchemy import text

    from app.auth import Principal
    from app.cancellation import delete_conversation
    from app.db import plain_transaction
    from app.turn_intake import _insert_turn

    user_id, key = world.user()
    conversation_id = world.conversation(key, world.agent(world.model(upstream="echo;ttft=60"), timeout_seconds=120))
    alice = Principal(user_id, "alice", False)
    deleting = threading.Thread(target=delete_conversation, args=(alice, conversation_id))

    def delete_waits_for_the_intake() -> bool:
        with transaction() as session:
            return bool(session.execute(text(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                "AND query LIKE 'UPDATE conversations SET deleted_at%'")).scalar())

    with plain_transaction() as connection:
        accepted = _insert_turn(connection, alice, conversation_id, "racing the delete", None)
        deleting.start()
        wait_for(delete_waits_for_the_intake, timeout=10, what="the delete to wait for the intake's row")
    deleting.join(timeout=10)
    assert not deleting.is_alive()
    with transaction() as session:
        assert session.get_one(ConversationMessage, accepted.assistant_message.id).status == "cancelled"
    assert world.api.get(f"/api/conversations/{conversation_id}", key).status_code == 404
    assert [t for t in world.api.get("/api/me/transactions", key).json["items"] if t["message_id"]] == []


def test_a_batched_settlement_with_a_lost_lease_writes_nothing_but_its_attempts(
        world: World, upstream: UpstreamLog) -> None:
    """The settlement's statements go out together (`app.prepared.Batch`); the lease check comes back with
    them, and a lost lease rolls back the status, the statistics, the charge and the attempt record alike.
    The provider was paid for the attempt all the same, so it is then recorded on its own, once."""
    from app import ledger
    from app.attempts import AttemptRecord, settling
    from app.claims import LeaseLost
    from app.conversations import record_turn_end
    from app.models import CreditTransaction, ModelAttempt, Turn
    from app.prepared import Batch
    from app.turn_state import finish_turn
    from app.turn_status import TurnStatus

    user_id, key, conversation_id, assistant = a_turn_in_a_workers_hands(world, upstream)
    with transaction() as session:
        reserved = session.get_one(Turn, assistant["id"]).reserved_amount
    attempt = AttemptRecord("primary", "success", None, 5, 1, 3, 4, Decimal("0.5"))
    with (pytest.raises(LeaseLost), settling([attempt], delivery=2, message_id=assistant["id"]) as attempts,
          transaction() as session, Batch(session) as batch):
        finish_turn(batch, assistant["id"], question_of(assistant["id"]), "not-the-owner", TurnStatus.SUCCESS,
                    content="stolen", prompt_tokens=3, completion_tokens=4, cost=Decimal("0.5"))
        record_turn_end(batch, conversation_id, 7)
        ledger.charge_turn(batch, user_id, assistant["id"], Decimal("0.5"), reserved)
        attempts.write(batch)
    assert world.message(key, assistant["id"])["status"] == "processing"
    assert world.api.get(f"/api/conversations/{conversation_id}", key).json["total_tokens"] == 0
    assert world.api.get("/api/me", key).json["balance"] == "5.000000"
    with transaction() as session:
        assert session.query(CreditTransaction).filter_by(message_id=assistant["id"]).count() == 0
        recorded = session.query(ModelAttempt).filter_by(message_id=assistant["id"]).all()
        assert [(a.model_name, a.outcome, a.cost) for a in recorded] == [("primary", "success", Decimal("0.5"))]


def test_a_cut_off_workers_own_record_of_its_calls_replaces_the_takeovers_estimate(
        world: World, upstream: UpstreamLog, monkeypatch: pytest.MonkeyPatch) -> None:
    """The delivery that took the turn over recorded delivery 2's call as `interrupted`, from what it had
    streamed (its worker looked dead: its lease ran out with its token); that worker was only cut off, and
    its refused settlement then records the call as it was. One record of the call, the real one, stays;
    an estimate that comes after the real record is not written at all; and the metrics count the call
    once (as it was first recorded: a counter cannot take a count back)."""
    from app import attempts as attempts_module
    from app.attempts import AttemptRecord, record_interrupted, settling
    from app.claims import LeaseLost
    from app.models import ModelAttempt
    from app.turn_state import finish_turn
    from app.turn_status import TurnStatus

    _, key, _, assistant = a_turn_in_a_workers_hands(world, upstream)
    turn_id = assistant["id"]

    def recorded() -> list[tuple[int | None, str, Decimal | None]]:
        with transaction() as session:
            return [(a.delivery, a.outcome, a.cost) for a in session.query(ModelAttempt).filter_by(message_id=turn_id)
                    .order_by(ModelAttempt.id)]

    counted: list[list[str]] = []
    monkeypatch.setattr(attempts_module.metrics, "observe_attempts",
                        lambda records: counted.append([r.outcome for r in records]))
    estimate = AttemptRecord("primary", "interrupted", "estimated", 900, 100, 20, 30, Decimal("0.07"))
    real = AttemptRecord("primary", "cancelled", None, 1200, 100, 21, 44, Decimal("0.109"))
    assert record_interrupted(turn_id, 2, [estimate])
    assert not record_interrupted(turn_id, 2, [estimate])  # recorded once, however often it is tried
    assert recorded() == [(2, "interrupted", Decimal("0.07"))]
    with pytest.raises(LeaseLost), settling([real], delivery=2, message_id=turn_id) as attempts, \
            transaction() as session:
        finish_turn(session, turn_id, question_of(turn_id), "the-cut-off-worker", TurnStatus.CANCELLED)
        attempts.write(session)
    assert recorded() == [(2, "cancelled", Decimal("0.109"))]
    assert not record_interrupted(turn_id, 2, [estimate])
    assert recorded() == [(2, "cancelled", Decimal("0.109"))]
    assert counted == [["interrupted"]]
    # The worker still runs the turn: ended here, not settled in the next test's tables (whose ids restart),
    # where its refused settlement's locks deadlocked with that test's first POST.
    assert world.api.post(f"/api/messages/{turn_id}/cancel", key).json["status"] == "cancelled"


def test_a_stale_settlement_after_the_takeovers_charge_is_a_lost_lease_not_a_database_error(
        world: World, upstream: UpstreamLog) -> None:
    """The delivery that took a turn over settled and charged it first; the stale delivery's own settlement
    (its keeper had not yet noticed) then hits the ledger's one charge per turn before its lease guard's
    result is read, and raised an IntegrityError, which went to Dramatiq's retries as an error. It is the
    lost lease it is: the runner stops quietly, and nothing of the stale settlement is written."""
    from app import ledger
    from app.agent_setup import AgentParams, AgentSetup
    from app.claims import LeaseLost
    from app.live_stream_writer import TurnStream
    from app.model_target import ModelTarget
    from app.models import CreditTransaction, Turn
    from app.prepared import Batch
    from app.turn_runner import TurnContext, _Answer, _settle
    from app.turn_state import finish_turn
    from app.turn_status import TurnStatus

    user_id, key, conversation_id, assistant = a_turn_in_a_workers_hands(world, upstream)
    with transaction() as session:
        turn = session.get_one(Turn, assistant["id"])
        stale_token, reserved = turn.lease_token, turn.reserved_amount
        assert stale_token is not None
        turn.lease_token = "the-takeover"
    with transaction() as session, Batch(session) as batch:
        finish_turn(batch, assistant["id"], question_of(assistant["id"]), "the-takeover", TurnStatus.SUCCESS,
                    content="the takeover's answer", prompt_tokens=3, completion_tokens=4, cost=Decimal("0.25"))
        ledger.charge_turn(batch, user_id, assistant["id"], Decimal("0.25"), reserved)
    target = ModelTarget(1, "primary", "echo", None, None, Decimal("1"), Decimal("2"), None)
    stale = TurnContext(
        turn_id=assistant["id"], question_id=question_of(assistant["id"]), token=stale_token, user_id=user_id,
        conversation_id=conversation_id, content="hi", history=[],
        agent=AgentSetup("", AgentParams(120, None, None), target, None), reserved=reserved, delivery=1,
        fell_back=False, gives_up=None, ends_by=None)
    with pytest.raises(LeaseLost):
        _settle(stale, TurnStatus.SUCCESS, TurnStream(assistant["id"], 1),
                _Answer("the stale answer", prompt_tokens=3, completion_tokens=4, latency_ms=5), model=target.name,
                cost=Decimal("0.5"), success_tokens=7)
    assert world.message(key, assistant["id"])["content"] == "the takeover's answer"
    assert world.api.get("/api/me", key).json["balance"] == "4.750000"
    with transaction() as session:
        assert [t.amount for t in session.query(CreditTransaction).filter_by(message_id=assistant["id"])] == [
            Decimal("-0.25")]


def test_a_turn_charged_a_second_time_moves_neither_its_ledger_nor_the_balance(world: World) -> None:
    """The charge statement writes no second row for a turn, and the balance moves only by the row the
    statement wrote: a second charge of one turn, by whichever caller, leaves both as the first left them, a
    credit between the two included (the second takes the balance as it is, not as the first charge left it)."""
    from app import ledger

    agent_id = world.agent(world.model())
    user_id, key = world.user(balance="5")
    conversation_id = world.conversation(key, agent_id)
    with transaction() as session:
        answer = ConversationMessage(conversation_id=conversation_id, seq=1, role="assistant", content="",
                                     status="processing")
        session.add(answer)
        session.flush()
        answer_id = answer.id
    with transaction() as session:
        ledger.charge_turn(session, user_id, answer_id, Decimal("0.25"), Decimal(0))
    assert world.api.post(f"/api/admin/users/{user_id}/credits", world.admin_key, {"amount": "1"}).status_code == 200
    with transaction() as session:
        ledger.charge_turn(session, user_id, answer_id, Decimal("0.5"), Decimal(0))
    assert world.api.get("/api/me", key).json["balance"] == "5.750000"
    with transaction() as session:
        assert [t.amount for t in session.query(CreditTransaction).filter_by(message_id=answer_id)] == [
            Decimal("-0.25")]


def test_attempts_a_settlement_wrote_before_its_failure_are_not_written_again(
        world: World, upstream: UpstreamLog) -> None:
    """A settlement can fail after its commit (the commit's answer lost with the connection): its attempts
    are in the database then, and the write that follows a failure finds them by their stamp; a failure
    after which the caller settles again (a stop that arrived meanwhile) writes nothing on its own."""
    from app.attempts import AttemptRecord, settling
    from app.models import ModelAttempt

    agent_id = world.agent(world.model(upstream="echo;ttft=60"), timeout_seconds=120)
    _, key = world.user(balance="5")
    assistant = world.send(key, world.conversation(key, agent_id)).json["assistant_message"]
    the_only_call(upstream)
    attempts_made = [AttemptRecord("primary", "timeout", "no answer", 9, None, None, None, None),
                     AttemptRecord("fallback", "success", None, 5, 1, 3, 4, Decimal("0.25"))]
    with (pytest.raises(ConnectionResetError),
          settling(attempts_made, delivery=1, message_id=assistant["id"]) as attempts):
        with transaction() as session:
            attempts.write(session)
        raise ConnectionResetError("the commit's answer was lost")
    with pytest.raises(InterruptedError), settling(attempts_made, delivery=1, message_id=assistant["id"],
                                                   settled_again_after=(InterruptedError,)):
        raise InterruptedError("settled again by the caller")
    with transaction() as session:
        recorded = session.query(ModelAttempt).filter_by(message_id=assistant["id"]).order_by(ModelAttempt.id).all()
        assert [(a.model_name, a.outcome, a.cost) for a in recorded] == [("primary", "timeout", None),
                                                                         ("fallback", "success", Decimal("0.25"))]


def test_a_credit_that_waited_for_a_settlement_adds_to_the_settled_balance(world: World, database: str) -> None:
    """An admin's top-up arrives while a settlement holds the user's row: it waits for the row, then adds to
    the balance the settlement left, not to the one it may have read before (the charge would be lost)."""
    import threading

    import psycopg
    from sqlalchemy import update

    from app import users

    user_id, _ = world.user(balance="10")
    credited: list[tuple[Decimal, Decimal]] = []
    # The look at the waits on a connection of its own, outside any transaction: a transaction sees one
    # snapshot of pg_stat_activity, and a first look before the credit waited saw none for ever.
    with transaction() as settling, psycopg.connect(database.replace("+psycopg", ""), autocommit=True) as look:
        settling.execute(update(User).where(User.id == user_id).values(balance=User.balance - 3))
        credit = threading.Thread(target=lambda: credited.append(users.add_credit(user_id, Decimal("5"))))
        credit.start()
        wait_for(lambda: look.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
        ).fetchone()[0], what="the credit to wait for the user's row")  # type: ignore[index]
    credit.join(timeout=10)
    assert credited == [(Decimal("12"), Decimal("5"))]
    with transaction() as session:
        assert session.get_one(User, user_id).balance == Decimal("12")


@pytest.mark.parametrize("what", ["agent", "conversation"])
def test_of_two_deletes_at_once_one_is_204_and_the_other_404(
        world: World, web_server: str, database: str, what: str) -> None:
    """Both deletes read the row live before either wrote: each answered 204. The test holds the row's lock
    until both wait for it, so they really overlap; the second to get it must find it deleted."""
    import psycopg

    agent_id = world.agent(world.model())
    _, key = world.user()
    target, path, auth = (("agents", f"/api/admin/agents/{agent_id}", world.admin_key) if what == "agent" else
                          ("conversations", f"/api/conversations/{world.conversation(key, agent_id)}", key))
    row_id = int(path.rsplit("/", 1)[1])

    def delete(_: int) -> int:
        return httpx.delete(f"{web_server}{path}", headers={"Authorization": f"Bearer {auth}"}, timeout=30).status_code

    url = database.replace("+psycopg", "")
    # The look at the waits on a connection of its own: a transaction sees one snapshot of pg_stat_activity.
    with psycopg.connect(url) as holder, psycopg.connect(url, autocommit=True) as watcher:
        holder.execute(f"SELECT 1 FROM {target} WHERE id = %s FOR UPDATE", (row_id,))
        with ThreadPoolExecutor(2) as pool:
            answers = pool.map(delete, range(2))
            wait_for(lambda: watcher.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query ILIKE %s",
                (f"UPDATE {target}%",)).fetchone()[0] == 2, what="both deletes to wait for the row")  # type: ignore[index]
            holder.rollback()
            assert sorted(answers) == [204, 404]
    assert httpx.delete(f"{web_server}{path}", headers={"Authorization": f"Bearer {auth}"}).status_code == 404


@pytest.mark.parametrize("keyed", [False, True], ids=["plain", "idempotency-keyed"])
def test_the_database_alone_keeps_the_limit_of_active_conversations_when_redis_is_out_of_reach(
        world: World, keyed: bool) -> None:
    """With Redis up its script refuses the user's fourth conversation first, so the database's own count, which
    no index backs, was never what refused it: an off-by-one there would have given users a conversation more
    whenever Redis is away. Here the API cannot reach Redis; a POST with an `Idempotency-Key` takes its own
    path through the intake (a retry of it answers the first 202), and is counted the same."""
    with api_process("web-limit-without-redis", REDIS_URL="redis://127.0.0.1:9/0") as (url, _):
        agent_id = world.agent(world.model("slow-without-redis", upstream="echo;ttft=3"), timeout_seconds=20)
        _, key = world.user()
        conversations = [world.conversation(key, agent_id, project_id=i) for i in range(4)]

        def post(conversation_id: int) -> httpx.Response:
            keys = {"Idempotency-Key": f"send-{conversation_id}"} if keyed else {}
            return httpx.post(f"{url}/api/conversations/{conversation_id}/messages", timeout=30,
                              headers={"Authorization": f"Bearer {key}", **keys}, json={"content": "hi"})

        assert [post(c).status_code for c in conversations[:3]] == [202] * 3
        refused = post(conversations[3])
        assert (refused.status_code, refused.json()["error"]["code"]) == (429, "too_many_active_conversations")


def test_a_user_past_their_turns_a_minute_is_refused_until_a_token_comes_back(
        world: World, settings_of: Callable[..., None], redis_client: redis.Redis) -> None:
    """A key, even one with no credit, could start turns without end, each storing its message (a turn its user
    cannot afford ends `insufficient_balance`; it is not refused). With `AGENTQ_MAX_TURNS_PER_MINUTE` a user gets a
    burst of that many, then that many a minute: the next is 429 `too_many_turns`, saying when to retry, and stores
    nothing; a replay of an `Idempotency-Key` starts nothing and is answered; another user's conversation is still
    404 first, and another user has tokens of their own. With Redis out of reach a turn is accepted, uncounted."""
    from app.turn_rate import bucket_key

    settings_of(AGENTQ_MAX_TURNS_PER_MINUTE="2")
    agent_id = world.agent(world.model("rate", upstream="echo;ttft=5"), timeout_seconds=30)
    alice, key = world.user()
    conversations = [world.conversation(key, agent_id, project_id=n) for n in range(3)]
    first = world.send(key, conversations[0], headers={"Idempotency-Key": "first"})
    assert (first.status_code, world.send(key, conversations[1]).status_code) == (202, 202)
    refused = world.send(key, conversations[2])
    after = int(refused.headers["Retry-After"])
    assert (refused.status_code, refused.json["error"]) == (429, {
        "code": "too_many_turns", "message": f"You may start 2 turns a minute; retry in {after} s."})
    assert 1 <= after <= 30
    assert world.api.get(f"/api/conversations/{conversations[2]}/messages", key).json["items"] == []
    replayed = world.send(key, conversations[0], headers={"Idempotency-Key": "first"})
    assert (replayed.status_code, replayed.json) == (202, first.json)
    _, other = world.user("bob")
    assert world.send(key, world.conversation(other, agent_id)).status_code == 404
    assert world.send(other, world.conversation(other, agent_id)).status_code == 202
    # A token comes back after half a minute at 2 a minute: the bucket's last take moved 31 s back, as time would.
    bucket = bucket_key(alice)
    taken_at = cast(bytes, redis_client.hget(bucket, "at"))
    redis_client.hset(bucket, "at", str(int(taken_at) - 31_000))
    assert world.send(key, conversations[2]).status_code == 202
    with api_process("web-rate-without-redis", REDIS_URL="redis://127.0.0.1:9/0",
                     AGENTQ_MAX_TURNS_PER_MINUTE="1") as (url, _):
        _, carol = world.user("carol")
        sent = [httpx.post(f"{url}/api/conversations/{world.conversation(carol, agent_id, project_id=n)}/messages",
                           headers={"Authorization": f"Bearer {carol}"}, json={"content": "hi"}, timeout=30)
                for n in range(2)]
        assert [answer.status_code for answer in sent] == [202, 202]


def test_a_busy_conversation_is_409_before_the_limit_is_429_when_redis_is_out_of_reach(world: World) -> None:
    """A second message to a conversation whose turn is in flight is `conversation_busy`, as with Redis up, even
    when that turn also fills the user's limit: the database's checks come in the same order as the script's."""
    with api_process("web-busy-without-redis", REDIS_URL="redis://127.0.0.1:9/0",
                     AGENTQ_MAX_ACTIVE_CONVERSATIONS="1") as (url, _):
        agent_id = world.agent(world.model("slow-busy-without-redis", upstream="echo;ttft=3"), timeout_seconds=20)
        _, key = world.user()
        conversation_id = world.conversation(key, agent_id)

        def post() -> httpx.Response:
            return httpx.post(f"{url}/api/conversations/{conversation_id}/messages", timeout=30,
                              headers={"Authorization": f"Bearer {key}"}, json={"content": "hi"})

        assert post().status_code == 202
        busy = post()
        assert (busy.status_code, busy.json()["error"]["code"]) == (409, "conversation_busy")


def test_a_lock_left_by_an_intake_that_died_refuses_nothing_the_database_allows(
        world: World, redis_client: redis.Redis) -> None:
    """An API process that died while it accepted a message leaves the conversation's lock to its intake (it
    hands it to the turn only after its commit): the next message must not be refused 409 for a lease, since
    the database, which decides, has no turn in flight there."""
    from app.conversation_locks import INTAKE_OWNER, lock_key

    agent_id = world.agent(world.model())
    _, key = world.user()
    conversation_id = world.conversation(key, agent_id)
    redis_client.set(lock_key(conversation_id), f"{INTAKE_OWNER}0123456789abcdef", px=60_000)
    accepted = world.send(key, conversation_id)
    assert accepted.status_code == 202, accepted.json
    assert world.wait_terminal(key, accepted.json["assistant_message"]["id"])["status"] == "success"
