"""The whole turn, through the API, a real worker process, the openai SDK and the mock upstream."""

from __future__ import annotations

from decimal import Decimal
from typing import TYPE_CHECKING, Any, cast

import pytest

from app.turn_status import TurnStatus
from tests.support import wait_for

if TYPE_CHECKING:
    from collections.abc import Callable
    from datetime import datetime

    import redis

    from app.prepared import Unit
    from app.run_kinds import RunKind
    from app.turn_intake import AcceptedTurn
    from tests.conftest import UpstreamLog, Workers, World


@pytest.fixture(autouse=True)
def _running(workers: Workers, upstream: UpstreamLog) -> None:
    """Every test here needs a worker and a clean upstream log."""


def test_a_turns_worker_lines_name_the_api_request_that_sent_it(world: World, workers: Workers) -> None:
    """An operator following a request's `X-Request-ID` found its API lines, but the worker's lines of its turn
    named only the turn: the message carries the request's id, and each line of its delivery names both."""
    _, key = world.user()
    conversation_id = world.conversation(key, world.agent(world.model()))
    sent = world.send(key, conversation_id, headers={"X-Request-ID": "ticket-4712"})
    turn_id = sent.json["assistant_message"]["id"]
    assert world.wait_terminal(key, turn_id)["status"] == "success"
    named = f"[request ticket-4712] [turn {turn_id}] turn {turn_id} ended success"

    def the_end_named() -> list[str]:
        return [line for process in workers.processes for line in process.output().splitlines() if named in line]

    assert len(wait_for(the_end_named, what="the worker's line of the turn's end, naming the request")) == 1


def test_a_turn_is_answered_stored_and_charged_once(world: World, upstream: UpstreamLog) -> None:
    model_id = world.model(price_in="1.000000", price_out="2.000000")
    agent_id = world.agent(model_id)
    _, key = world.user(balance="10")
    conversation_id = world.conversation(key, agent_id)

    accepted = world.send(key, conversation_id, "hello world")
    assert accepted.status_code == 202
    user_message, assistant = accepted.json["user_message"], accepted.json["assistant_message"]
    assert (user_message["status"], assistant["status"]) == ("pending", "pending")
    assert (user_message["seq"], assistant["seq"]) == (1, 2)
    assert (user_message["role"], assistant["role"]) == ("user", "assistant")

    done = world.wait_terminal(key, assistant["id"])
    assert done["status"] == "success"
    assert done["content"] == "echo: hello world"
    assert done["model"] == "primary"
    assert done["error_message"] is None and done["error_display"] is None
    sent = upstream.requests()
    assert len(sent) == 1
    body = sent[0]["body"]
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["max_tokens"] == 1024  # the agent sets none: AGENTQ_DEFAULT_MAX_TOKENS, which the reservation priced
    assert body["messages"] == [{"role": "system", "content": "You are helpful."},
                                {"role": "user", "content": "hello world"}]
    prompt_tokens, completion_tokens = done["prompt_tokens"], done["completion_tokens"]
    assert (prompt_tokens, completion_tokens) == (8, 3)  # the mock counts len//4+1 a message
    cost = (Decimal(prompt_tokens) * 1 + Decimal(completion_tokens) * 2) / 1000
    assert done["cost"] == f"{cost:.6f}"
    assert done["latency_ms"] >= 0

    assert world.message(key, user_message["id"])["status"] == "success"
    me = world.api.get("/api/me", key).json
    assert me["balance"] == f"{Decimal(10) - cost:.6f}"
    ledger = world.api.get("/api/me/transactions", key).json["items"]
    assert [(t["message_id"], t["amount"]) for t in ledger] == [(assistant["id"], f"{-cost:.6f}"), (None, "10.000000")]
    assert ledger[0]["balance_after"] == me["balance"]

    conversation = world.api.get(f"/api/conversations/{conversation_id}", key).json
    assert conversation["message_count"] == 2
    assert conversation["total_tokens"] == prompt_tokens + completion_tokens


def test_history_holds_only_successful_turns(world: World, upstream: UpstreamLog) -> None:
    good = world.model("good")
    failing = world.model("failing", upstream="echo;fail=500")
    agent_id = world.agent(good)
    _, key = world.user()
    conversation_id = world.conversation(key, agent_id)

    first = world.send(key, conversation_id, "first").json["assistant_message"]
    assert world.wait_terminal(key, first["id"])["status"] == "success"
    world.api.patch(f"/api/admin/agents/{agent_id}", world.admin_key, {"model_id": failing})
    second = world.send(key, conversation_id, "second").json["assistant_message"]
    failed = world.wait_terminal(key, second["id"])
    assert failed["status"] == "llm_error"
    assert "500" in failed["error_message"]
    assert failed["error_display"] == "The model is unavailable right now. Please try again in a moment."
    zh = world.api.get(f"/api/messages/{second['id']}", key, headers={"Accept-Language": "zh-CN,zh;q=0.9"}).json
    assert zh["error_display"] == "模型暂时不可用，请稍后重试。"
    world.api.patch(f"/api/admin/agents/{agent_id}", world.admin_key, {"model_id": good})
    upstream.clear()
    third = world.send(key, conversation_id, "third").json["assistant_message"]
    assert third["seq"] == 6
    assert world.wait_terminal(key, third["id"])["status"] == "success"
    assert upstream.requests()[0]["body"]["messages"] == [
        {"role": "system", "content": "You are helpful."},
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "echo: first"},
        {"role": "user", "content": "third"},
    ]
    conversation = world.api.get(f"/api/conversations/{conversation_id}", key).json
    assert conversation["message_count"] == 6
    messages = world.api.get(f"/api/conversations/{conversation_id}/messages", key).json["items"]
    assert [m["seq"] for m in messages] == [1, 2, 3, 4, 5, 6]
    assert [m["status"] for m in messages] == ["success", "success", "llm_error", "llm_error", "success", "success"]
    success_tokens = sum(m["total_tokens"] for m in messages if m["role"] == "assistant" and m["status"] == "success")
    assert conversation["total_tokens"] == success_tokens


def test_a_redelivered_message_neither_calls_the_model_again_nor_charges_twice(
        world: World, upstream: UpstreamLog, workers: Workers) -> None:
    from app.run_kinds import TURN

    agent_id = world.agent(world.model(price_in="1", price_out="1"))
    _, key = world.user(balance="5")
    conversation_id = world.conversation(key, agent_id)
    assistant = world.send(key, conversation_id, "once").json["assistant_message"]
    done = world.wait_terminal(key, assistant["id"])
    assert done["status"] == "success"

    for _ in range(2):
        assert TURN.send(assistant["id"], None)
    refused = f"turn {assistant['id']} not run: finished"
    wait_for(lambda: sum(p.output().count(refused) for p in workers.processes) == 2,
             what="both duplicate deliveries to find the turn ended")
    assert _attempt_count(assistant["id"]) == 1
    assert len(upstream.requests()) == 1
    ledger = world.api.get("/api/me/transactions", key).json["items"]
    assert [t["amount"] for t in ledger if t["message_id"] == assistant["id"]] == ["-0.009000"]
    assert (done["cost"], world.api.get("/api/me", key).json["balance"]) == ("0.009000", "4.991000")


def _attempt_count(message_id: int) -> int:
    from sqlalchemy import func, select

    from app.db import transaction
    from app.models import ModelAttempt

    with transaction() as session:
        return session.scalar(select(func.count()).select_from(ModelAttempt)
                              .where(ModelAttempt.message_id == message_id)) or 0


def test_concurrent_duplicate_deliveries_run_the_model_once(world: World, upstream: UpstreamLog) -> None:
    """Two copies of one message in flight at once: the turn's row lock lets one worker thread claim it."""
    from app.run_kinds import TURN

    agent_id = world.agent(world.model(upstream="echo;ttft=0.5"))
    _, key = world.user()
    conversation_id = world.conversation(key, agent_id)
    assistant = world.send(key, conversation_id, "twice").json["assistant_message"]
    assert TURN.send(assistant["id"], None)
    assert world.wait_terminal(key, assistant["id"])["status"] == "success"
    wait_for(lambda: _attempt_count(assistant["id"]) == 1, what="the attempt record")
    assert len(upstream.requests()) == 1
    ledger = world.api.get("/api/me/transactions", key).json["items"]
    assert len([t for t in ledger if t["message_id"] == assistant["id"]]) == 1


def test_sequence_numbers_survive_a_redis_flush(world: World, redis_client: redis.Redis) -> None:
    agent_id = world.agent(world.model())
    _, key = world.user()
    conversation_id = world.conversation(key, agent_id)
    first = world.send(key, conversation_id, "one").json["assistant_message"]
    world.wait_terminal(key, first["id"])
    redis_client.flushdb()
    second = world.send(key, conversation_id, "two").json
    assert (second["user_message"]["seq"], second["assistant_message"]["seq"]) == (3, 4)
    assert world.wait_terminal(key, second["assistant_message"]["id"])["status"] == "success"
    seqs = [m["seq"] for m in world.api.get(f"/api/conversations/{conversation_id}/messages", key).json["items"]]
    assert seqs == [1, 2, 3, 4]


def test_idempotency_key_returns_the_first_answer(world: World, upstream: UpstreamLog) -> None:
    agent_id = world.agent(world.model())
    _, key = world.user()
    conversation_id = world.conversation(key, agent_id)
    headers = {"Idempotency-Key": "retry-123"}
    first = world.send(key, conversation_id, "pay once", headers=headers)
    again = world.send(key, conversation_id, "pay once", headers=headers)
    assert first.status_code == again.status_code == 202
    assert again.json == first.json
    assert world.wait_terminal(key, first.json["assistant_message"]["id"])["status"] == "success"
    later = world.send(key, conversation_id, "pay once", headers=headers)
    assert later.status_code == 202
    assert later.json == first.json  # the first answer, byte for byte: both `pending`, the answer empty
    assert [first.json[m]["status"] for m in ("user_message", "assistant_message")] == ["pending", "pending"]
    assert len(world.api.get(f"/api/conversations/{conversation_id}/messages", key).json["items"]) == 2
    assert len(upstream.requests()) == 1


def test_a_retry_that_looked_before_its_first_request_committed_gets_the_first_answer(
        world: World, upstream: UpstreamLog, monkeypatch: pytest.MonkeyPatch) -> None:
    """The retry looks for its key and finds nothing; the first request then commits and hands the
    conversation's lock to its turn; the retry, refused by that lock, answers with the first turn (202),
    not 409."""
    from app import turn_intake
    from app.auth import Principal

    agent_id = world.agent(world.model(upstream="echo;ttft=2"), timeout_seconds=10)
    user_id, key = world.user()
    conversation_id = world.conversation(key, agent_id)
    headers = {"Idempotency-Key": "racing"}
    looked_up = turn_intake._replay
    first: list[Any] = []

    def first_request_commits_meanwhile(
            unit: Unit, user: int, idempotency_key: str, conversation: int, content: str) -> AcceptedTurn | None:
        found = looked_up(unit, user, idempotency_key, conversation, content)
        if not first:
            first.append(None)
            first[0] = world.send(key, conversation_id, "once", headers=headers)
        return found

    monkeypatch.setattr(turn_intake, "_replay", first_request_commits_meanwhile)
    retry = turn_intake.submit_turn(Principal(user_id, "alice", False), conversation_id, "once", "racing")
    assert first[0].status_code == 202
    first_id = first[0].json["assistant_message"]["id"]
    assert (retry.replayed, retry.assistant_message.id) == (True, first_id)
    assert world.wait_terminal(key, first_id)["status"] == "success"
    assert len(world.api.get(f"/api/conversations/{conversation_id}/messages", key).json["items"]) == 2


def _committed_under_a_key(
        world: World, redis_client: redis.Redis, content: str, idempotency_key: str) -> tuple[str, int, Any]:
    """A turn its first request committed under `idempotency_key` and never sent (the process died): the
    user's key, the conversation and the accepted turn."""
    from app.auth import Principal
    from app.db import plain_transaction
    from app.redis_epoch import epoch_key
    from app.turn_intake import _insert_turn

    # After the test's Redis flush the next sweep re-sends every pending turn; let it pass first.
    wait_for(lambda: redis_client.exists(epoch_key()), what="a recovery sweep after the Redis flush")
    agent_id = world.agent(world.model())
    user_id, key = world.user()
    conversation_id = world.conversation(key, agent_id)
    with plain_transaction() as connection:
        committed = _insert_turn(connection, Principal(user_id, "alice", False), conversation_id, content,
                                 idempotency_key)
    return key, conversation_id, committed


def test_a_retry_of_a_turn_committed_but_never_sent_sends_it(world: World, redis_client: redis.Redis) -> None:
    """The first request committed its turn and died before sending it; its retry with the same key answers
    with that turn and sends it, so it runs at once, not after the sweeps that look for its send's receipt
    (they would have moved its outbox mark)."""
    key, conversation_id, committed = _committed_under_a_key(world, redis_client, "lost send", "died-before-send")
    retry = world.send(key, conversation_id, "lost send", headers={"Idempotency-Key": "died-before-send"})
    assert retry.status_code == 202
    assert retry.json["assistant_message"]["id"] == committed.assistant_message.id
    assert world.wait_terminal(key, committed.assistant_message.id, timeout=15)["status"] == "success"
    assert _outbox_mark(committed.assistant_message.id) == committed.enqueued_at


@pytest.mark.parametrize("first_send", ["lost", "received"])
def test_replays_of_a_pending_turn_send_it_again_once_a_grace_not_once_each(
        world: World, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch, settings_of: Callable[..., None],
        first_send: str) -> None:
    """Every replay of a key whose turn was still pending sent one more message: a client replaying in a loop
    during a backlog queued as many ahead of everyone's turns. A turn whose first send was lost is sent once
    a grace (a minute here, so that the five replays fall in one); one whose first send left its receipt in
    Redis is not sent again at all."""
    from sqlalchemy import text

    import app.outbox
    from app.db import plain_transaction
    from app.run_kinds import TURN

    settings_of(AGENTQ_ENQUEUE_GRACE_SECONDS="60")
    key, conversation_id, committed = _committed_under_a_key(world, redis_client, "replayed", "replayed-key")
    turn_id = committed.assistant_message.id
    sent: list[int] = []
    send = app.outbox.send

    def counted_send(kind: RunKind, ident: int, at: datetime | None) -> bool:
        sent.append(ident)
        return send(kind, ident, at)

    monkeypatch.setattr(app.outbox, "send", counted_send)
    with plain_transaction() as connection:  # the turn stays pending while the replays arrive: a worker's
        connection.execute(text("SELECT 1 FROM turns WHERE assistant_message_id = :id FOR UPDATE"),  # claim waits
                           {"id": turn_id})
        if first_send == "received":
            assert app.outbox.send(TURN, turn_id, committed.enqueued_at)  # as the first request does
        replies = [world.send(key, conversation_id, "replayed", headers={"Idempotency-Key": "replayed-key"})
                   for _ in range(5)]
    assert [(r.status_code, r.json["assistant_message"]["id"]) for r in replies] == [(202, turn_id)] * 5
    assert sent == [turn_id]  # the replay's one send, or the first request's and none of the replays'
    assert world.wait_terminal(key, turn_id, timeout=15)["status"] == "success"


def _outbox_mark(turn_id: int) -> datetime | None:
    from app.db import transaction
    from app.models import Turn

    with transaction() as session:
        return session.get_one(Turn, turn_id).enqueued_at


def _committed_never_sent(world: World, content: str, *, sent_seconds_ago: int) -> tuple[str, int]:
    """A turn an API process committed and died before sending, its outbox mark `sent_seconds_ago` old:
    the user's key and the turn's id."""
    from sqlalchemy import text

    from app.auth import Principal
    from app.db import plain_transaction
    from app.turn_intake import _insert_turn

    user_id, key = world.user()
    conversation_id = world.conversation(key, world.agent(world.model()))
    with plain_transaction() as connection:
        turn_id = _insert_turn(connection, Principal(user_id, "alice", False), conversation_id, content,
                               None).assistant_message.id
        connection.execute(text("UPDATE turns SET enqueued_at = now() - make_interval(secs => :ago) "
                                "WHERE assistant_message_id = :id"), {"id": turn_id, "ago": sent_seconds_ago})
    return key, turn_id


def test_a_turn_committed_by_a_process_that_died_before_sending_it_is_sent_by_the_sweep(
        world: World, redis_client: redis.Redis) -> None:
    """The API process committed a turn and died before its send: the turn carries the outbox mark its
    intake wrote, as one waiting in a long queue does, but its send left no receipt in Redis, so a sweep
    soon after the enqueue grace (1 s here) sends it, rather than the stale-pending rule (300 s)."""
    from app.auth import Principal
    from app.db import plain_transaction
    from app.redis_epoch import epoch_key
    from app.turn_intake import _insert_turn

    wait_for(lambda: redis_client.exists(epoch_key()), what="a recovery sweep after the Redis flush")
    user_id, key = world.user()
    conversation_id = world.conversation(key, world.agent(world.model()))
    with plain_transaction() as connection:
        committed = _insert_turn(connection, Principal(user_id, "alice", False), conversation_id, "never sent", None)
    turn_id = committed.assistant_message.id
    assert world.wait_terminal(key, turn_id, timeout=15)["status"] == "success"
    assert (mark := _outbox_mark(turn_id)) is not None and mark > committed.enqueued_at
    assert world.api.get(f"/api/messages/{turn_id}", key).json["content"] == "echo: never sent"


def test_a_worker_starting_after_an_api_stranded_a_turn_sends_it_at_its_first_sweep(
        world: World, workers: Workers, redis_client: redis.Redis) -> None:
    """No worker runs (a machine restarting, a deployment stopped) when an API process commits a turn and dies
    before its send: by the time a worker starts, the turn is older than the window the later sweeps look
    in. A worker process's first sweep looks back as far as the stale-pending rule, sends that turn, and
    leaves a turn whose message waited in the queue (its receipt is there) to the queue."""
    from sqlalchemy import text

    from app.auth import Principal
    from app.db import plain_transaction, transaction
    from app.redis_epoch import epoch_key
    from app.turn_intake import _insert_turn

    wait_for(lambda: redis_client.exists(epoch_key()), what="a recovery sweep after the Redis flush")
    agent_id = world.agent(world.model())
    stranded_user, stranded_key = world.user("stranded")
    _, queued_key = world.user("queued")
    workers.stop_all()
    try:
        queued = world.send(queued_key, world.conversation(queued_key, agent_id), "waited in the queue").json[
            "assistant_message"]["id"]
        with plain_transaction() as connection:
            stranded = _insert_turn(connection, Principal(stranded_user, "stranded", False),
                                    world.conversation(stranded_key, agent_id), "stranded", None)

        def marks_older_than_the_later_sweeps_window() -> bool:  # the enqueue grace (1 s) and three sweeps of 1 s
            with transaction() as session:
                return bool(session.execute(text("SELECT bool_and(enqueued_at < now() - interval '5 seconds') "
                                                 "FROM turns")).scalar())

        wait_for(marks_older_than_the_later_sweeps_window, timeout=15, what="the turns' marks to age")
    finally:
        workers.start()
    stranded_id = stranded.assistant_message.id
    assert world.wait_terminal(stranded_key, stranded_id, timeout=30)["status"] == "success"
    assert world.wait_terminal(queued_key, queued)["status"] == "success"
    assert (mark := _outbox_mark(stranded_id)) is not None and mark > stranded.enqueued_at
    with transaction() as session:
        assert session.execute(text("SELECT enqueued_at = created_at FROM turns WHERE assistant_message_id = :id"),
                               {"id": queued}).scalar() is True


def test_a_first_sweep_that_could_not_ask_redis_for_receipts_says_so_and_sends_nothing(
        world: World, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker process's first sweep is its one look far back for turns without a receipt; when Redis does
    not answer that lookup the report says so (its loop then keeps the look-back for the next sweep), and no
    turn is sent on a guess. Asked again with Redis back, it sends the stranded turn."""
    import redis

    import app.recovery
    import app.redis_epoch

    wait_for(lambda: redis_client.exists(app.redis_epoch.epoch_key()), what="a recovery sweep after the Redis flush")
    # Committed a minute ago: outside the running workers' window, inside a first sweep's look-back.
    key, stranded = _committed_never_sent(world, "stranded", sent_seconds_ago=60)
    with monkeypatch.context() as away:
        for module in (app.recovery, app.redis_epoch):
            away.setattr(module, "get_redis", lambda: redis.Redis(port=1, socket_connect_timeout=0.2))
        blind = app.recovery.recover_once(first_sweep=True)
    assert (blind.receipts_unchecked, blind.sent) == (True, [])
    seeing = app.recovery.recover_once(first_sweep=True)
    assert (seeing.receipts_unchecked, seeing.sent) == (False, [stranded])
    assert world.wait_terminal(key, stranded)["status"] == "success"


def test_a_worker_process_keeps_its_first_sweeps_look_back_until_a_sweep_could_ask_redis_for_receipts(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The recovery loop's part of the rule above: each sweep that could not ask for receipts leaves the next one a
    first sweep, and the first that could ends the look-back."""
    import threading

    import app.recovery

    calls: list[bool] = []
    fourth = threading.Event()

    def sweep(*, first_sweep: bool, gate: object) -> app.recovery.RecoveryReport:
        calls.append(first_sweep)
        if len(calls) >= 4:
            fourth.set()
        return app.recovery.RecoveryReport(receipts_unchecked=len(calls) <= 2)

    monkeypatch.setattr(app.recovery, "recover_once", sweep)
    loop = app.recovery.RecoveryLoop()
    loop.start()
    try:
        assert fourth.wait(15)
    finally:
        loop.stop()
    assert calls[:4] == [True, True, True, False]


def test_a_sweep_after_redis_lost_its_data_whose_sends_failed_leaves_redis_taken_for_lost(
        world: World, redis_client: redis.Redis, workers: Workers, monkeypatch: pytest.MonkeyPatch) -> None:
    """Redis lost its data (no epoch key) and the sweep's sends failed: the epoch is not marked, so the next sweep
    still takes Redis for lost and sends every pending run again; once a sweep has sent them all, it is marked."""
    import app.recovery
    from app.redis_epoch import epoch_key
    from tests.conftest import point_the_broker_at_a_closed_port

    wait_for(lambda: redis_client.exists(epoch_key()), what="a recovery sweep after the Redis flush")
    workers.stop_all()  # their own sweeps, which reach Redis, would send the turn and mark the epoch
    try:
        key, turn_id = _committed_never_sent(world, "sent after redis lost it", sent_seconds_ago=1)
        redis_client.delete(epoch_key())
        with monkeypatch.context() as broker_down:
            point_the_broker_at_a_closed_port(broker_down)
            failed = app.recovery.recover_once()
        assert (failed.redis_lost, failed.sent, failed.unsent, redis_client.exists(epoch_key())) == (True, [], 1, 0)
        again = app.recovery.recover_once()
        assert (again.redis_lost, again.sent, again.unsent, redis_client.exists(epoch_key())) == (
            True, [turn_id], 0, 1)
    finally:
        workers.start()
    assert world.wait_terminal(key, turn_id)["status"] == "success"


def test_a_sweep_while_redis_is_out_of_reach_sends_nothing_and_says_so_once(
        world: World, redis_client: redis.Redis, workers: Workers, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """A sweep tried each due run's send while Redis was away: two transactions and a failed send a run, a line
    each, at every sweep, and with a Redis that hangs a socket timeout each, which held the sweep (and the
    leases it takes over) for minutes. Redis not answering as the sweep begins, it sends none, leaves their
    outbox marks as they were, and says so once; with Redis back, it sends them."""
    import logging

    import redis
    from sqlalchemy import text

    import app.failure_logs
    import app.recovery
    import app.redis_epoch
    from app.db import plain_transaction
    from tests.conftest import point_the_broker_at_a_closed_port

    monkeypatch.setattr(app.failure_logs, "_outage_said", {})
    wait_for(lambda: redis_client.exists(app.redis_epoch.epoch_key()), what="a recovery sweep after the Redis flush")
    workers.stop_all()  # their own sweeps, which reach Redis, would send the turn
    try:
        key, unsent = _committed_never_sent(world, "unsent while redis is away", sent_seconds_ago=60)
        with plain_transaction() as connection:  # its send failed: no mark, committed a while ago
            connection.execute(text("UPDATE turns SET enqueued_at = NULL, created_at = now() - interval '10 seconds' "
                                    "WHERE assistant_message_id = :id"), {"id": unsent})
        with monkeypatch.context() as away, caplog.at_level(logging.WARNING):
            for module in (app.recovery, app.redis_epoch):
                away.setattr(module, "get_redis", lambda: redis.Redis(port=1, socket_connect_timeout=0.2))
            point_the_broker_at_a_closed_port(away)  # its sends fail too, as they do with Redis away
            sweeps = [app.recovery.recover_once() for _ in range(3)]
        assert [(sweep.sent, sweep.receipts_unchecked, sweep.unsent > 0) for sweep in sweeps] == [
            ([], True, True)] * 3
        assert _outbox_mark(unsent) is None
        said = [record.getMessage() for record in caplog.records if record.name in ("app.recovery", "app.dispatch")]
        assert len(said) == 1 and said[0].startswith("Redis is out of reach: ") and said[0].endswith(
            "due runs are left for a sweep that reaches it, said at most every 30 s"), said
        assert unsent in app.recovery.recover_once().sent
    finally:
        workers.start()
    assert world.wait_terminal(key, unsent)["status"] == "success"


def test_a_turn_whose_lease_ran_out_is_sent_again_once_a_lease_not_at_every_sweep(
        world: World, redis_client: redis.Redis, workers: Workers) -> None:
    """A turn whose worker died is sent again once its lease has run out, and not again until another lease
    has passed since: without that, each sweep of each worker process queued one more message for it while it
    waited behind a backlog (a no-op at its claim, but a queue growing by a message a second). The workers
    are stopped meanwhile, so that nothing claims it between the two sweeps."""
    from sqlalchemy import text

    import app.recovery
    import app.redis_epoch
    from app.db import plain_transaction

    wait_for(lambda: redis_client.exists(app.redis_epoch.epoch_key()), what="a recovery sweep after the Redis flush")
    agent_id = world.agent(world.model())
    _, key = world.user()
    conversation_id = world.conversation(key, agent_id)
    workers.stop_all()
    try:
        turn = world.send(key, conversation_id, "my worker died").json["assistant_message"]["id"]
        with plain_transaction() as connection:  # as a dead worker left it: its lease ran out a minute ago
            connection.execute(text("UPDATE conversation_messages SET status = 'processing' WHERE id = :id OR id = "
                                    "(SELECT user_message_id FROM turns WHERE assistant_message_id = :id)"),
                               {"id": turn})
            connection.execute(text("UPDATE turns SET lease_token = 'dead-worker', deliveries = 1, "
                                    "lease_expires_at = now() - interval '1 minute', "
                                    "enqueued_at = now() - interval '10 minutes' WHERE assistant_message_id = :id"),
                               {"id": turn})
        first, second = app.recovery.recover_once(), app.recovery.recover_once()
        assert (turn in first.sent, turn in second.sent) == (True, False)
    finally:
        workers.start()
    done = world.wait_terminal(key, turn)
    assert (done["status"], done["content"]) == ("success", "echo: my worker died")
    me = world.api.get("/api/me", key).json  # two messages sent, one run, one charge
    assert me["balance"] == me["available_balance"] == f"{Decimal(10) - Decimal(done['cost']):.6f}"


def test_an_admin_test_run_committed_but_never_sent_is_sent_by_the_sweep(
        world: World, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same for an admin test run whose API process died between its commit and its send."""
    from app import outbox
    from app.redis_epoch import epoch_key

    wait_for(lambda: redis_client.exists(epoch_key()), what="a recovery sweep after the Redis flush")
    agent_id = world.agent(world.model())
    with monkeypatch.context() as died:
        died.setattr(outbox, "send", lambda kind, ident, enqueued_at: True)
        accepted = world.api.post(f"/api/admin/agents/{agent_id}/debug/execute", world.admin_key,
                                  {"content": "never sent"})
    assert accepted.status_code == 202
    run_id = accepted.json["debug_log_id"]
    log = wait_for(lambda: (found := world.api.get(f"/api/admin/debug-logs/{run_id}", world.admin_key).json)
                   ["status"] not in ("pending", "processing") and found, timeout=15, what="the test run to end")
    assert (log["status"], log["output"]) == ("success", "echo: never sent")


def test_a_turn_handed_to_a_retry_that_redis_lost_is_sent_again_by_the_sweep_that_notices(
        world: World, redis_client: redis.Redis) -> None:
    """A delivery that raised hands its turn to Dramatiq's retry: no token, and an expiry the sweep leaves
    alone for AGENTQ_STALE_PENDING_SECONDS (300 s). When Redis loses its data the retry goes with it, so
    the sweep that notices the loss sends such a turn at once, as it sends every pending one."""
    from sqlalchemy import text

    from app.auth import Principal
    from app.db import plain_transaction, transaction
    from app.redis_epoch import epoch_key
    from app.turn_intake import _insert_turn

    wait_for(lambda: redis_client.exists(epoch_key()), what="a recovery sweep after the Redis flush")
    agent_id = world.agent(world.model())
    user_id, key = world.user()
    conversation_id = world.conversation(key, agent_id)
    with plain_transaction() as connection:
        accepted = _insert_turn(connection, Principal(user_id, "alice", False), conversation_id, "retry lost", None)
    turn_id = accepted.assistant_message.id
    with transaction() as session:
        session.execute(text("UPDATE conversation_messages SET status = 'processing' WHERE id IN (:q, :a)"),
                        {"q": accepted.user_message.id, "a": turn_id})
        session.execute(text("UPDATE turns SET lease_token = NULL, lease_expires_at = now() + interval '300 seconds', "
                             "deadline_at = now() + interval '1 hour', deliveries = 1, enqueued_at = now() "
                             "WHERE assistant_message_id = :a"), {"a": turn_id})
    redis_client.flushdb()
    assert world.wait_terminal(key, turn_id, timeout=15)["status"] == "success"
    with transaction() as session:
        assert session.execute(text("SELECT deliveries FROM turns WHERE assistant_message_id = :a"),
                               {"a": turn_id}).scalar() == 2


def test_turns_re_sent_into_a_redis_that_loses_its_data_again_are_sent_again_by_the_next_sweep(
        world: World, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    """After Redis lost its data, recovery re-sends every pending turn, then marks Redis as recovered. Had
    Redis lost its data again during those sends, the messages went with it: the mark the sweep left in
    Redis before sending is gone too, so the epoch is not set and the next sweep sends them all again
    (they waited for the stale-pending rule, 300 s, when the epoch was set regardless)."""
    import app.recovery
    import app.redis_epoch
    from app import outbox
    from app.auth import Principal
    from app.db import plain_transaction
    from app.dispatch import message_id, receipt_key
    from app.turn_intake import _insert_turn

    wait_for(lambda: redis_client.exists(app.redis_epoch.epoch_key()), what="the workers' sweep after the flush")
    own_epoch = f"{app.redis_epoch.epoch_key()}:this-test"
    monkeypatch.setattr(app.redis_epoch, "epoch_key", lambda: own_epoch)  # the workers' sweeps keep their own
    agent_id = world.agent(world.model())
    turns, keys = [], {}
    for name in ("alice", "bob"):
        user_id, key = world.user(name)
        with plain_transaction() as connection:
            accepted = _insert_turn(connection, Principal(user_id, name, False),
                                    world.conversation(key, agent_id), "lost twice", None)
        turns.append(accepted.assistant_message.id)
        keys[accepted.assistant_message.id] = key

    def send_into_a_redis_that_loses_it(kind: RunKind, ident: int, enqueued_at: datetime) -> bool:
        for mark in cast(list[bytes], redis_client.keys(f"{own_epoch}:sweep:*")):
            redis_client.delete(mark)
        # Its receipt stays, so the workers' own sweeps (Redis is whole to them) leave the turn to this test's.
        redis_client.set(receipt_key(message_id(kind.actor, ident, enqueued_at)), b"")
        return True

    with monkeypatch.context() as lost:
        lost.setattr(outbox, "send", send_into_a_redis_that_loses_it)
        first = app.recovery.recover_once()
    assert first.redis_lost and sorted(first.sent) == turns
    assert not redis_client.exists(own_epoch)

    second = app.recovery.recover_once()
    assert second.redis_lost and sorted(second.sent) == turns
    assert redis_client.exists(own_epoch)
    for turn_id in turns:
        assert world.wait_terminal(keys[turn_id], turn_id)["status"] == "success"
    third = app.recovery.recover_once()
    assert (third.redis_lost, third.sent) == (False, [])


def test_a_redis_restarted_from_an_older_snapshot_has_its_pending_turns_sent_again(
        world: World, redis_client: redis.Redis) -> None:
    """A Redis restarted from its last snapshot keeps the epoch key from before but not the messages sent
    since: the epoch names the server run that wrote it, so the next sweep sees another run and sends every
    pending turn again (it waited for the stale-pending rule, 300 s). The restart is stood in for by the
    snapshot's state: a committed turn whose message is gone, and an epoch written by an earlier run."""

    from app.redis_epoch import epoch_key

    wait_for(lambda: redis_client.exists(epoch_key()), what="a recovery sweep after the Redis flush")
    # Sent half a minute ago, before the snapshot: past the window in which the running workers' sweeps
    # look for its receipt, well before the stale-pending rule (300 s), so only the lost data's rule sends it.
    key, lost = _committed_never_sent(world, "sent after the snapshot", sent_seconds_ago=30)
    redis_client.set(epoch_key(), "0123456789abcdef0123456789abcdef01234567 2026-12-01T00:00:00+00:00")
    assert world.wait_terminal(key, lost, timeout=15)["status"] == "success"
    run_id = cast(dict[str, Any], redis_client.info("server"))["run_id"]
    assert cast(bytes, redis_client.get(epoch_key())).split(b" ")[0].decode() == run_id


def test_a_turn_accepted_while_redis_is_unreachable_is_sent_by_recovery(
        world: World, workers: Workers, unreachable_broker: None) -> None:
    """The API's enqueue fails (its broker points at a closed port); the worker's recovery sends the turn. The
    workers are stopped until the turn is seen unsent: a sweep of theirs could send and end it first."""
    from app.db import transaction
    from app.models import Turn

    agent_id = world.agent(world.model())
    _, key = world.user()
    conversation_id = world.conversation(key, agent_id)
    workers.stop_all()
    try:
        accepted = world.send(key, conversation_id, "while redis is away")
        assert accepted.status_code == 202
        assistant_id = accepted.json["assistant_message"]["id"]
        with transaction() as session:
            assert session.get_one(Turn, assistant_id).enqueued_at is None
    finally:
        workers.start()
    assert world.wait_terminal(key, assistant_id)["status"] == "success"


def test_the_pending_bound_ends_a_turn_only_if_it_is_still_pending_since_before_its_cutoff(
        world: World, workers: Workers, unreachable_broker: None) -> None:
    """The sweep that finds a turn pending too long read it a moment before it ends it; meanwhile a worker may
    have claimed it (and handed it to a retry, leaving no lease to protect it) or an operator requeued it.
    The end is judged again under the turn's lock: a turn pending only since after the cutoff is left alone.
    The workers are stopped meanwhile: their sweeps would send the turn."""
    from datetime import UTC, datetime, timedelta

    from app.unheld_ends import abandon_turn

    agent_id = world.agent(world.model())
    _, key = world.user()
    conversation_id = world.conversation(key, agent_id)
    workers.stop_all()
    try:
        accepted_at = datetime.now(UTC)
        turn_id = world.send(key, conversation_id, "not yet").json["assistant_message"]["id"]
        assert abandon_turn(turn_id, "waited too long", pending_before=accepted_at - timedelta(minutes=1)) is None
        assert world.message(key, turn_id)["status"] == "pending"
        assert abandon_turn(turn_id, "waited too long",
                            pending_before=datetime.now(UTC) + timedelta(minutes=1)) is TurnStatus.ERROR
    finally:
        workers.start()
    ended = world.message(key, turn_id)
    assert (ended["status"], ended["error_message"]) == ("error", "waited too long")


def test_the_pending_bound_ends_a_turn_pending_past_the_setting_and_not_one_within_it(
        world: World, workers: Workers, unreachable_broker: None) -> None:
    """The bound is `AGENTQ_MAX_PENDING_SECONDS` to the second, by the database's clock: a turn pending half as
    long again is ended, one pending half as long is not (the test of the sweep's timing allowed a cutoff
    twice the setting). The workers are stopped meanwhile: their sweeps would send the turns."""
    from sqlalchemy import text

    from app.config import get_settings
    from app.db import transaction
    from app.pending_bound import end_runs_pending_too_long
    from app.run_kinds import TURN

    bound = get_settings().max_pending_seconds
    agent_id = world.agent(world.model())
    _, key = world.user()
    workers.stop_all()
    try:
        turns = []
        for project, waited in ((1, bound * 1.5), (2, bound * 0.5)):
            conversation_id = world.conversation(key, agent_id, project_id=project)
            turns.append(world.send(key, conversation_id, "anyone?").json["assistant_message"]["id"])
            with transaction() as session:
                session.execute(text("UPDATE conversation_messages SET updated_at = now() - make_interval(secs => :s) "
                                     "WHERE conversation_id = :c"), {"s": waited, "c": conversation_id})
        assert turns[1] not in end_runs_pending_too_long()[TURN]  # turns[0] by this look or an API process's
        assert [world.message(key, turn)["status"] for turn in turns] == ["error", "pending"]
    finally:
        workers.start()
    assert world.wait_terminal(key, turns[1])["status"] == "success"


def test_the_pending_bound_counts_a_test_runs_wait_from_its_status_not_from_its_sends(
        world: World, workers: Workers, unreachable_broker: None) -> None:
    """An admin test run's outbox mark is on the run's own row: each send by a sweep, and each send that failed,
    moved its `updated_at`, from which the pending bound counts, so a run sent often enough never waited too
    long. A send now leaves it, and the end is judged under the run's lock as a turn's is: a run a worker
    claimed meanwhile is left alone. The workers are stopped meanwhile: their sweeps would send these runs."""
    from datetime import UTC, datetime, timedelta

    from app.db import transaction
    from app.debug_run_state import claim_debug_run
    from app.models import DebugRun
    from app.outbox import leave_for_recovery
    from app.recovery import _claim_send
    from app.run_kinds import DEBUG_RUN
    from app.unheld_ends import abandon_debug_run

    agent_id = world.agent(world.model())

    def start_run(content: str) -> int:
        return world.api.post(f"/api/admin/agents/{agent_id}/debug/execute", world.admin_key,
                              {"content": content}).json["debug_log_id"]

    def marks(run_id: int) -> tuple[datetime | None, datetime]:
        with transaction() as session:
            run = session.get_one(DebugRun, run_id)
            return run.enqueued_at, run.updated_at

    def status(run_id: int) -> str:
        return world.api.get(f"/api/admin/debug-logs/{run_id}", world.admin_key).json["status"]

    workers.stop_all()
    try:
        run_id = start_run("not yet")
        unsent, accepted_at = marks(run_id)
        assert unsent is None  # its send failed
        resent_at = _claim_send(DEBUG_RUN, run_id, None)
        assert resent_at is not None
        assert marks(run_id) == (resent_at, accepted_at)
        leave_for_recovery(DEBUG_RUN, run_id)  # that send failed too
        assert marks(run_id) == (None, accepted_at)

        assert abandon_debug_run(run_id, "waited too long", pending_before=accepted_at) is None
        assert status(run_id) == "pending"
        assert abandon_debug_run(run_id, "waited too long",
                           pending_before=accepted_at + timedelta(microseconds=1)) is TurnStatus.ERROR
        ended = world.api.get(f"/api/admin/debug-logs/{run_id}", world.admin_key).json
        assert (ended["status"], ended["error_message"]) == ("error", "waited too long")

        claimed_id = start_run("claimed meanwhile")
        with transaction() as session:
            assert claim_debug_run(session, claimed_id, 30).acquired
        later = datetime.now(UTC) + timedelta(minutes=1)
        assert abandon_debug_run(claimed_id, "waited too long", pending_before=later) is None
        assert status(claimed_id) == "processing"
    finally:
        workers.start()


def test_an_idempotency_key_is_one_users_own(world: World) -> None:
    """Two users' clients make their keys alike (a counter, a hash of the text): each user's key names only their
    own turn, and another user's is neither answered with it nor refused as reused."""
    agent_id = world.agent(world.model())
    (_, alice), (_, bob) = world.user("alice"), world.user("bob")
    headers = {"Idempotency-Key": "message-1"}
    theirs = [world.send(k, world.conversation(k, agent_id), "hello", headers=headers) for k in (alice, bob)]
    assert [r.status_code for r in theirs] == [202, 202], theirs[1].json
    assert theirs[0].json["assistant_message"]["id"] != theirs[1].json["assistant_message"]["id"]
    assert theirs[0].json["assistant_message"]["conversation_id"] != theirs[1].json["assistant_message"][
        "conversation_id"]


def test_an_idempotency_key_belongs_to_one_conversation_and_one_message(world: World) -> None:
    agent_id = world.agent(world.model())
    _, key = world.user()
    first, second = world.conversation(key, agent_id, project_id=1), world.conversation(key, agent_id, project_id=2)
    headers = {"Idempotency-Key": "only-once"}
    assert world.send(key, first, "hello", headers=headers).status_code == 202
    reused = world.send(key, second, "hello", headers=headers)
    assert reused.status_code == 422
    assert reused.json["error"]["code"] == "idempotency_key_reused"
    assert world.send(key, 999999, "hello", headers=headers).status_code == 404
    assert world.api.get(f"/api/conversations/{second}/messages", key).json["items"] == []
    # ...and to one message: other content under the same key would be answered with the first turn and lost.
    other = world.send(key, first, "something else", headers=headers)
    assert (other.status_code, other.json["error"]["code"]) == (422, "idempotency_key_reused")
    items = world.api.get(f"/api/conversations/{first}/messages", key).json["items"]
    assert [m["content"] for m in items if m["role"] == "user"] == ["hello"]


def test_the_ledger_is_paged_newest_first(world: World) -> None:
    user_id, key = world.user(balance="1")
    for amount in ("2", "3", "4"):
        world.api.post(f"/api/admin/users/{user_id}/credits", world.admin_key, {"amount": amount})
    page = world.api.get("/api/me/transactions?limit=3", key).json
    assert [t["amount"] for t in page["items"]] == ["4.000000", "3.000000", "2.000000"]
    rest = world.api.get(f"/api/me/transactions?limit=3&cursor={page['next_cursor']}", key).json
    assert [t["amount"] for t in rest["items"]] == ["1.000000"]
    assert rest["next_cursor"] is None


def test_the_ledger_without_a_limit_is_the_whole_ledger(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """The contract's `GET /api/me/transactions` has no paging: without `limit` every row comes back, newest
    first, read a page at a time (pages of 7 here, so the reading crosses several of them)."""
    import app.users

    monkeypatch.setattr(app.users, "PAGE_OF_A_WHOLE_LIST", 7)
    user_id, key = world.user(balance="1")
    for amount in range(2, 120):
        world.api.post(f"/api/admin/users/{user_id}/credits", world.admin_key, {"amount": str(amount)})
    listed = world.api.get("/api/me/transactions", key).json
    assert list(listed) == ["items"]
    assert [t["amount"] for t in listed["items"]] == [f"{amount}.000000" for amount in range(119, 0, -1)]
    assert world.api.get("/api/me", key).json["balance"] == f"{sum(range(1, 120))}.000000"


def test_taking_credit_back_during_a_turn_leaves_what_the_turn_holds_and_the_turn_pays_in_full(
        world: World, upstream: UpstreamLog) -> None:
    """An admin takes credit back while a turn streams: the take-back stops at the turn's reservation (the
    answer was priced against it), and the turn is charged its whole cost, not what the take-back left."""
    model_id = world.model(upstream="echo;ttft=4;words=50", price_in="1.000000", price_out="10.000000")
    agent_id = world.agent(model_id, max_tokens=60)
    user_id, key = world.user(balance="1")
    conversation_id = world.conversation(key, agent_id)
    assistant = world.send(key, conversation_id, "hello").json["assistant_message"]
    wait_for(lambda: world.message(key, assistant["id"])["status"] == "processing", what="the turn to start")
    reserved = Decimal(1) - Decimal(world.api.get("/api/me", key).json["available_balance"])
    assert reserved == Decimal("0.645")  # a prompt of at most 45 tokens (its bytes) at 1 a thousand, 60 at 10
    taken = world.api.post(f"/api/admin/users/{user_id}/credits", world.admin_key, {"amount": "-0.9"})
    assert taken.json == {"balance": f"{reserved:.6f}", "credited": f"-{1 - reserved:.6f}"}

    done = world.wait_terminal(key, assistant["id"])
    assert done["status"] == "success"
    cost = Decimal(done["cost"])
    assert cost == Decimal("0.507")  # 7 prompt tokens at 1 a thousand and 50 words at 10
    me = world.api.get("/api/me", key).json
    assert (me["balance"], me["available_balance"]) == (f"{reserved - cost:.6f}", f"{reserved - cost:.6f}")
    ledger = world.api.get("/api/me/transactions", key).json["items"]
    assert [(t["message_id"], t["amount"], t["balance_after"]) for t in ledger] == [
        (assistant["id"], f"-{cost:.6f}", f"{reserved - cost:.6f}"),
        (None, f"-{1 - reserved:.6f}", f"{reserved:.6f}"), (None, "1.000000", "1.000000")]


def test_recent_failures_count_each_failed_status_and_list_the_latest(world: World, upstream: UpstreamLog) -> None:
    """What the operators' page polls: every terminal status but success counted since the window's start,
    and the latest ones listed, newest first, up to `limit`."""
    agent_id = world.agent(world.model())
    _, rich = world.user("rich", balance="10")
    _, broke = world.user("broke", balance="0")
    ended = []
    for key, content in ((rich, "hello"), (rich, "a forbidden-word here"), (broke, "hello")):
        accepted = world.send(key, world.conversation(key, agent_id), content)
        assert accepted.status_code == 202, accepted.json
        ended.append(world.wait_terminal(key, accepted.json["assistant_message"]["id"]))
    assert [m["status"] for m in ended] == ["success", "content_violation", "insufficient_balance"]

    report = world.api.get("/api/admin/failures?limit=1", world.admin_key)
    assert report.status_code == 200, report.json
    assert report.json["counts"] == {"error": 0, "insufficient_balance": 1, "content_violation": 1, "llm_error": 0,
                                     "cancelled": 0}
    assert [(i["message_id"], i["status"]) for i in report.json["items"]] == [(ended[2]["id"], "insufficient_balance")]
    assert report.json["items"][0]["conversation_id"] == ended[2]["conversation_id"]
    both = world.api.get("/api/admin/failures?limit=5", world.admin_key).json["items"]
    assert [i["message_id"] for i in both] == [ended[2]["id"], ended[1]["id"]]
    assert both[1]["error_message"] == "moderation: blocked term 'forbidden-word'"
    assert world.api.get("/api/admin/failures", rich).status_code == 403
    assert world.api.get("/api/admin/failures?limit=0", world.admin_key).status_code == 422
