"""Crash recovery, shutdown, waking an idle worker and observability, on services of this module's own
(see tests/stack.py).

Each test starts the real `agentq worker` processes it needs against a private database, Redis
server and metrics directory, served by a real `agentq web` (two gunicorn workers), and kills,
stops or restarts them. Leases are 3 s and the recovery sweep runs every second (tests/conftest.py),
so the bounds asserted here are those settings' bounds plus scheduling slack.
"""

from __future__ import annotations

import json
import os
import random
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from app.deliveries import SETTLEMENT_RESERVE_SECONDS
from app.live_stream import attempt_number
from app.money import token_cost
from app.token_estimates import estimate_tokens, estimate_tokens_of_messages
from tests.conftest import UpstreamLog
from tests.stack import RedisServer, SharedRedis, Stack, drop_database, scratch_database, stack_on_shared_redis
from tests.support import Process, TcpRelay, read_sse, refusing, visible_text, wait_for

LEASE_SECONDS = 3.0
RECOVERY_INTERVAL = 1.0


@pytest.fixture(scope="module")
def stack(mock_upstream: Process) -> Iterator[Stack]:
    name = scratch_database("agentq_recovery")
    redis = RedisServer("recovery-redis").start()
    services = Stack("recovery", f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}", redis,
                     AGENTQ_LOG_JSON="true").init()
    services.start_web()
    yield services
    services.stop()
    redis.kill()
    drop_database(name)


@pytest.fixture(autouse=True)
def _own_workers(stack: Stack) -> Iterator[None]:
    """Every test starts the workers it needs; none outlives it."""
    yield
    for process in stack.workers:
        process.kill_group()
    stack.workers.clear()


def private_redis(stack: Stack) -> RedisServer:
    """This module's services run on a Redis server of their own, which a test may stop and start."""
    assert isinstance(stack.redis, RedisServer)
    return stack.redis


def log_records(process: Process) -> list[dict[str, Any]]:
    return [json.loads(line) for line in process.output().splitlines() if line.strip()]


def claims_of(process: Process, turn_id: int) -> list[dict[str, Any]]:
    """The log lines in which a worker process claimed or took over the turn."""
    return [r for r in log_records(process)
            if r.get("turn_id") == turn_id and ("claimed" in r["message"] or "taken_over" in r["message"])]


def ended_test_run(stack: Stack, run_id: int) -> dict[str, Any] | None:
    """The admin test run's log once it has ended, else None."""
    log = stack.call("GET", f"/api/admin/debug-logs/{run_id}").json()
    return log if log["status"] not in ("pending", "processing") else None


def deliveries(stack: Stack, turn_id: int) -> int:
    return stack.sql("SELECT deliveries FROM turns WHERE assistant_message_id = %(id)s", {"id": turn_id})[0][0]


def charges(stack: Stack, turn_id: int) -> int:
    """How many charges the turn's user paid for it, each checked on the way: the turn's cost, which is the cost
    of the call that answered (or was stopped and paid for) as its attempt's record says, priced at that
    model's prices in the turn's agent; so a charge of the wrong amount (an interrupted call's added, the
    reservation taken whole) fails the caller's count."""
    amounts = [amount for (amount,) in stack.sql(
        "SELECT amount FROM credit_transactions WHERE message_id = %(id)s", {"id": turn_id})]
    if amounts:
        (cost,), = stack.sql("SELECT cost FROM conversation_messages WHERE id = %(id)s", {"id": turn_id})
        (paid, prompt, completion, model), = stack.sql(
            "SELECT cost, prompt_tokens, completion_tokens, model_name FROM model_attempts WHERE message_id = %(id)s "
            "AND outcome IN ('success', 'cancelled') ORDER BY id DESC LIMIT 1", {"id": turn_id})
        (price_in, price_out), = stack.sql(
            "SELECT l.input_price_per_1k, l.output_price_per_1k FROM conversation_messages m "
            "JOIN conversations c ON c.id = m.conversation_id JOIN agents a ON a.id = c.agent_id "
            "JOIN llm_models l ON l.id IN (a.model_id, a.fallback_model_id) AND l.name = %(model)s "
            "WHERE m.id = %(id)s", {"id": turn_id, "model": model})
        assert (amounts, cost, paid) == ([-cost], token_cost(prompt, completion, price_in, price_out), cost), turn_id
    return len(amounts)


def streamed_by(stack: Stack, turn_id: int, attempt: int) -> str:
    """The text attempt number `attempt` has streamed to the turn's readers so far (its live stream's deltas)."""
    entries = stack.redis.client().xrange(f"{stack.key_prefix}:turn:{turn_id}:stream")
    return "".join(fields[b"data"].decode() for _, fields in entries
                   if fields[b"type"] == b"delta" and fields.get(b"a") == str(attempt).encode())


def slow_agent(stack: Stack, name: str, upstream: str, **extra: Any) -> int:
    return stack.agent(stack.model(name, upstream), **extra)


def follow_from_the_start(stack: Stack, key: str, turn_id: int) -> tuple[str, list[Any], threading.Thread]:
    """What a reader saw of a turn's first words (five events), and a reader following it from the start to its
    end in a thread of its own (its events land in the list)."""
    url = f"{stack.base_url}/api/messages/{turn_id}/stream"
    seen = visible_text(read_sse(url, key, stop_after=5))
    events: list[Any] = []
    following = threading.Thread(target=lambda: events.extend(read_sse(url, key)), daemon=True)
    following.start()
    return seen, events, following


def test_a_turn_whose_worker_is_killed_is_taken_over_by_another_within_the_lease(stack: Stack,
                                                                                upstream: UpstreamLog) -> None:
    """The killed worker had switched to the fallback (its primary answered 503): the delivery that takes the
    turn over goes on with the fallback (the run's mark says it switched). The new
    call repeats the words the dead one streamed, so a reader following from the start is sent them once: its
    deltas concatenate to the answer, with no `restart` (the contract's guarantee, kept through a takeover)."""
    first, second = stack.start_worker(restart=False, wait=False), stack.start_worker(restart=False, wait=False)
    stack.wait_ready(first)
    stack.wait_ready(second)
    failing, slow = "echo;fail=503", "echo;words=30;gap=0.1"
    agent_id = stack.agent(stack.model("fails-at-once", failing), stack.model("slow-kill", slow))
    _, key = stack.user("kill-victim")
    turn = stack.send(key, stack.conversation(key, agent_id), "survive this")
    stack.wait_status(key, turn["id"], ("processing",))

    owner = wait_for(lambda: [(p, r["process"]) for p in (first, second) for r in claims_of(p, turn["id"])],
                     what="the claim's log line")
    assert len(owner) == 1
    wait_for(lambda: upstream.models() == [failing, slow], what="the fallback's call")
    wait_for(lambda: len(streamed_by(stack, turn["id"], 101)) > 3, what="the fallback's first words")
    reader_events: list[Any] = []
    reader = threading.Thread(target=lambda: reader_events.extend(
        read_sse(f"{stack.base_url}/api/messages/{turn['id']}/stream", key)), daemon=True)
    reader.start()
    victim_group, victim_pid = owner[0]
    survivor = second if victim_group is first else first
    assert victim_pid in victim_group.children()
    os.kill(victim_pid, signal.SIGKILL)
    killed_at = time.monotonic()
    streamed = streamed_by(stack, turn["id"], 101)

    takeover = wait_for(lambda: claims_of(survivor, turn["id"]), timeout=LEASE_SECONDS + 4 * RECOVERY_INTERVAL + 3,
                        interval=0.05, what="another worker to take the turn over")
    taken_after = time.monotonic() - killed_at
    assert "taken_over" in takeover[0]["message"]
    done = stack.wait_terminal(key, turn["id"])
    assert (done["status"], done["model"]) == ("success", "slow-kill")
    assert done["content"] == " ".join(f"w{i}" for i in range(30))
    reader.join(timeout=30)
    assert reader_events and reader_events[-1].event == "done"
    assert not any(e.event == "status" and e.json().get("restart") for e in reader_events)
    assert "".join(e.json()["text"] for e in reader_events if e.event == "delta") == done["content"]
    assert (deliveries(stack, turn["id"]), charges(stack, turn["id"])) == (2, 1)
    assert upstream.models() == [failing, slow, slow]
    # The killed delivery's fallback call, which its readers were streamed, is recorded by the delivery that
    # took over (estimated: the prompt as the reservation prices it, the text streamed); its primary's 503,
    # which streamed nothing, is not. The provider bills the call the worker died in.
    prompt = estimate_tokens_of_messages(upstream.requests()[1]["body"]["messages"])
    completion = estimate_tokens(streamed)
    assert stack.sql("SELECT delivery, model_name, outcome, prompt_tokens, completion_tokens, cost "
                     "FROM model_attempts WHERE message_id = %(id)s ORDER BY delivery, id", {"id": turn["id"]})[0] == (
        1, "slow-kill", "interrupted", prompt, completion, token_cost(prompt, completion, Decimal("0.001"),
                                                                     Decimal("0.002")))
    assert stack.sql("SELECT delivery, model_name, outcome FROM model_attempts WHERE message_id = %(id)s "
                     "ORDER BY delivery, id", {"id": turn["id"]}) == [
        (1, "slow-kill", "interrupted"), (2, "slow-kill", "success")]
    assert taken_after <= LEASE_SECONDS + 2 * RECOVERY_INTERVAL + 3  # a loaded host's claim and log reads on top
    print(f"\ntakeover {taken_after:.2f}s after SIGKILL (lease {LEASE_SECONDS}s, sweep {RECOVERY_INTERVAL}s)")
    wait_for(lambda: victim_group.popen is not None and victim_group.popen.poll() is not None,
             what="the killed worker's parent to exit")


def test_a_dead_workers_turn_is_taken_over_once_it_left_the_list_not_when_its_lease_runs_out(
        stack: Stack, upstream: UpstreamLog) -> None:
    """With the default 30 s lease: the killed worker leaves the workers' list within its presence's time to live,
    and the survivor's sweep ends its lease once it has gone two renewal periods (20 s) unrenewed, a third of a lease
    before it would have run out; the delivery that takes the turn over records the dead call as `interrupted`
    (its lease's token kept) and answers, charged once."""
    first, second = (stack.start_worker(restart=False, wait=False, AGENTQ_LEASE_SECONDS="30"),
                     stack.start_worker(restart=False, wait=False, AGENTQ_LEASE_SECONDS="30"))
    stack.wait_ready(first)
    stack.wait_ready(second)
    slow = "echo;words=30;gap=0.1"
    _, key = stack.user("left-the-list")
    turn = stack.send(key, stack.conversation(key, slow_agent(stack, "slow-left", slow)), "outlive your worker")
    owner = wait_for(lambda: [(p, r["process"]) for p in (first, second) for r in claims_of(p, turn["id"])],
                     what="the claim's log line")
    wait_for(lambda: len(streamed_by(stack, turn["id"], 100).split()) >= 3, what="the first words")
    victim_group, victim_pid = owner[0]
    survivor = second if victim_group is first else first
    os.kill(victim_pid, signal.SIGKILL)
    killed_at = time.monotonic()
    (lease_left,), = stack.sql("SELECT EXTRACT(EPOCH FROM lease_expires_at - now()) FROM turns "
                               "WHERE assistant_message_id = %(id)s", {"id": turn["id"]})

    takeover = wait_for(lambda: claims_of(survivor, turn["id"]), timeout=40, interval=0.1,
                        what="the survivor to take the turn over")
    taken_after = time.monotonic() - killed_at
    assert "taken_over" in takeover[0]["message"]
    # 20 s after the claim (its last renewal) and a sweep; before the lease would have run out
    assert taken_after < float(lease_left) - 3, f"taken over {taken_after:.1f}s after the kill, lease left {lease_left}"
    done = stack.wait_terminal(key, turn["id"])
    assert (done["status"], done["content"]) == ("success", " ".join(f"w{i}" for i in range(30)))
    assert (deliveries(stack, turn["id"]), charges(stack, turn["id"])) == (2, 1)
    assert stack.sql("SELECT delivery, outcome FROM model_attempts WHERE message_id = %(id)s ORDER BY delivery, id",
                     {"id": turn["id"]}) == [(1, "interrupted"), (2, "success")]
    # This turn's calls: over its 20 s, a session worker may send another test's run the mock logs too
    assert [r["body"]["model"] for r in upstream.requests()
            if r["body"]["messages"][-1]["content"] == "outlive your worker"] == [slow, slow]
    print(f"\ntakeover {taken_after:.2f}s after SIGKILL, {float(lease_left):.1f}s of the dead lease left then")


def test_a_stop_of_a_turn_whose_killed_worker_left_the_list_and_went_silent_is_answered_cancelled() -> None:
    """With the default 30 s lease and no worker left: a stop of a turn whose worker was SIGKILLed was answered
    `processing`, and the turn stayed so until a lease after its lease ran out. Once the worker has left the
    workers' list and its lease has gone 20 s unrenewed, the stop's own answer is the turn `cancelled`, with the
    text the dead worker streamed, unpaid, its call recorded as `interrupted`."""
    with stack_on_shared_redis("gone-stop", AGENTQ_LEASE_SECONDS="30") as stack:
        stack.init().start_web()
        worker = stack.start_worker(restart=False)
        _, key = stack.user("stopped-after-its-worker")
        agent_id = slow_agent(stack, "gone-stop-model", "echo;words=60;gap=0.1")
        turn = stack.send(key, stack.conversation(key, agent_id), "stop me once my worker is gone")
        wait_for(lambda: len(streamed_by(stack, turn["id"], 100).split()) >= 3, what="the first words")
        worker.kill_group()
        streamed = streamed_by(stack, turn["id"], 100)
        wait_for(lambda: stack.sql("SELECT lease_expires_at < now() + interval '10 seconds' FROM turns "
                                   "WHERE assistant_message_id = %(id)s", {"id": turn["id"]}) == [(True,)],
                 timeout=40, interval=0.2, what="the dead worker's lease to go 20 s unrenewed")

        stopped = stack.call("POST", f"/api/messages/{turn['id']}/cancel", key)
        assert stopped.status_code == 202
        assert (stopped.json()["status"], stopped.json()["content"], charges(stack, turn["id"])) == (
            "cancelled", streamed, 0)
        assert stack.sql("SELECT delivery, outcome FROM model_attempts WHERE message_id = %(id)s",
                         {"id": turn["id"]}) == [(1, "interrupted")]


def test_a_turn_taken_over_from_a_dead_worker_runs_as_things_stand_at_the_takeover(stack: Stack) -> None:
    """Two turns in the hands of a worker that is killed (one kill, one takeover, for both cases).

    One is stopped while its worker is dead: the delivery that took it over ended it `cancelled` with no
    text, though the dead worker had streamed part of the answer to readers; a stop keeps the text so far
    (unpaid: that call died unrecorded with its worker); its agent is given another model meanwhile, and the
    text is still named as the model that wrote it (it was named as the agent's new model). The other's agent
    grows dearer meanwhile (a larger answer limit): the delivery that took it over kept the dead worker's
    reservation without pricing it again, and ran (and charged) past what its user could cover. A third's user
    has exactly its worst case: the takeover holds only what that grew by since (nothing), not the whole of it
    again on top of the dead worker's hold, which that user cannot cover, and it answers, charged once."""
    stopped_agent = slow_agent(stack, "dies-then-stopped", "echo;words=60;gap=0.1")
    dearer_agent = stack.agent(stack.model("grows-dearer", "echo;words=60;gap=0.1", input_price_per_1k="0",
                                           output_price_per_1k="1"), max_tokens=10)
    _, key = stack.user("stopped-orphan")
    poor_id, poor = stack.user("priced-again", balance="1")
    exact_agent = stack.agent(stack.model("as-it-was", "echo;words=60;gap=0.1", input_price_per_1k="0",
                                          output_price_per_1k="1"), max_tokens=10)
    exact_id, exact = stack.user("exactly-the-worst-case", balance="0.01")
    worker = stack.start_worker(restart=False)
    stopped = stack.send(key, stack.conversation(key, stopped_agent), "keep what you said")
    dearer = stack.send(poor, stack.conversation(poor, dearer_agent), "hello")
    covered = stack.send(exact, stack.conversation(exact, exact_agent), "hello")
    url = f"{stack.base_url}/api/messages/{stopped['id']}/stream"
    seen, following_events, following = follow_from_the_start(stack, key, stopped["id"])
    for user, turn in ((poor, dearer), (exact, covered)):
        stack.wait_status(user, turn["id"], ("processing",))
    assert stack.sql("SELECT id, reserved FROM users WHERE id IN (%(poor)s, %(exact)s) ORDER BY id",
                     {"poor": poor_id, "exact": exact_id}) == [(poor_id, Decimal("0.01")), (exact_id, Decimal("0.01"))]
    worker.kill_group()
    assert stack.call("POST", f"/api/messages/{stopped['id']}/cancel", key).status_code == 202
    # The stopped turn is held out of reach (a lease far ahead) until a worker runs: a worker slow to boot (a busy
    # host) left the API's look for stops no delivery carries out (`app.stop_bound`) to end it first.
    lease_of_stopped = "UPDATE turns SET lease_expires_at = {} WHERE assistant_message_id = %(id)s"
    stack.sql(lease_of_stopped.format("now() + interval '1 hour'"), {"id": stopped["id"]})
    assert stack.call("PATCH", f"/api/admin/agents/{dearer_agent}", json={"max_tokens": 100000}).status_code == 200
    replacement = stack.model("replaces-dies-then-stopped", "echo")
    assert stack.call("PATCH", f"/api/admin/agents/{stopped_agent}", json={"model_id": replacement}).status_code == 200
    stack.start_worker()
    stack.sql(lease_of_stopped.format("now()"), {"id": stopped["id"]})

    done = stack.wait_terminal(key, stopped["id"], timeout=LEASE_SECONDS + 3 * RECOVERY_INTERVAL + 15)
    whole = " ".join(f"w{i}" for i in range(60))
    assert (done["status"], done["cost"], done["model"], done["content"].startswith(seen),
            whole.startswith(done["content"])) == ("cancelled", "0.000000", "dies-then-stopped", True, True), done
    assert visible_text(read_sse(url, key)) == done["content"]  # a reader from the start gets the same text
    # A reader following it live through the takeover is sent that text once: the stored answer is the text
    # the dead worker streamed, so no restart voids it (there was one, and the whole text again, before the
    # end moved readers to the attempt the stored answer is named by).
    following.join(timeout=30)
    assert following_events and following_events[-1].event == "done"
    assert not any(e.event == "status" and e.json().get("restart") for e in following_events)
    assert "".join(e.json()["text"] for e in following_events if e.event == "delta") == done["content"]
    assert (deliveries(stack, stopped["id"]), charges(stack, stopped["id"])) == (2, 0)

    done = stack.wait_terminal(poor, dearer["id"], timeout=15)
    assert (done["status"], done["cost"]) == ("insufficient_balance", None), done
    assert stack.sql("SELECT balance, reserved FROM users WHERE id = %(id)s", {"id": poor_id}) == [
        (Decimal("1"), Decimal("0"))]
    assert (deliveries(stack, dearer["id"]), charges(stack, dearer["id"])) == (2, 0)

    done = stack.wait_terminal(exact, covered["id"], timeout=15)
    assert (done["status"], done["completion_tokens"], done["cost"]) == ("success", 10, "0.010000"), done
    assert stack.sql("SELECT balance, reserved FROM users WHERE id = %(id)s", {"id": exact_id}) == [
        (Decimal("0"), Decimal("0"))]
    assert (deliveries(stack, covered["id"]), charges(stack, covered["id"])) == (2, 1)


def wait_for_its_lease_to_run_out(stack: Stack, turn_id: int) -> None:
    wait_for(lambda: stack.sql("SELECT lease_expires_at < now() FROM turns WHERE assistant_message_id = %(id)s",
                               {"id": turn_id}) == [(True,)], timeout=LEASE_SECONDS + 5,
             what="the dead worker's lease to run out")


def _streamed_then_its_worker_killed(stack: Stack, model: str) -> tuple[int, str, int, dict[str, Any],
                                                                       tuple[str, list[Any], threading.Thread]]:
    """A user's turn of a slow model of its own, followed from the start by a reader, whose only worker is killed
    mid-answer: the user's id and key, the conversation, the turn, and the reader (`follow_from_the_start`)."""
    agent_id = slow_agent(stack, model, "echo;words=60;gap=0.1")
    user_id, key = stack.user(f"user-of-{model}")
    worker = stack.start_worker(restart=False)
    conversation_id = stack.conversation(key, agent_id)
    turn = stack.send(key, conversation_id, "stop me as my worker dies")
    reader = follow_from_the_start(stack, key, turn["id"])
    worker.kill_group()
    return user_id, key, conversation_id, turn, reader


def test_a_stop_of_a_turn_whose_worker_died_a_lease_ago_ends_it_at_once_though_no_worker_runs(stack: Stack) -> None:
    """A stop only flagged a processing turn for its worker: one whose worker had died stayed `processing`, its
    conversation busy, until another worker took it over, which with none running was the deadline bound's
    end, minutes later. No delivery holding it (the dead one's lease ran out), the stop ends it `cancelled`
    at once, keeping the text the dead worker streamed, unpaid, and recording its call, as a takeover's stop
    does."""
    user_id, key, conversation_id, turn, (seen, following_events, following) = _streamed_then_its_worker_killed(
        stack, "dies-unheld")
    wait_for_its_lease_to_run_out(stack, turn["id"])
    stopped = stack.call("POST", f"/api/messages/{turn['id']}/cancel", key)
    assert stopped.status_code == 202
    done = stopped.json()
    assert (done["status"], done["cost"], done["model"], done["content"].startswith(seen),
            " ".join(f"w{i}" for i in range(60)).startswith(done["content"])) == (
        "cancelled", "0.000000", "dies-unheld", True, True), done
    following.join(timeout=30)
    assert following_events and following_events[-1].event == "done"
    assert "".join(e.json()["text"] for e in following_events if e.event == "delta") == done["content"]
    assert (deliveries(stack, turn["id"]), charges(stack, turn["id"])) == (1, 0)
    assert stack.sql("SELECT reserved FROM users WHERE id = %(id)s", {"id": user_id}) == [(Decimal(0),)]
    # The dead worker's call, which its provider bills, is recorded as a takeover records it (it was not).
    recorded = stack.sql("SELECT delivery, model_name, outcome, completion_tokens FROM model_attempts "
                         "WHERE message_id = %(id)s", {"id": turn["id"]})
    assert [row[:3] for row in recorded] == [(1, "dies-unheld", "interrupted")]
    assert recorded[0][3] == estimate_tokens(done["content"])  # the text it streamed, as a takeover estimates it
    following_turn = stack.send(key, conversation_id, "the conversation is free")  # 202, not 409 conversation_busy
    assert stack.call("POST", f"/api/messages/{following_turn['id']}/cancel", key).json()["status"] == "cancelled"


def test_a_call_whose_worker_died_waiting_for_its_first_token_is_recorded_at_its_prompts_estimate(
        stack: Stack, upstream: UpstreamLog) -> None:
    """The provider received the request, and may bill its prompt, but the call streamed nothing before its worker
    died: it was left in no record (the stream could not tell it was made). Its `status` entry, written as the call
    starts, names its model: the end of the turn (here a stop, no worker running) records it as `interrupted`, its
    prompt estimated, no answer tokens."""
    name, waits = "dies-before-its-first-token", "echo;ttft=60"
    agent_id = slow_agent(stack, name, waits)
    _, key = stack.user("user-of-a-silent-call")
    worker = stack.start_worker(restart=False)
    turn = stack.send(key, stack.conversation(key, agent_id), "answer me slowly")
    wait_for(lambda: waits in upstream.models(), what="the call to reach the upstream")
    worker.kill_group()
    wait_for_its_lease_to_run_out(stack, turn["id"])
    stopped = stack.call("POST", f"/api/messages/{turn['id']}/cancel", key)
    assert (stopped.status_code, stopped.json()["status"], stopped.json()["content"]) == (202, "cancelled", "")
    prompt = estimate_tokens_of_messages(next(r for r in upstream.requests() if r["body"]["model"] == waits)
                                         ["body"]["messages"])
    recorded = stack.sql("SELECT delivery, model_name, outcome, prompt_tokens, completion_tokens, first_token_ms, "
                         "cost, error FROM model_attempts WHERE message_id = %(id)s", {"id": turn["id"]})
    assert [row[:7] for row in recorded] == [
        (1, name, "interrupted", prompt, 0, None, token_cost(prompt, 0, Decimal("0.001"), Decimal("0.002")))]
    assert "before the call streamed text to its readers" in recorded[0][7]
    assert charges(stack, turn["id"]) == 0


def test_a_stop_that_came_while_a_dead_workers_lease_still_held_ends_once_it_runs_out_though_no_worker_runs(
        stack: Stack) -> None:
    """A stop that came just after the worker died (its lease still live) was flagged for the delivery that would
    take the turn over; with no worker running none did, and the turn stayed `processing`, its conversation
    busy, until the deadline bound: its timeout, grace and a lease after its first delivery (an hour for an
    agent of 3,600 s). The API's loop ends it once the lease has run out (`app.stop_bound`), as the stop would
    have, keeping the dead worker's text, unpaid."""
    user_id, key, conversation_id, turn, (seen, following_events, following) = _streamed_then_its_worker_killed(
        stack, "dies-then-stopped-in-its-lease")
    assert stack.call("POST", f"/api/messages/{turn['id']}/cancel", key).status_code == 202
    assert stack.sql("SELECT lease_expires_at > cancel_requested_at FROM turns WHERE assistant_message_id = %(id)s",
                     {"id": turn["id"]}) == [(True,)]  # the stop came under the dead worker's live lease
    done = stack.wait_terminal(key, turn["id"], timeout=2 * LEASE_SECONDS + 3 * RECOVERY_INTERVAL + 10)
    assert (done["status"], done["cost"], done["model"], done["content"].startswith(seen),
            " ".join(f"w{i}" for i in range(60)).startswith(done["content"])) == (
        "cancelled", "0.000000", "dies-then-stopped-in-its-lease", True, True), done
    assert stack.sql("SELECT m.updated_at < t.deadline_at - interval '60 seconds' FROM turns t "
                     "JOIN conversation_messages m ON m.id = t.assistant_message_id "
                     "WHERE t.assistant_message_id = %(id)s",
                     {"id": turn["id"]}) == [(True,)]  # not the deadline bound's end
    following.join(timeout=30)
    assert following_events and following_events[-1].event == "done"
    assert "".join(e.json()["text"] for e in following_events if e.event == "delta") == done["content"]
    assert (deliveries(stack, turn["id"]), charges(stack, turn["id"])) == (1, 0)
    assert stack.sql("SELECT reserved FROM users WHERE id = %(id)s", {"id": user_id}) == [(Decimal(0),)]
    following_turn = stack.send(key, conversation_id, "the conversation is free")  # 202, not 409 conversation_busy
    assert stack.call("POST", f"/api/messages/{following_turn['id']}/cancel", key).json()["status"] == "cancelled"


def test_a_takeover_whose_model_answers_otherwise_goes_on_after_the_text_its_readers_hold(stack: Stack) -> None:
    """A worker is killed mid-answer, and its agent is given another model before the takeover, whose answer
    departs from the dead worker's words: a reader following through the takeover keeps those words and is
    sent the new answer after them, a paragraph on, and its deltas concatenate to the stored content, as the
    contract says. The takeover sent a `restart` and stored the new answer alone. Its own call is charged. Once
    the live stream is gone (its expiry a minute after the end), a reader resuming from the dead worker's words is
    sent the rest of the stored answer: it was sent a `restart` and the whole answer again."""
    agent_id = slow_agent(stack, "dies-mid-answer", "echo;words=60;gap=0.1")
    _, key = stack.user("answered-otherwise")
    worker = stack.start_worker(restart=False)
    turn = stack.send(key, stack.conversation(key, agent_id), "say it twice")
    url = f"{stack.base_url}/api/messages/{turn['id']}/stream"
    seen, following_events, following = follow_from_the_start(stack, key, turn["id"])
    worker.kill_group()
    other = stack.model("answers-otherwise", "echo;words=5;word=v")
    assert stack.call("PATCH", f"/api/admin/agents/{agent_id}", json={"model_id": other}).status_code == 200
    stack.start_worker()
    done = stack.wait_terminal(key, turn["id"], timeout=LEASE_SECONDS + 3 * RECOVERY_INTERVAL + 15)
    held, separator, answer = done["content"].partition("\n\n")
    assert (done["status"], done["model"], separator, answer) == ("success", "answers-otherwise", "\n\n",
                                                                  "v0 v1 v2 v3 v4"), done
    assert held.startswith(seen) and " ".join(f"w{i}" for i in range(60)).startswith(held)
    following.join(timeout=30)
    assert following_events and following_events[-1].event == "done"
    assert not any(e.event == "status" and e.json().get("restart") for e in following_events)
    assert "".join(e.json()["text"] for e in following_events if e.event == "delta") == done["content"]
    assert "".join(e.json()["text"] for e in read_sse(url, key) if e.event == "delta") == done["content"]
    assert (deliveries(stack, turn["id"]), charges(stack, turn["id"])) == (2, 1)
    deltas = [e for e in following_events if e.event == "delta"]
    dead_ones = [i for i, e in enumerate(deltas) if e.id.split(".")[1] == str(attempt_number(1, 0))]
    middle = dead_ones[len(dead_ones) // 2]
    stack.redis.client().delete(f"{stack.key_prefix}:turn:{turn['id']}:stream")  # as its expiry does
    resumed = read_sse(url, key, last_event_id=deltas[middle].id)
    assert not any(e.event == "status" and e.json().get("restart") for e in resumed), [e.data for e in resumed]
    assert "".join(e.json()["text"] for e in deltas[:middle + 1]) + "".join(
        e.json()["text"] for e in resumed if e.event == "delta") == done["content"]


def test_a_stop_while_a_takeover_repeats_an_answer_that_went_on_after_other_text_keeps_it_unpaid(
        stack: Stack) -> None:
    """The first delivery's fallback departed from its primary's words, and its answer went on after them; its
    worker is killed, and the takeover calls the fallback again, which repeats that answer slowly. A stop lands
    while it repeats: the turn keeps all its readers were sent, unpaid. Matched against all they held, the
    repeat's words were taken for text of its own, and the stopped call was charged."""
    agent_id = stack.agent(stack.model("cut-primary", "echo;words=30;gap=0.02;cut_after=6"),
                           stack.model("slow-other", "echo;words=20;gap=2;word=v"))
    _, key = stack.user("stopped-while-repeating")
    worker = stack.start_worker(restart=False)
    turn = stack.send(key, stack.conversation(key, agent_id), "go on")
    wait_for(lambda: len(streamed_by(stack, turn["id"], 101).split()) >= 2, timeout=30,
             what="the fallback's answer after the primary's words")
    worker.kill_group()
    stack.start_worker()

    def takeover_calling() -> bool:
        entries = stack.redis.client().xrange(f"{stack.key_prefix}:turn:{turn['id']}:stream")
        return any(fields[b"type"] == b"status" and fields.get(b"a") == b"200" for _, fields in entries)

    wait_for(takeover_calling, timeout=LEASE_SECONDS + 3 * RECOVERY_INTERVAL + 15, interval=0.05,
             what="the takeover's call of the fallback")
    assert stack.call("POST", f"/api/messages/{turn['id']}/cancel", key).status_code == 202
    done = stack.wait_terminal(key, turn["id"], timeout=30)
    held = "w0 w1 w2 w3 w4 w5" + streamed_by(stack, turn["id"], 101)
    assert (done["status"], done["cost"], done["model"], done["content"]) == (
        "cancelled", "0.000000", "slow-other", held), done
    assert held.startswith("w0 w1 w2 w3 w4 w5\n\nv0 v1")
    assert "".join(e.json()["text"] for e in read_sse(f"{stack.base_url}/api/messages/{turn['id']}/stream", key)
                   if e.event == "delta") == held
    assert (deliveries(stack, turn["id"]), charges(stack, turn["id"])) == (2, 0)


def test_a_turn_stopped_while_its_worker_is_dead_keeps_the_text_it_streamed_when_no_model_call_ends_it(
        stack: Stack) -> None:
    """A stop keeps the text so far. One turn is taken over with no time left for a model call: that delivery
    ended it `error`, which the stop made `cancelled`, with no text. Another is never taken over, and the
    API's look past its deadline ended it `cancelled` with no text either. Both now keep what the dead worker
    streamed, unpaid, and a reader from the start is sent that text and no restart. A third, not stopped, is
    ended `error` by that look: it kept no text, and a reader following it through the end was sent a restart
    (which the end named by a delivery of its own, not the turn's) and its deltas did not make the content."""
    agent_id = slow_agent(stack, "dies-then-ends-late", "echo;words=60;gap=0.1")
    worker = stack.start_worker(restart=False)
    turns = []
    for name in ("taken-over-out-of-time", "never-taken-over", "never-taken-over-nor-stopped"):
        _, key = stack.user(name)
        turn = stack.send(key, stack.conversation(key, agent_id), "keep what you said")
        turns.append((key, turn["id"], *follow_from_the_start(stack, key, turn["id"])))
    worker.kill_group()
    for key, turn_id, *_ in turns[:2]:
        assert stack.call("POST", f"/api/messages/{turn_id}/cancel", key).status_code == 202
    late, unheld, unstopped = turns

    def past(turn_id: int, deadline: str) -> None:
        stack.sql(f"UPDATE turns SET lease_expires_at = now() - interval '1 second', deadline_at = now() + "
                  f"interval '{deadline}' WHERE assistant_message_id = %(id)s", {"id": turn_id})

    def kept_what_was_streamed(key: str, turn_id: int, seen: str, following_events: list[Any],
                               following: threading.Thread, *, stopped: bool = True) -> None:
        done = stack.wait_terminal(key, turn_id, timeout=LEASE_SECONDS + 3 * RECOVERY_INTERVAL + 15)
        whole = " ".join(f"w{i}" for i in range(60))
        assert (done["status"], done["cost"], done["model"], done["content"].startswith(seen),
                whole.startswith(done["content"])) == (
            "cancelled" if stopped else "error", "0.000000" if stopped else None, "dies-then-ends-late", True,
            True), done
        assert (done["error_message"] == "stopped on request") is stopped, done
        for events in (following_events, read_sse(f"{stack.base_url}/api/messages/{turn_id}/stream", key)):
            assert "".join(e.json()["text"] for e in events if e.event == "delta") == done["content"]
            assert not any(e.event == "status" and e.json().get("restart") for e in events)
        following.join(timeout=30)
        assert following_events and following_events[-1].event == "done"
        assert charges(stack, turn_id) == 0

    # The late turn is held out of reach (a lease far ahead) until a worker runs: started after the turn was
    # put past its deadline, a worker slow to boot (a busy host) left the API's look to end it first.
    stack.sql("UPDATE turns SET lease_expires_at = now() + interval '1 hour' WHERE assistant_message_id = %(id)s",
              {"id": late[1]})
    for unheld_turn in (unheld, unstopped):
        past(unheld_turn[1], f"-{LEASE_SECONDS + 1} seconds")  # no worker runs: the API's look ends it
    kept_what_was_streamed(*unheld)
    kept_what_was_streamed(*unstopped, stopped=False)
    assert deliveries(stack, unheld[1]) == deliveries(stack, unstopped[1]) == 1
    stack.start_worker()
    past(late[1], "4 seconds")  # less than the settlement's reserve: no time for a model call
    kept_what_was_streamed(*late)
    assert deliveries(stack, late[1]) == 2
    assert stack.sql("SELECT count(*) FROM users WHERE reserved <> 0") == [(0,)]


def test_a_group_whose_process_is_killed_starts_again_and_finishes_the_dead_processs_turn(stack: Stack) -> None:
    """Each process of the group is a worker of its own to Redis (built by the parent before the fork, the
    broker gave every process one id: a killed process's messages stayed held while its sibling kept the
    id's heartbeat alive)."""
    since_ms = time.time() * 1000
    group = stack.start_worker(processes=2, threads=2)
    heartbeats = f"{stack.key_prefix}-dramatiq:__heartbeats__"
    wait_for(lambda: stack.redis.client().zcount(heartbeats, since_ms, "+inf") == 2,
             what="a heartbeat from each of the group's processes")
    agent_id = slow_agent(stack, "slow-restart", "echo;words=30;gap=0.1")
    _, key = stack.user("restart-victim")
    turn = stack.send(key, stack.conversation(key, agent_id), "survive a restart")
    stack.wait_status(key, turn["id"], ("processing",))
    victim = wait_for(lambda: claims_of(group, turn["id"]), what="the claim's log line")[0]["process"]
    first_processes = group.children()
    assert victim in first_processes
    os.kill(victim, signal.SIGKILL)

    wait_for(lambda: "starting the group again" in group.output(), timeout=30, what="the group to stop and restart")
    wait_for(lambda: group.output().count("Worker process is ready") >= 4, timeout=60, what="the new group to boot")
    assert group.popen is not None and group.popen.poll() is None
    assert len(group.children()) == 2 and not set(group.children()) & set(first_processes)
    done = stack.wait_terminal(key, turn["id"], timeout=LEASE_SECONDS + 4 * RECOVERY_INTERVAL + 30)
    assert done["status"] == "success"
    assert done["content"] == " ".join(f"w{i}" for i in range(30))
    assert (deliveries(stack, turn["id"]), charges(stack, turn["id"])) == (2, 1)
    assert any("taken_over" in r["message"] for r in claims_of(group, turn["id"]))

    group.popen.send_signal(signal.SIGTERM)
    assert group.popen.wait(timeout=30) == 0
    assert group.output().count("starting the group again") == 1


def test_a_turn_accepted_while_redis_is_down_runs_once_redis_is_back(stack: Stack) -> None:
    stack.start_worker()
    agent_id = stack.agent(stack.model("plain-redis", "echo"))
    _, key = stack.user("redis-down")
    conversation_id = stack.conversation(key, agent_id)
    assert stack.http.get("/readyz").status_code == 200

    private_redis(stack).kill()
    unready = stack.http.get("/readyz")
    assert unready.status_code == 503
    assert unready.json()["checks"]["database"] == "ok"
    assert unready.json()["checks"]["redis"].startswith("error")
    turn = stack.send(key, conversation_id, "while redis sleeps")
    assert stack.message(key, turn["id"])["status"] == "pending"
    assert stack.sql("SELECT enqueued_at FROM turns WHERE assistant_message_id = %(id)s", {"id": turn["id"]}) \
        == [(None,)]
    assert stack.web is not None  # its lines about the turn carry the turn's id, as the worker's do
    about = [r for r in log_records(stack.web) if f"({turn['id']})" in r["message"]]
    assert [r.get("turn_id") for r in about] == [turn["id"]], about

    private_redis(stack).start()
    back_at = time.monotonic()
    assert stack.http.get("/readyz").status_code == 200
    done = stack.wait_terminal(key, turn["id"], timeout=30)
    ran_after = time.monotonic() - back_at
    assert done["status"] == "success"
    assert done["content"] == "echo: while redis sleeps"
    assert (deliveries(stack, turn["id"]), charges(stack, turn["id"])) == (1, 1)
    print(f"\nturn accepted without Redis answered {ran_after:.2f}s after Redis came back")


def _children_of(pid: int) -> list[int]:
    """The live processes whose parent is `pid`, from /proc."""
    children = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    fields = stat.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid and fields[0] != "Z":
                children.append(int(entry))
    return children


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_worker_processes_stop_when_their_groups_parent_is_killed_outright(stack: Stack) -> None:
    """A SIGKILLed `agentq worker` left its worker processes running as orphans: they claimed nothing more
    but held their database connections, beside the group its supervisor started again. They now get
    SIGTERM from the kernel as their parent dies, and stop, finishing the turn they run; their lines about it
    are written to their own stderr, not into the dead parent's pipe, where they were lost (the log showed a
    turn claimed that never ended)."""
    worker = stack.start_worker(processes=2)
    assert worker.popen is not None
    children = _children_of(worker.popen.pid)
    assert len(children) == 2
    _, key = stack.user("orphaned")
    conversation_id = stack.conversation(key, slow_agent(stack, "orphaned-slow", "echo;words=15;gap=0.1"))
    turn = stack.send(key, conversation_id, "outlive the parent")
    wait_for(lambda: claims_of(worker, turn["id"]), what="the turn claimed")
    os.kill(worker.popen.pid, signal.SIGKILL)
    wait_for(lambda: not any(_running(child) for child in children), timeout=30,
             what="the orphaned worker processes to stop")
    done = stack.wait_terminal(key, turn["id"])
    assert (done["status"], done["content"]) == ("success", " ".join(f"w{i}" for i in range(15)))
    ended = [r for r in log_records(worker) if r.get("turn_id") == turn["id"] and " ended " in r["message"]]
    assert [r["message"] for r in ended] == [f"turn {turn['id']} ended success: model {done['model']}, "
                                             f"cost {done['cost']}"]
    gone = [r for r in log_records(worker) if r["message"].startswith("the worker group's parent is gone")]
    assert len(gone) == 2 and {r["process"] for r in gone} == set(children)


def test_a_redis_that_stops_answering_holds_a_post_for_one_timeout_not_half_a_minute(stack: Stack) -> None:
    """A Redis that hangs (stopped, so it neither answers nor refuses) held each POST 35 s: the lock's 5 s
    socket timeout, then 30 s of the broker's on the send. A request whose first look at Redis timed out
    asks it nothing more: the turn is stored and left to the recovery sweep, which sends it once Redis
    answers again."""
    stack.start_worker()
    agent_id = stack.agent(stack.model("hung-redis", "echo"))
    _, key = stack.user("hung-redis")
    conversation_id = stack.conversation(key, agent_id)
    redis = private_redis(stack)
    assert redis.process is not None and redis.process.popen is not None
    redis_pid = redis.process.popen.pid
    os.kill(redis_pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        turn = stack.send(key, conversation_id, "while redis hangs")
        took = time.monotonic() - started
        assert stack.sql("SELECT enqueued_at FROM turns WHERE assistant_message_id = %(id)s", {"id": turn["id"]}) \
            == [(None,)]
    finally:
        os.kill(redis_pid, signal.SIGCONT)
    assert 5 <= took < 10, f"the POST took {took:.1f}s"
    done = stack.wait_terminal(key, turn["id"], timeout=60)
    assert (done["status"], done["content"]) == ("success", "echo: while redis hangs")
    assert (deliveries(stack, turn["id"]), charges(stack, turn["id"])) == (1, 1)


def test_a_redis_refusing_writes_for_want_of_memory_is_waited_out_as_an_outage(stack: Stack) -> None:
    """A Redis at its `maxmemory` with `noeviction` refuses every write ("OOM command not allowed"), as a
    replica does after a failover ("READONLY"): the service's state for a while, not a request's fault nor
    a bug. A POST then stores its turn and leaves the send to the recovery sweep, as when Redis is out of
    reach, and the turn runs once Redis takes writes again, charged once."""
    stack.start_worker()
    agent_id = stack.agent(stack.model("full-redis", "echo"))
    _, key = stack.user("full-redis")
    conversation_id = stack.conversation(key, agent_id)
    redis = private_redis(stack).client()
    redis.config_set("maxmemory", "1")  # below what it holds already: every write is refused
    try:
        response = stack.call("POST", f"/api/conversations/{conversation_id}/messages", key,
                              json={"content": "while redis is full"})
        assert response.status_code == 202, response.text
        turn = response.json()["assistant_message"]
        _, other_key = stack.user("full-redis-other")
        other = stack.call("POST", f"/api/conversations/{stack.conversation(other_key, agent_id)}/messages",
                           other_key, json={"content": "to be stopped while redis is full"}).json()
        other_id = other["assistant_message"]["id"]
        stopped = stack.call("POST", f"/api/messages/{other_id}/cancel", other_key)
        assert (stopped.status_code, stopped.json()["status"]) == (202, "cancelled"), stopped.text
        not_ready = stack.call("GET", "/readyz")  # Redis answers PING all the same
        assert (not_ready.status_code, not_ready.json()["checks"]) == (
            503, {"database": "ok", "redis": "error: OutOfMemoryError"})
    finally:
        redis.config_set("maxmemory", "0")
    assert stack.call("GET", "/readyz").status_code == 200
    done = stack.wait_terminal(key, turn["id"], timeout=60)
    assert (done["status"], done["content"]) == ("success", "echo: while redis is full")
    assert (deliveries(stack, turn["id"]), charges(stack, turn["id"])) == (1, 1)
    assert (stack.message(other_key, other_id)["status"], deliveries(stack, other_id), charges(stack, other_id)) \
        == ("cancelled", 0, 0)
    assert stack.web is not None and "Traceback" not in stack.web.output()  # a refused send is said in one line


def held_unacknowledged(stack: Stack, queue: str, turn_id: int) -> int:
    """How many messages of the turn in `queue` (a delay queue ends in `.DQ`) the broker counts as fetched by a
    worker and not yet acknowledged, across every worker (each held id's body is in the queue's `.msgs`)."""
    client, namespace = stack.redis.client(), f"{stack.key_prefix}-dramatiq"
    held = [member for name in client.scan_iter(match=f"{namespace}:__acks__.*.{queue}")
            for member in client.smembers(name)]
    bodies = client.hmget(f"{namespace}:{queue}.msgs", held) if held else []
    return sum(1 for body in bodies if body is not None and json.loads(body)["args"] == [turn_id])


@contextmanager
def redis_refusing_writes(stack: Stack) -> Iterator[None]:
    """While the block runs, the module's Redis refuses every write, as at its `maxmemory` under `noeviction`."""
    redis = private_redis(stack).client()
    redis.config_set("maxmemory", "1")  # below what it holds already
    try:
        yield
    finally:
        redis.config_set("maxmemory", "0")


def retrying_after_a_failed_settlement(stack: Stack, name: str, upstream: str, *, backoff_ms: int, **env: Any
                                       ) -> tuple[str, int, Process, AbstractContextManager[None]]:
    """A user's key and conversation with an agent of `upstream`, a worker (with `env`) whose retries wait
    `backoff_ms`, and the block in which that user's settlements fail, so that each delivery of their turn is
    retried."""
    user_id, key = stack.user(name)
    agent_id = stack.agent(stack.model(name, upstream))
    worker = stack.start_worker(threads=2, AGENTQ_MIN_BACKOFF_MS=str(backoff_ms), AGENTQ_MAX_BACKOFF_MS=str(backoff_ms),
                                **env)
    wait_for(lambda: stack.redis.client().exists(f"{stack.key_prefix}:epoch"), what="the first recovery sweep")
    return key, stack.conversation(key, agent_id), worker, refusing(
        stack.sql, "agentq_test_refused_settlement", "credit_transactions", "INSERT", f"NEW.user_id = {int(user_id)}",
        "simulated settlement failure")


@contextmanager
def failing_into_a_full_redis(stack: Stack, name: str, content: str, said: str, **worker_env: Any
                              ) -> Iterator[tuple[dict[str, Any], str, Process]]:
    """A turn (its message, its user's key, its worker) whose first delivery fails, its settlement refused, while
    Redis refuses writes, until the worker's log says `said`; the block runs then, with settlements passing
    again and Redis still full, and Redis takes writes after it."""
    key, conversation_id, worker, settlements_fail = retrying_after_a_failed_settlement(
        stack, name, "echo;ttft=2", backoff_ms=500, **worker_env)
    with settlements_fail:
        turn = stack.send(key, conversation_id, content)
        wait_for(lambda: held_unacknowledged(stack, "turns", turn["id"]) == 1, what="the turn's delivery")
        with redis_refusing_writes(stack):
            wait_for(lambda: said in worker.output(), timeout=20, what=f"the worker to say {said!r}")
            stack.sql("DROP TRIGGER agentq_test_refused_settlement ON credit_transactions")  # the retry's passes
            yield turn, key, worker


def assert_succeeds_on_its_retry(stack: Stack, key: str, turn_id: int, content: str) -> None:
    """The turn ends `success` on its second delivery, charged once, well within the stale-pending rule's 300 s."""
    done = stack.wait_terminal(key, turn_id, timeout=30)
    assert (done["status"], done["content"]) == ("success", content)
    assert (deliveries(stack, turn_id), charges(stack, turn_id)) == (2, 1)


def test_a_retry_whose_send_redis_refuses_is_sent_once_redis_takes_writes(stack: Stack) -> None:
    """A delivery failed while Redis refused writes: Dramatiq's Retries middleware could not send the retry,
    logged it CRITICAL, and the failed delivery's message was written off with it; the turn, `pending` with the
    receipt of its first send, waited five minutes for the stale-pending rule. The send now waits the refusal
    out, and the retry runs as soon as Redis takes writes, charged once."""
    with failing_into_a_full_redis(stack, "retried-while-full", "retry me while redis is full",
                                   "waiting it out") as (turn, key, worker):
        assert "the retry of run_turn" in worker.output()
    assert_succeeds_on_its_retry(stack, key, turn["id"], "echo: retry me while redis is full")
    assert "Unexpected failure" not in worker.output() and "bug in Dramatiq" not in worker.output()


def test_a_retry_redis_refused_past_its_hand_over_leaves_its_message_to_the_worker_and_the_run_to_the_sweep(
        stack: Stack) -> None:
    """Past the retry's hand-over (`AGENTQ_STALE_PENDING_SECONDS`, 4 s here) the send gives up: one warning line
    (where Dramatiq wrote a CRITICAL with its traceback); the failed delivery's message is not acknowledged (Redis
    gives it back once the worker stops), and the recovery sweep sends the run, which runs once."""
    with failing_into_a_full_redis(stack, "given-up-while-full", "give me up while redis is full",
                                   "the retry was not sent", AGENTQ_STALE_PENDING_SECONDS="4") as (turn, key, worker):
        pass
    assert_succeeds_on_its_retry(stack, key, turn["id"], "echo: give me up while redis is full")
    assert held_unacknowledged(stack, "turns", turn["id"]) == 1  # the failed delivery's, given back at its stop
    assert "CRITICAL" not in worker.output() and "could not be written" not in worker.output()  # no ack tried


def test_a_worker_stopped_while_a_retrys_send_waits_stops_within_its_grace_and_the_run_ends_once(
        stack: Stack) -> None:
    """A retry's send waiting for Redis to take writes held a stopping worker's thread for the whole shutdown grace
    (then the consumers had theirs): the send stops waiting when the worker stops, the message stays with the
    stopped worker, and Redis gives it back to another once that worker's heartbeat has stopped."""
    with failing_into_a_full_redis(stack, "stopped-while-full", "stop me while redis is full", "waiting it out",
                                   AGENTQ_SHUTDOWN_GRACE_SECONDS="20") as (turn, key, worker):
        asked = time.monotonic()
        assert worker.popen is not None
        worker.popen.send_signal(signal.SIGTERM)
        assert worker.popen.wait(timeout=30) == 0
        assert time.monotonic() - asked < 15  # the grace is 20 s
    stack.start_worker(threads=2)
    assert_succeeds_on_its_retry(stack, key, turn["id"], "echo: stop me while redis is full")
    assert "the retry was not sent" in worker.output()


def test_a_delay_queue_consumer_keeps_the_retries_it_holds_while_redis_refuses_its_fetches(stack: Stack) -> None:
    """A delay queue's consumer holds each retry it fetched until its backoff is over. A fetch Redis refused
    (full, or out of reach) made Dramatiq drop what it held and start a new consumer, and the dropped retries
    stayed in this worker's unacknowledged set, given back only once the worker stopped: their turns waited
    for the stale-pending rule. The consumer now looks again and keeps them."""
    key, conversation_id, worker, settlements_fail = retrying_after_a_failed_settlement(
        stack, "held-while-full", "echo", backoff_ms=4000)
    with settlements_fail:
        turn = stack.send(key, conversation_id, "hold me while redis is full")
        wait_for(lambda: held_unacknowledged(stack, "turns.DQ", turn["id"]) == 1,
                 what="the retry held by the delay queue")
    with redis_refusing_writes(stack):
        wait_for(lambda: "the consumer of turns.DQ could not fetch" in worker.output(),
                 what="a fetch of the delay queue refused")
        assert held_unacknowledged(stack, "turns.DQ", turn["id"]) == 1
    assert_succeeds_on_its_retry(stack, key, turn["id"], "echo: hold me while redis is full")
    assert "Consumer encountered" not in worker.output()


def test_a_message_whose_ack_redis_refused_is_acknowledged_once_redis_takes_writes(stack: Stack) -> None:
    """A turn that ended while Redis refused writes could not have its message acknowledged: Dramatiq called it
    "a bug in Dramatiq" and let it be, held by this worker until it restarted, then run again. The ack is
    tried again until Redis takes it, said in one line."""
    _, key = stack.user("acked-after-full")
    agent_id = stack.agent(stack.model("acked-after-full", "echo;ttft=2"))
    worker = stack.start_worker(threads=2)
    conversation_id = stack.conversation(key, agent_id)
    turn = stack.send(key, conversation_id, "ack me once redis has room")
    wait_for(lambda: held_unacknowledged(stack, "turns", turn["id"]) == 1, what="the turn's delivery")
    with redis_refusing_writes(stack):
        done = stack.wait_terminal(key, turn["id"])
        wait_for(lambda: "could not be written" in worker.output(), what="the refused ack")
        assert held_unacknowledged(stack, "turns", turn["id"]) == 1
    wait_for(lambda: held_unacknowledged(stack, "turns", turn["id"]) == 0, timeout=15,
             what="the ack, once Redis takes it")
    assert (done["status"], done["content"]) == ("success", "echo: ack me once redis has room")
    assert (deliveries(stack, turn["id"]), charges(stack, turn["id"])) == (1, 1)
    assert "bug in Dramatiq" not in worker.output()
    assert worker.output().count("could not be written") == 1  # every 5 s, said at most every 30 s


def test_after_a_failover_behind_the_same_address_every_process_writes_to_the_new_primary(
        mock_upstream: Process) -> None:
    """A failover behind an address that moves (a managed Redis's DNS name, a proxy): the old primary, now a
    replica of the new one, answers READONLY on the connections agentq's processes still hold, and redis-py
    kept them: every process waited out an outage that had ended, `/readyz` 503 and no turn run, until each
    was restarted. A connection that meets READONLY connects afresh, and reaches the new primary."""
    old, new = RedisServer("failover-old").start(), RedisServer("failover-new").start()
    new.client().execute_command("REPLICAOF", "127.0.0.1", str(old.port))
    address = TcpRelay(old.port)
    name = scratch_database("agentq_failover")
    services = Stack("failover", f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}",
                     SharedRedis(f"redis://127.0.0.1:{address.port}/0"), AGENTQ_LOG_JSON="true").init()
    try:
        services.start_web()
        services.start_worker(threads=2)
        agent_id = services.agent(services.model("fails-over", "echo"))
        _, key = services.user("fails-over")
        before = services.send(key, services.conversation(key, agent_id), "before the failover")
        assert services.wait_terminal(key, before["id"])["status"] == "success"
        wait_for(lambda: new.client().info("replication")["master_link_status"] == "up", what="the replica's sync")
        new.client().execute_command("REPLICAOF", "NO", "ONE")
        old.client().execute_command("REPLICAOF", "127.0.0.1", str(new.port))
        address.point_at(new.port)
        wait_for(lambda: all(services.call("GET", "/readyz").status_code == 200 for _ in range(4)), timeout=20,
                 what="both API workers ready on the new primary")
        after = services.send(key, services.conversation(key, agent_id), "after the failover")
        done = services.wait_terminal(key, after["id"], timeout=30)
        assert (done["status"], done["content"]) == ("success", "echo: after the failover")
    finally:
        services.stop()
        address.cut()
        old.kill()
        new.kill()
        drop_database(name)


def test_every_turn_an_api_killed_mid_burst_committed_ends_within_seconds(stack: Stack) -> None:
    """kill -9 of the API while 48 users' POSTs are in flight, three times: some requests die before their
    commit, some after their 202, and some between the commit and the send (their clients see the
    connection drop, and their turns carry the intake's outbox mark but no receipt of a send: 14-49 of
    95-208 turns in three runs). Every turn committed must end well within the stale-pending rule's
    300 s: here within 15 s of the API being back (the code before the receipts left them pending)."""
    worker = stack.start_worker(processes=2, threads=8)
    wait_for(lambda: stack.redis.client().exists(f"{stack.key_prefix}:epoch"), what="the first recovery sweep")
    agent_id = stack.agent(stack.model("answers-the-burst", "echo"))
    users = [stack.user(f"bursting-{i}") for i in range(48)]
    conversations = [(key, stack.conversation(key, agent_id)) for _, key in users]
    theirs = {"users": [user_id for user_id, _ in users]}
    answers: Counter[str] = Counter()

    http = httpx.Client(base_url=stack.base_url, timeout=10, limits=httpx.Limits(max_connections=len(conversations)))

    def post(key: str, conversation_id: int) -> None:
        together.wait()
        try:
            answers[str(http.post(f"/api/conversations/{conversation_id}/messages", json={"content": "hi"},
                                  headers={"Authorization": f"Bearer {key}"}).status_code)] += 1
        except httpx.HTTPError as exc:
            answers[type(exc).__name__] += 1

    def committed_so_far() -> int:
        return stack.sql("SELECT count(*) FROM turns WHERE user_id = ANY(%(users)s)", theirs)[0][0]

    for kill in range(3):
        together = threading.Barrier(len(conversations) + 1)
        clients = [threading.Thread(target=post, args=pair) for pair in conversations]
        before = committed_so_far()
        for client in clients:
            client.start()
        together.wait()
        # A fixed delay killed a slow host's API before its first commit, leaving nothing to recover.

        def committed_since(before: int = before) -> bool:
            return committed_so_far() > before

        wait_for(committed_since, timeout=10, interval=0.005, what=f"a first turn committed before kill {kill + 1}")
        time.sleep(random.uniform(0, 0.2))
        assert stack.web is not None
        stack.web.kill_group(signal.SIGKILL)
        for client in clients:
            client.join()
        stack.start_web()
        wait_for(lambda: stack.sql("SELECT count(*) FROM conversation_messages m JOIN turns t "
                                   "ON t.assistant_message_id = m.id WHERE t.user_id = ANY(%(users)s) "
                                   "AND m.status IN ('pending', 'processing')", theirs) == [(0,)], timeout=15,
                 what=f"every turn committed before kill {kill + 1} to end")
    turns = stack.sql("SELECT m.status, count(*), count(*) FILTER (WHERE t.enqueued_at <> t.created_at) "
                      "FROM conversation_messages m JOIN turns t ON t.assistant_message_id = m.id "
                      "WHERE t.user_id = ANY(%(users)s) GROUP BY m.status", theirs)
    assert [row[0] for row in turns] == ["success"]
    committed, resent = turns[0][1], turns[0][2]
    assert committed >= answers["202"]
    assert stack.sql("SELECT count(*), count(DISTINCT message_id) FROM credit_transactions "
                     "WHERE message_id IS NOT NULL AND user_id = ANY(%(users)s)", theirs) == [(committed, committed)]
    print(f"\nPOSTs: {dict(answers)}; turns committed {committed}, sent by a sweep {resent} "
          f"(no receipt: {worker.output().count('left no receipt')})")


def test_sigterm_finishes_running_turns_within_the_grace_and_leaves_the_rest(stack: Stack) -> None:
    agent_id = slow_agent(stack, "slow-term", "echo;words=20;gap=0.1")
    _, key = stack.user("shutdown")

    graceful = stack.start_worker(AGENTQ_SHUTDOWN_GRACE_SECONDS="8")
    running = stack.send(key, stack.conversation(key, agent_id), "finish me")
    stack.wait_status(key, running["id"], ("processing",))
    graceful.popen.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
    wait_for(lambda: "Shutting down" in graceful.output(), what="the worker to start shutting down")
    waiting = stack.send(key, stack.conversation(key, agent_id), "not you")
    wait_for(lambda: graceful.popen.poll() is not None, timeout=15, what="the worker to exit")  # type: ignore[union-attr]
    # Its consumers stopped fetching without being paused, which Dramatiq takes for a failure and answers
    # with a 3 s restart delay that held every shutdown.
    assert "Restarting consumer" not in graceful.output()
    assert stack.message(key, running["id"])["status"] == "success"
    assert stack.message(key, waiting["id"])["status"] == "pending"
    assert deliveries(stack, waiting["id"]) == 0

    stack.start_worker()  # a run the grace cannot finish is handed back: the hand-back test below
    assert stack.wait_terminal(key, waiting["id"])["status"] == "success"
    assert (charges(stack, running["id"]), charges(stack, waiting["id"])) == (1, 1)


def test_a_worker_told_to_stop_starts_no_run_queued_before_the_stop(stack: Stack) -> None:
    """Dramatiq's SIGTERM handler only flags the stop, which its main loop acts on up to a second later: a thread
    that finished its run in that second fetched and started a queued one, only to cut its model call short and
    hand it back at the end of the grace (a paid call for nothing, and a delivery spent). The run queued before
    the stop stays queued for another worker."""
    agent_id = slow_agent(stack, "slow-then-stop", "echo;words=20;gap=0.1")
    _, key = stack.user("stop-then-queue")
    worker = stack.start_worker(threads=1, AGENTQ_SHUTDOWN_GRACE_SECONDS="8")
    running = stack.send(key, stack.conversation(key, agent_id), "finish me")
    queued = stack.send(key, stack.conversation(key, agent_id), "not you")
    wait_for(lambda: len(streamed_by(stack, running["id"], 100).split()) >= 19, what="the running answer's last words")
    worker.popen.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
    wait_for(lambda: worker.popen.poll() is not None, timeout=15, what="the worker to exit")  # type: ignore[union-attr]
    assert stack.message(key, running["id"])["status"] == "success"
    assert (stack.message(key, queued["id"])["status"], deliveries(stack, queued["id"])) == ("pending", 0)
    assert "handed to another worker" not in worker.output()

    stack.start_worker()
    assert stack.wait_terminal(key, queued["id"])["status"] == "success"
    assert (deliveries(stack, queued["id"]), charges(stack, queued["id"])) == (1, 1)


def test_a_web_process_told_to_stop_ends_its_answer_streams_instead_of_holding_its_stop(stack: Stack) -> None:
    """An open stream of a turn still running held a stopping `agentq web` for gunicorn's whole 30 s graceful
    timeout, then was cut anyway; it ends at the reader's next look (a heartbeat, 1 s here), without `done`,
    and the client reconnects elsewhere."""
    from tests.conftest import LOG_DIR
    from tests.support import agentq, free_port, wait_http

    agent_id = slow_agent(stack, "never-answers", "echo;ttft=60")
    _, key = stack.user("stream-reader")
    stack.start_worker()
    answer = stack.send(key, stack.conversation(key, agent_id), "take your time")
    port = free_port()
    web = Process("stream-web", agentq("web", "--port", str(port), "--workers", "1", "--threads", "4"),
                  stack.env(AGENTQ_STREAM_HEARTBEAT_SECONDS="1"), LOG_DIR).start()
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz")
        with httpx.stream("GET", f"http://127.0.0.1:{port}/api/messages/{answer['id']}/stream", timeout=60,
                          headers={"Authorization": f"Bearer {key}"}) as response:
            lines = response.iter_lines()
            assert next(line for line in lines if line.startswith("event:")) == "event: status"
            told = time.monotonic()
            assert web.popen is not None
            web.popen.send_signal(signal.SIGTERM)
            rest = list(lines)
        web.popen.wait(timeout=45)
        stopped_in = time.monotonic() - told
    finally:
        web.kill_group()
    assert ("event: done" in rest, web.popen.returncode, stopped_in < 10) == (False, 0, True), (rest, stopped_in)
    assert stack.call("POST", f"/api/messages/{answer['id']}/cancel", key).status_code == 202
    assert stack.wait_terminal(key, answer["id"])["status"] == "cancelled"


def test_a_stop_sent_to_the_whole_process_group_still_finishes_the_running_turn(stack: Stack) -> None:
    """A runner that signals the process group (honcho on Ctrl-C, foreman, a container stop) reaches a worker
    process twice: directly, and through the group's parent, which forwards its SIGTERM. Dramatiq took the
    second copy for "kill now", and the process left at once with its turn neither finished nor handed back
    (left `processing` until its lease ran out). The copy is now taken for the same stop."""
    agent_id = slow_agent(stack, "slow-group-stop", "echo;words=20;gap=0.1")
    _, key = stack.user("group-stop")
    worker = stack.start_worker(AGENTQ_SHUTDOWN_GRACE_SECONDS="8")
    running = stack.send(key, stack.conversation(key, agent_id), "finish me")
    stack.wait_status(key, running["id"], ("processing",))
    assert worker.popen is not None
    # What a signal to the group does, in an order that never lets the kernel merge the two copies: the
    # worker process gets its own, then the parent forwards the one it gets.
    [child] = worker.children()
    os.kill(child, signal.SIGTERM)
    wait_for(lambda: "Stopping worker process" in worker.output(), what="the worker process to start stopping")
    worker.popen.send_signal(signal.SIGTERM)
    wait_for(lambda: worker.popen.poll() is not None, timeout=15, what="the worker to exit")  # type: ignore[union-attr]
    assert "the same stop sent twice" in worker.output()
    assert "Killing worker process" not in worker.output()
    assert stack.message(key, running["id"])["status"] == "success"
    assert (deliveries(stack, running["id"]), charges(stack, running["id"])) == (1, 1)


def test_a_run_still_going_when_the_shutdown_grace_ends_is_handed_to_another_worker_at_once(stack: Stack) -> None:
    """A deploy or a group restart stops a worker whose turn outlasts the shutdown grace: the worker gives up
    the turn's lease as it leaves and sends it again, so another worker takes it over at once, not when the
    lease (30 s here) runs out."""
    # 6 s of answer: the stop, the grace and the hand-back's wait for the run to record its call all come
    # before the answer could end (the other worker boots beforehand, and is held stopped until the claim)
    agent_id = slow_agent(stack, "handed-back", "echo;words=60;gap=0.1")
    _, key = stack.user("hand-back")
    leaving = stack.start_worker(wait=False, AGENTQ_SHUTDOWN_GRACE_SECONDS="1", AGENTQ_LEASE_SECONDS="30")
    taking_over = stack.start_worker(wait=False, AGENTQ_LEASE_SECONDS="30")
    stack.wait_ready(taking_over)
    with taking_over.held():
        stack.wait_ready(leaving)
        turn = stack.send(key, stack.conversation(key, agent_id), "finish me elsewhere")
        stack.wait_status(key, turn["id"], ("processing",))
    leaving.popen.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
    wait_for(lambda: leaving.popen.poll() is not None, timeout=10, what="the worker to exit")  # type: ignore[union-attr]
    assert "handed to another worker" in leaving.output()
    wait_for(lambda: deliveries(stack, turn["id"]) == 2, timeout=15,  # half the lease: at once, not when it ran out
             what="another worker to take the turn over")
    done = stack.wait_terminal(key, turn["id"], timeout=30)
    assert (done["status"], done["content"]) == ("success", " ".join(f"w{i}" for i in range(60)))
    assert charges(stack, turn["id"]) == 1
    assert stack.sql("SELECT delivery, outcome FROM model_attempts WHERE message_id = %(id)s ORDER BY id",
                     {"id": turn["id"]}) == [(1, "cancelled"), (2, "success")]  # the leaving worker's call too


def test_a_run_handed_back_with_no_other_worker_running_waits_for_the_next_one(stack: Stack) -> None:
    """The last worker stopping (a deploy that stops every worker first) hands its turn back: its call, stopped
    by the hand-back, must leave the turn to the next worker, not take the lease back and end the turn
    `cancelled` as if its user had stopped it."""
    agent_id = slow_agent(stack, "handed-to-nobody", "echo;words=60;gap=0.1")
    _, key = stack.user("hand-back-to-nobody")
    leaving = stack.start_worker(AGENTQ_SHUTDOWN_GRACE_SECONDS="1", AGENTQ_LEASE_SECONDS="30")
    turn = stack.send(key, stack.conversation(key, agent_id), "finish me later")
    stack.wait_status(key, turn["id"], ("processing",))
    leaving.popen.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
    wait_for(lambda: leaving.popen.poll() is not None, timeout=10, what="the worker to exit")  # type: ignore[union-attr]
    assert "handed to another worker" in leaving.output()
    assert "took its lease back" not in leaving.output()
    assert stack.sql("SELECT m.status, t.lease_token, t.handed_back FROM turns t JOIN conversation_messages m "
                     "ON m.id = t.assistant_message_id WHERE t.assistant_message_id = %(id)s",
                     {"id": turn["id"]}) == [("processing", None, 1)]
    stack.start_worker(AGENTQ_LEASE_SECONDS="30")
    done = stack.wait_terminal(key, turn["id"], timeout=30)
    assert (done["status"], done["content"]) == ("success", " ".join(f"w{i}" for i in range(60)))
    assert charges(stack, turn["id"]) == 1
    assert stack.sql("SELECT delivery, outcome FROM model_attempts WHERE message_id = %(id)s ORDER BY id",
                     {"id": turn["id"]}) == [(1, "cancelled"), (2, "success")]


def test_a_turn_handed_back_at_each_stop_of_a_rolling_restart_is_not_given_up(stack: Stack) -> None:
    """A rolling restart during a long answer hands the turn back at each stop; each hand-back counted against
    `AGENTQ_MAX_DELIVERIES` as a crash does, and the turn ended `error` ("gave up after N deliveries") with its
    model paid at every delivery, though no worker ever failed. Hand-backs are counted apart."""
    agent_id = slow_agent(stack, "rolling-restart", "echo;words=60;gap=0.1")
    _, key = stack.user("rolling-restart")

    def restarted(wait: bool) -> Process:
        return stack.start_worker(AGENTQ_SHUTDOWN_GRACE_SECONDS="0.5", AGENTQ_MAX_DELIVERIES="1", wait=wait)

    current = restarted(wait=True)
    turn = stack.send(key, stack.conversation(key, agent_id), "through every restart")
    stack.wait_status(key, turn["id"], ("processing",))
    for delivery in (2, 3):
        # The next worker boots while the turn waits in the queue: waited for before the stop, its boot took
        # longer than the whole answer on a loaded host, and the turn had ended before any stop.
        following = restarted(wait=False)
        current.popen.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
        wait_for(lambda: current.popen.poll() is not None, timeout=15, what="the stopped worker to exit")  # type: ignore[union-attr]  # noqa: B023
        assert "handed to another worker" in current.output()
        wait_for(lambda: deliveries(stack, turn["id"]) == delivery, what=f"delivery {delivery}")  # noqa: B023
        current = following
    done = stack.wait_terminal(key, turn["id"], timeout=40)
    assert (done["status"], done["content"]) == ("success", " ".join(f"w{i}" for i in range(60)))
    assert charges(stack, turn["id"]) == 1
    assert stack.sql("SELECT deliveries, handed_back FROM turns WHERE assistant_message_id = %(id)s",
                     {"id": turn["id"]}) == [(3, 2)]


def test_a_run_writing_its_end_when_the_shutdown_grace_ends_is_left_to_finish_not_handed_back(
        stack: Stack, upstream: UpstreamLog) -> None:
    """A turn whose answer was complete when the grace ran out was given up like one still calling: a
    settlement that had not reached the database yet (waiting for one of the pool's connections on a busy
    worker) was refused, and the worker that took the turn over called the model again, a second paid call
    for an answer already had. It is left to write its end. Here the settlement waits at its first write (the
    turn's row, held by another transaction): the hand-back must not queue a revocation behind it."""
    import psycopg

    agent_id = slow_agent(stack, "settling-at-stop", "echo;ttft=0.5")
    _, key = stack.user("settling-at-stop")
    worker = stack.start_worker(AGENTQ_SHUTDOWN_GRACE_SECONDS="1", AGENTQ_LEASE_SECONDS="30")
    turn = stack.send(key, stack.conversation(key, agent_id), "settle me here")
    stack.wait_status(key, turn["id"], ("processing",))
    database = stack.database_url.replace("+psycopg", "")
    with psycopg.connect(database) as holder, psycopg.connect(database, autocommit=True) as watcher:
        holder.execute("SELECT 1 FROM turns WHERE assistant_message_id = %s FOR UPDATE", (turn["id"],))
        wait_for(lambda: upstream.streams(), what="the model's answer")
        wait_for(lambda: watcher.execute("SELECT count(*) FROM pg_stat_activity WHERE %s = ANY(pg_blocking_pids(pid))",
                                         (holder.info.backend_pid,)).fetchall()[0][0] >= 1,
                 what="the settlement to wait for the turn's row")
        worker.popen.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
        wait_for(lambda: "when the shutdown grace ran out" in worker.output(), timeout=10, what="the grace to run out")
        holder.rollback()
    wait_for(lambda: worker.popen.poll() is not None, timeout=10, what="the worker to exit")  # type: ignore[union-attr]
    assert "handed to another worker" not in worker.output()
    done = stack.message(key, turn["id"])
    assert (done["status"], done["content"]) == ("success", "echo: settle me here")
    assert (deliveries(stack, turn["id"]), charges(stack, turn["id"]), len(upstream.requests())) == (1, 1, 1)
    assert stack.sql("SELECT delivery, outcome FROM model_attempts WHERE message_id = %(id)s ORDER BY id",
                     {"id": turn["id"]}) == [(1, "success")]


def _stick(stack: Stack, turn_id: int, deadline_seconds: float, reserved: str) -> None:
    """What a worker stuck in a turn looks like from the database: processing, under a lease it keeps renewing,
    with the deadline and the reservation its claim wrote (the agent's timeout for each model plus the grace,
    from now; `reserved` held on the turn and on its user)."""
    stack.sql("UPDATE users SET reserved = reserved + %(amount)s::numeric "
              "WHERE id = (SELECT user_id FROM turns WHERE assistant_message_id = %(id)s)",
              {"id": turn_id, "amount": reserved})
    stack.sql("UPDATE conversation_messages SET status = 'processing', updated_at = now() "
              "WHERE id IN (SELECT unnest(ARRAY[assistant_message_id, user_message_id]) FROM turns "
              "WHERE assistant_message_id = %(id)s)", {"id": turn_id})
    stack.sql("UPDATE turns SET lease_token = 'stuck', lease_expires_at = now() + interval '1 hour', "
              "deadline_at = now() + make_interval(secs => %(deadline)s), deliveries = 1, "
              "reserved_amount = %(amount)s::numeric WHERE assistant_message_id = %(id)s",
              {"id": turn_id, "deadline": deadline_seconds, "amount": reserved})


def _deadline_passes(stack: Stack, table: str, id_column: str, ident: int) -> None:
    """The stuck run's deadline passes now, once the worker has booted. Stuck with its deadline far off while the
    worker boots, the run is ended by the boot's fetch of its message if that is one delivery too many, and is
    otherwise left to the stuck delivery's live lease. Its deadline passing during a boot slower than the
    deadline plus a lease let the API's bound on unheld runs (`app.deadline_bound`) end it first, as soon as the
    worker's sweep revoked the stuck lease and before its delivery came."""
    stack.sql(f"UPDATE {table} SET deadline_at = now() WHERE {id_column} = %(id)s", {"id": ident})


OUT_OF_TIME = ("gave up at delivery 2: the run's deadline (each model's timeout and the grace, counted from its first "
               "delivery) left no time for a model call")


@pytest.mark.parametrize(("max_deliveries", "reason"), [("5", OUT_OF_TIME), ("1", "gave up after 1 delivery")])
def test_a_turn_processing_past_its_timeout_and_grace_is_ended_by_its_next_delivery(
        stack: Stack, upstream: UpstreamLog, max_deliveries: str, reason: str) -> None:
    """Revoked at its deadline and sent again; that delivery keeps the deadline, finds it passed and ends
    the turn as `error` without calling the model (a new full timeout would keep it `processing` for
    `AGENTQ_MAX_DELIVERIES` times its bound). Too many deliveries is checked first."""
    grace = 2
    agent_id = stack.agent(stack.model(f"stuck-{max_deliveries}", "echo"), timeout_seconds=1)
    _, key = stack.user(f"stuck-{max_deliveries}")
    turn = stack.send(key, stack.conversation(key, agent_id), "are you there")
    _stick(stack, turn["id"], deadline_seconds=3600, reserved="0.250000")
    stack.start_worker(AGENTQ_TURN_GRACE_SECONDS=str(grace), AGENTQ_MAX_DELIVERIES=max_deliveries)
    _deadline_passes(stack, "turns", "assistant_message_id", turn["id"])

    done = stack.wait_terminal(key, turn["id"], timeout=3 * RECOVERY_INTERVAL + 10)
    assert (done["status"], done["error_message"], done["content"]) == ("error", reason, "")
    assert (deliveries(stack, turn["id"]), charges(stack, turn["id"]), upstream.requests()) == (2, 0, [])
    # The stuck delivery's reservation is given back once, and the ended turn holds none (a requeued
    # turn would otherwise skip its own reservation and give this one back a second time).
    assert stack.sql("SELECT t.reserved_amount, u.reserved FROM turns t JOIN users u ON u.id = t.user_id "
                     "WHERE t.assistant_message_id = %(id)s", {"id": turn["id"]})[0] == (Decimal(0), Decimal(0))
    # A run given up is a poison message: dead-lettered with its reason, for an operator to requeue.
    letter = given_up_letter(stack, "run_turn", turn["id"], reason)
    _give_more_time(stack, agent_id)
    assert stack.call("POST", f"/api/admin/dead-letters/{letter['id']}/requeue").status_code == 202
    again = stack.wait_terminal(key, turn["id"])
    assert (again["status"], again["content"], again["error_message"]) == ("success", "echo: are you there", None)
    assert (deliveries(stack, turn["id"]), charges(stack, turn["id"]), len(upstream.requests())) == (1001, 1, 1)
    assert stack.call("GET", "/api/admin/dead-letters").json()["items"] == []


def _give_more_time(stack: Stack, agent_id: int) -> None:
    """The operator mends the cause before requeueing: with a 1 s timeout and a 2 s grace the requeued run's
    whole model time is 1 s from its claim, which a loaded host can spend before the call is even sent."""
    assert stack.call("PATCH", f"/api/admin/agents/{agent_id}", json={"timeout_seconds": 30}).status_code == 200


def given_up_letter(stack: Stack, actor: str, run_id: int, reason: str) -> dict[str, Any]:
    """The one dead letter of a run given up by a delivery, which names the reason; no other is open."""
    letters = wait_for(lambda: stack.call("GET", "/api/admin/dead-letters").json()["items"],
                       what="the dead letter of the run given up")
    assert [(x["queue"], x["actor"], x["args"], x["retries"], x["error"]) for x in letters] == [
        ("turns" if actor == "run_turn" else "debug", actor, [run_id], 0, f"app.deliveries.RunGivenUp: {reason}")]
    return letters[0]


def test_a_turn_taken_over_keeps_its_first_deliverys_deadline(stack: Stack, upstream: UpstreamLog) -> None:
    """A worker died during the turn's first delivery: the delivery taking over gets the time left before the
    deadline the first one set (less the settlement's reserve), not the agent's whole timeout again, so a
    turn whose workers keep dying still ends within its timeout plus the grace plus the recovery time.
    That time includes what is left of the grace, which the recovery itself uses up: keeping the whole grace
    back gave a takeover after a crash no model time at all (here: 10 s left, a grace of 20 s)."""
    grace, left = 20, 5
    agent_id = stack.agent(stack.model("dying", "echo;words=40;gap=0.25"), timeout_seconds=30)
    _, key = stack.user("dying")
    # The worker taking over boots beforehand, held stopped: the deadline left must not go to its boot.
    taking_over = stack.start_worker(AGENTQ_TURN_GRACE_SECONDS=str(grace))
    with taking_over.held():
        turn = stack.send(key, stack.conversation(key, agent_id), "one more time")
        _stick(stack, turn["id"], deadline_seconds=left + SETTLEMENT_RESERVE_SECONDS, reserved="0")
        stack.sql("UPDATE turns SET lease_expires_at = now() - interval '1 second' "
                  "WHERE assistant_message_id = %(id)s", {"id": turn["id"]})
        died_at = time.monotonic()

    done = stack.wait_terminal(key, turn["id"], timeout=left + grace + 10)
    ended_after = time.monotonic() - died_at
    assert done["status"] == "llm_error"
    assert done["error_message"].startswith("dying: ") and "ran past" in done["error_message"]
    assert done["content"] and " ".join(f"w{i}" for i in range(40)).startswith(done["content"])
    assert (deliveries(stack, turn["id"]), charges(stack, turn["id"]), len(upstream.requests())) == (2, 0, 1)
    # Ended at the first delivery's deadline, not after a new 30 s timeout; 3.5 s for the watchdog's tick, the
    # settlement and the polling of a loaded host
    assert ended_after <= left + 3.5, f"ended {ended_after:.2f}s after the first delivery died"
    print(f"\ntaken-over turn cut at its first delivery's deadline: ended {ended_after:.2f}s after (left {left}s)")


@pytest.mark.parametrize(("max_deliveries", "reason"), [("5", OUT_OF_TIME), ("1", "gave up after 1 delivery")])
def test_an_admin_test_run_processing_past_its_timeout_and_grace_is_ended_by_its_next_delivery(
        stack: Stack, upstream: UpstreamLog, max_deliveries: str, reason: str) -> None:
    """Like a turn: a test run stuck past its deadline, or delivered too often, ends as `error` without
    a model call at its next delivery."""
    grace = 2
    agent_id = stack.agent(stack.model(f"stuck-debug-{max_deliveries}", "echo"), timeout_seconds=1)
    accepted = stack.call("POST", f"/api/admin/agents/{agent_id}/debug/execute", json={"content": "still there?"})
    assert accepted.status_code == 202
    run_id = accepted.json()["debug_log_id"]
    stack.sql("UPDATE admin_debug_logs SET status = 'processing', lease_token = 'stuck', "
              "lease_expires_at = now() + interval '1 hour', deliveries = 1, "
              "deadline_at = now() + interval '1 hour', updated_at = now() WHERE id = %(id)s", {"id": run_id})
    stack.start_worker(AGENTQ_TURN_GRACE_SECONDS=str(grace), AGENTQ_MAX_DELIVERIES=max_deliveries)
    _deadline_passes(stack, "admin_debug_logs", "id", run_id)
    log = wait_for(lambda: ended_test_run(stack, run_id), timeout=3 * RECOVERY_INTERVAL + 10,
                   what="the stuck test run to end")
    assert (log["status"], log["output"], log["error_message"]) == ("error", "", reason)
    assert stack.sql("SELECT deliveries FROM admin_debug_logs WHERE id = %(id)s", {"id": run_id})[0][0] == 2
    assert upstream.requests() == []
    letter = given_up_letter(stack, "run_debug_run", run_id, reason)
    _give_more_time(stack, agent_id)
    assert stack.call("POST", f"/api/admin/dead-letters/{letter['id']}/requeue").status_code == 202
    log = wait_for(lambda: ended_test_run(stack, run_id), what="the requeued test run to end")
    assert (log["status"], log["output"], log["error_message"]) == ("success", "echo: still there?", None)
    assert len(upstream.requests()) == 1
    assert stack.call("GET", "/api/admin/dead-letters").json()["items"] == []


def test_a_turn_failing_after_its_claim_every_time_is_retried_by_dramatiq_alone_and_dead_lettered(
        stack: Stack, upstream: UpstreamLog) -> None:
    """A delivery that raises after its claim (here its settlement: the user's ledger refuses the charge)
    records what its attempt cost upstream anyway and hands the turn to Dramatiq's retry; the recovery
    sweep must not send it again meanwhile, even while the retry waits behind a backlog. When it did,
    each of the sweep's deliveries counted one more towards the give-up, and the turn ended "gave up
    after N deliveries" before its retries ran out: no dead letter naming the error, nothing to requeue.

    One worker thread, a lease of 1 s and a sweep every 0.5-1 s: the failing turn's first retry waits
    behind a 4 s answer of another user, long enough for the sweep to send the turn several times."""
    user_id, key = stack.user("settles-never")
    _, other_key = stack.user("answered-meanwhile")
    failing_agent = stack.agent(stack.model("settles-never", "echo"))
    slow_agent_id = stack.agent(stack.model("answers-slowly", "echo;ttft=4"))
    stack.start_worker(threads=1, AGENTQ_LEASE_SECONDS="1", AGENTQ_MAX_RETRIES="2",
                       AGENTQ_MIN_BACKOFF_MS="500", AGENTQ_MAX_BACKOFF_MS="500")
    # A first sweep on a Redis it has never marked takes it for one that lost its data, and sends every
    # run waiting for a message, a handed-over one too: that is a crack of its own, not this test's.
    wait_for(lambda: stack.redis.client().exists(f"{stack.key_prefix}:epoch"), what="the first recovery sweep")
    with refusing(stack.sql, "agentq_test_refuse_charge", "credit_transactions", "INSERT",
                  f"NEW.user_id = {int(user_id)}", "simulated settlement failure"):
        failing = stack.send(key, stack.conversation(key, failing_agent), "settle me")
        slow = stack.send(other_key, stack.conversation(other_key, slow_agent_id), "take your time")
        done = stack.wait_terminal(key, failing["id"], timeout=30)
    assert stack.wait_terminal(other_key, slow["id"])["status"] == "success"
    assert done["status"] == "error"
    assert done["error_message"] == "retries exhausted after 3 attempts: sqlalchemy.exc.ProgrammingError"
    calls = [r for r in upstream.requests() if "settle me" in json.dumps(r)]
    assert (deliveries(stack, failing["id"]), charges(stack, failing["id"]), len(calls)) == (3, 0, 3)
    # Each delivery's settlement failed, and took its attempt's row with it; each is recorded on its own.
    assert stack.sql("SELECT model_name, outcome FROM model_attempts WHERE message_id = %(id)s",
                     {"id": failing["id"]}) == [("settles-never", "success")] * 3
    letters = stack.call("GET", "/api/admin/dead-letters").json()["items"]
    mine = [letter for letter in letters if letter["args"] == [failing["id"]]]
    assert [letter["retries"] for letter in mine] == [2]
    assert stack.call("DELETE", f"/api/admin/dead-letters/{mine[0]['id']}").status_code == 204  # later tests count none
    assert stack.sql("SELECT reserved FROM users WHERE id = %(id)s", {"id": user_id}) == [(Decimal(0),)]


def test_a_turn_waiting_in_a_long_queue_is_not_sent_again_while_its_receipt_is_in_redis(stack: Stack) -> None:
    """A pending turn past the enqueue grace may have been committed by a process that died before its send,
    or be waiting behind others: the receipt its send left in Redis tells them apart, so a turn that waits
    is not sent again (its outbox mark is never moved), and runs once."""
    _, key = stack.user("queued-behind")
    _, other_key = stack.user("served-first")
    agent_id = stack.agent(stack.model("answers-at-once", "echo"))
    slow_agent_id = stack.agent(stack.model("answers-in-four-seconds", "echo;ttft=4"))
    stack.start_worker(threads=1)
    wait_for(lambda: stack.redis.client().exists(f"{stack.key_prefix}:epoch"), what="the first recovery sweep")
    slow = stack.send(other_key, stack.conversation(other_key, slow_agent_id), "take your time")
    wait_for(lambda: stack.sql("SELECT status FROM conversation_messages WHERE id = %(id)s",
                               {"id": slow["id"]}) == [("processing",)], what="the slow turn to take the thread")
    posted = time.monotonic()
    queued = stack.send(key, stack.conversation(key, agent_id), "wait your turn")
    wait_for(lambda: stack.sql("SELECT status FROM conversation_messages WHERE id = %(id)s",
                               {"id": queued["id"]}) != [("pending",)], timeout=30, what="the queued turn's claim")
    assert time.monotonic() - posted > 3  # past the grace (1 s) and several sweeps (every 0.5-1 s)
    assert stack.wait_terminal(key, queued["id"])["status"] == "success"
    assert stack.wait_terminal(other_key, slow["id"])["status"] == "success"
    assert stack.sql("SELECT enqueued_at = created_at FROM turns WHERE assistant_message_id = %(id)s",
                     {"id": queued["id"]}) == [(True,)]
    assert deliveries(stack, queued["id"]) == 1


def test_an_admin_test_run_whose_result_cannot_be_written_records_each_attempt_and_is_dead_lettered(
        stack: Stack, upstream: UpstreamLog) -> None:
    """A test run's settlement that fails (the log row refuses its result) takes its attempt's row with
    it; the model was called all the same, so each delivery's attempt is recorded on its own, at the
    model's prices, and the run ends as a dead letter naming the error."""
    agent_id = stack.agent(stack.model("logs-never", "echo"))
    stack.start_worker(AGENTQ_MAX_RETRIES="2", AGENTQ_MIN_BACKOFF_MS="200", AGENTQ_MAX_BACKOFF_MS="200")
    wait_for(lambda: stack.redis.client().exists(f"{stack.key_prefix}:epoch"), what="the first recovery sweep")
    with refusing(stack.sql, "agentq_test_refuse_result", "admin_debug_logs", "UPDATE", "NEW.status = 'success'",
                  "simulated result failure"):
        accepted = stack.call("POST", f"/api/admin/agents/{agent_id}/debug/execute", json={"content": "log me"})
        assert accepted.status_code == 202
        run_id = accepted.json()["debug_log_id"]
        log = wait_for(lambda: ended_test_run(stack, run_id), timeout=30, what="the test run to end")
    assert log["status"] == "error"
    assert log["error_message"].startswith("retries exhausted after 3 attempts: "), log["error_message"]
    assert "simulated result failure" in log["error_message"]
    calls = [r for r in upstream.requests() if "log me" in json.dumps(r)]
    recorded = stack.sql("SELECT model_name, outcome, cost FROM model_attempts WHERE debug_log_id = %(id)s",
                         {"id": run_id})
    assert (len(calls), len(recorded), {row[:2] for row in recorded}) == (3, 3, {("logs-never", "success")})
    assert [row[2] for row in recorded] == [Decimal("0.000013")] * 3  # 7 prompt and 3 answer tokens
    letters = stack.call("GET", "/api/admin/dead-letters").json()["items"]
    mine = [letter for letter in letters if letter["args"] == [run_id]]
    assert [letter["retries"] for letter in mine] == [2]
    assert stack.call("DELETE", f"/api/admin/dead-letters/{mine[0]['id']}").status_code == 204


def test_a_worker_started_with_queues_serves_only_those_queues(stack: Stack) -> None:
    agent_id = stack.agent(stack.model("queues-model", "echo"))
    _, key = stack.user("queues")
    stack.start_worker(queues=["turns"])
    accepted = stack.call("POST", f"/api/admin/agents/{agent_id}/debug/execute", json={"content": "later"})
    assert accepted.status_code == 202
    run_id = accepted.json()["debug_log_id"]
    turn = stack.send(key, stack.conversation(key, agent_id), "now")
    assert stack.wait_terminal(key, turn["id"])["status"] == "success"
    assert stack.call("GET", f"/api/admin/debug-logs/{run_id}").json()["status"] == "pending"

    stack.start_worker(queues=["debug"])
    log = wait_for(lambda: ended_test_run(stack, run_id), timeout=30, what="the test run to end")
    assert (log["status"], log["output"]) == ("success", "echo: later")


def test_a_turn_no_worker_starts_within_the_pending_bound_ends_as_error(stack: Stack) -> None:
    """A turn waiting in a queue no worker serves (a backlog, every turns worker gone) stayed pending for ever,
    against guarantee 1's bound. The sweep of any worker process (here one serving only the test runs' queue)
    ends it `error` once it has waited `AGENTQ_MAX_PENDING_SECONDS` (2 s here) since its acceptance: uncharged,
    both messages ended, the conversation free for the next message."""
    stack.start_worker(queues=["debug"], AGENTQ_MAX_PENDING_SECONDS="2")
    _a_turn_nobody_starts_ends_at_the_pending_bound(stack)


def test_an_admin_test_run_no_worker_starts_within_the_pending_bound_ends_as_error(stack: Stack) -> None:
    """An admin test run waiting in a queue no worker serves waited for a worker however long. The same bound
    holds it: the sweep of any worker process (here one serving only the turns' queue) ends it `error`."""
    stack.start_worker(queues=["turns"], AGENTQ_MAX_PENDING_SECONDS="2")
    _a_test_run_nobody_starts_ends_at_the_pending_bound(stack, _start_a_test_run(stack))


def test_an_api_process_ends_runs_no_worker_starts_within_the_pending_bound() -> None:
    """With no worker running at all (every worker gone), nothing swept and the turn stayed pending until one
    started. Each API process looks too: the deployment's API alone (its bound 2 s) ends the turn, and the
    admin test run sent a moment before it."""
    with stack_on_shared_redis("api-pending-bound", AGENTQ_MAX_PENDING_SECONDS="2") as api:
        api.init().start_web()
        run_id = _start_a_test_run(api)
        _a_turn_nobody_starts_ends_at_the_pending_bound(api)
        _a_test_run_nobody_starts_ends_at_the_pending_bound(api, run_id)


PAST_DEADLINE = ("gave up: the {} was still running 3 s after its deadline (each model's timeout and the grace, "
                 "counted from its first delivery), and no worker held it")


def _died_past_its_deadline(stack: Stack, deadline_seconds: float) -> tuple[str, int, int]:
    """A turn whose worker died: processing, its lease run out, its deadline `deadline_seconds` from now; its
    user's key, its conversation and its answer's id."""
    agent_id = stack.agent(stack.model("died-with-its-worker", "echo"), timeout_seconds=1)
    _, key = stack.user("outlived-its-worker")
    conversation_id = stack.conversation(key, agent_id)
    turn = stack.send(key, conversation_id, "still there?")
    _stick(stack, turn["id"], deadline_seconds=deadline_seconds, reserved="0.250000")
    stack.sql("UPDATE turns SET lease_expires_at = now() - interval '1 second' WHERE assistant_message_id = %(id)s",
              {"id": turn["id"]})
    return key, conversation_id, turn["id"]


def _ends_past_its_deadline(stack: Stack, key: str, conversation_id: int, turn_id: int) -> None:
    """Ended `error` with the reason, its reservation given back, its conversation free for the next message."""
    done = stack.wait_terminal(key, turn_id, timeout=20)
    assert (done["status"], done["error_message"], done["content"]) == ("error", PAST_DEADLINE.format("turn"), "")
    assert stack.sql("SELECT t.reserved_amount, u.reserved FROM turns t JOIN users u ON u.id = t.user_id "
                     "WHERE t.assistant_message_id = %(id)s", {"id": turn_id})[0] == (Decimal(0), Decimal(0))
    assert charges(stack, turn_id) == 0
    past = stack.sql("SELECT extract(epoch FROM m.updated_at - t.deadline_at)::float FROM turns t JOIN "
                     "conversation_messages m ON m.id = t.assistant_message_id WHERE t.assistant_message_id = %(id)s",
                     {"id": turn_id})[0][0]
    assert LEASE_SECONDS <= past < LEASE_SECONDS + 2 * RECOVERY_INTERVAL + 2, f"ended {past:.2f}s past"
    following = stack.send(key, conversation_id, "and now?")
    assert stack.call("POST", f"/api/messages/{following['id']}/cancel", key).status_code == 202


def test_a_turn_whose_worker_died_is_ended_past_its_deadline_when_no_delivery_comes(stack: Stack) -> None:
    """Only a delivery ended a processing turn past its deadline, and the message the sweep sent waited behind
    the queue (here: no worker serves it), sent again at every lease: the turn stayed `processing`, its
    conversation busy, far past its bound. The sweep ends it a lease (3 s here) after its deadline."""
    stack.start_worker(queues=["debug"])
    key, conversation_id, turn_id = _died_past_its_deadline(stack, deadline_seconds=2)
    _ends_past_its_deadline(stack, key, conversation_id, turn_id)


def test_an_api_process_ends_runs_past_their_deadline_with_no_worker_running() -> None:
    """Every worker gone: a turn and an admin test run their dead worker left `processing` stayed so for ever.
    The API's loop ends them once past their deadline."""
    with stack_on_shared_redis("api-deadline-bound") as api:
        api.init().start_web()
        run_id = _start_a_test_run(api)
        api.sql("UPDATE admin_debug_logs SET status = 'processing', lease_token = 'dead', deliveries = 1, "
                "lease_expires_at = now() - interval '1 second', deadline_at = now() + interval '2 seconds', "
                "updated_at = now() WHERE id = %(id)s", {"id": run_id})
        key, conversation_id, turn_id = _died_past_its_deadline(api, deadline_seconds=2)
        _ends_past_its_deadline(api, key, conversation_id, turn_id)
        log = wait_for(lambda: ended_test_run(api, run_id), timeout=20, what="the test run to end")
        assert (log["status"], log["error_message"], log["cost"]) == ("error", PAST_DEADLINE.format("test run"), None)


def _start_a_test_run(stack: Stack) -> int:
    agent_id = stack.agent(stack.model("never-tested", "echo"))
    accepted = stack.call("POST", f"/api/admin/agents/{agent_id}/debug/execute", json={"content": "anyone?"})
    assert accepted.status_code == 202, accepted.text
    return int(accepted.json()["debug_log_id"])


def _a_test_run_nobody_starts_ends_at_the_pending_bound(stack: Stack, run_id: int) -> None:
    """The test run ends `error`, with the reason, 2 s after its acceptance give or take the sweeps (by its own
    timestamps: the caller may look later), and nothing is logged as cost."""
    log = wait_for(lambda: ended_test_run(stack, run_id), timeout=20, what="the test run to end")
    assert (log["status"], log["error_message"], log["cost"], log["model"]) == (
        "error", "no worker started the test run within 2 s of its acceptance (AGENTQ_MAX_PENDING_SECONDS)",
        None, None)
    waited = stack.sql("SELECT extract(epoch FROM updated_at - created_at)::float FROM admin_debug_logs "
                       "WHERE id = %(id)s", {"id": run_id})[0][0]
    assert 2 <= waited < 2 + 2 * RECOVERY_INTERVAL + 3


def _a_turn_nobody_starts_ends_at_the_pending_bound(stack: Stack) -> None:
    """A turn sent now, which no worker starts, ends `error` 2 s after its acceptance (give or take the
    sweeps): uncharged, both messages ended, the conversation free for the next message."""
    agent_id = stack.agent(stack.model("never-served", "echo"))
    _, key = stack.user("waits-for-a-worker")
    conversation_id = stack.conversation(key, agent_id)
    turn = stack.send(key, conversation_id, "is anyone there")
    accepted = time.monotonic()

    done = stack.wait_terminal(key, turn["id"], timeout=20)
    waited = time.monotonic() - accepted
    assert (done["status"], done["error_message"], done["cost"]) == (
        "error", "no worker started the turn within 2 s of its acceptance (AGENTQ_MAX_PENDING_SECONDS)", None)
    assert 2 <= waited < 2 + 2 * RECOVERY_INTERVAL + 3
    statuses = stack.call("GET", f"/api/conversations/{conversation_id}/messages", key).json()["items"]
    assert [m["status"] for m in statuses] == ["error", "error"]
    assert charges(stack, turn["id"]) == 0
    assert stack.call("GET", "/api/me", key).json()["balance"] == "100.000000"

    following = stack.send(key, conversation_id, "and now?")
    assert stack.call("POST", f"/api/messages/{following['id']}/cancel", key).status_code == 202
    assert stack.wait_terminal(key, following["id"])["status"] == "cancelled"


def scrape(stack: Stack) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The counters, histograms and gauges of /metrics, but the API's request counts (each scrape is one)."""
    response = stack.http.get("/metrics")
    assert response.status_code == 200
    values = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            if not sample.name.startswith("agentq_http_request"):
                values[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return values


def metric(values: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return values.get((name, tuple(sorted(labels.items()))), 0.0)


def models_created(stack: Stack) -> float:
    """How many models the API has created, by its request counts (a series no scrape adds to)."""
    for family in text_string_to_metric_families(stack.http.get("/metrics").text):
        for sample in family.samples:
            if sample.name == "agentq_http_requests_total" and sample.labels == {
                    "route": "/api/admin/models", "method": "POST", "status": "201"}:
                return sample.value
    return 0.0


def test_the_counter_files_of_killed_processes_are_folded_by_gunicorns_master_and_the_worker_group(
        stack: Stack) -> None:
    """A process's counter files outlive it, for its counts to go on being counted, and every scrape reads them
    all: restarted for months, a deployment left thousands. The gunicorn master folds a worker's as it replaces
    it, the worker group a process's as it starts again (`app.metrics_files`), and every count is kept."""
    group = stack.start_worker(processes=1, threads=2)
    agent_id = stack.agent(stack.model("fold-counted", "echo"))
    _, key = stack.user("fold")
    turn = stack.send(key, stack.conversation(key, agent_id), "count me")
    assert stack.wait_terminal(key, turn["id"])["status"] == "success"
    wait_for(lambda: any(r["message"].startswith(f"turn {turn['id']} ended success") for r in log_records(group)),
             what="the worker's last line of the turn, after its counts")
    before, created = scrape(stack), models_created(stack)
    assert metric(before, "agentq_turns_total", status="success") >= 1 and created >= 1  # the module's stack's
    files = stack.metrics_dir
    (worker,) = group.children()
    assert stack.web is not None
    api_worker = next(pid for pid in stack.web.children() if (files / f"counter_{pid}.db").exists())
    assert (files / f"counter_{worker}.db").exists()

    os.kill(api_worker, signal.SIGKILL)
    os.kill(worker, signal.SIGKILL)
    wait_for(lambda: "starting the group again" in group.output(), timeout=30, what="the group to start again")
    wait_for(lambda: group.output().count("Worker process is ready") >= 2, timeout=60, what="the new group to boot")
    wait_for(lambda: not (files / f"counter_{api_worker}.db").exists(), what="gunicorn's master to fold its worker's")
    names = sorted(path.name for path in files.glob("*.db"))
    assert not [name for name in names if name.endswith((f"_{worker}.db", f"_{api_worker}.db"))], names
    assert {"counter_ended.db", "histogram_ended.db"} <= set(names)
    after = scrape(stack)
    gauges = {"agentq_worker_processes"}  # the killed process is listed until its presence expires
    assert {k: v for k, v in after.items() if k[0] not in gauges} == {k: v for k, v in before.items()
                                                                      if k[0] not in gauges}
    assert models_created(stack) == created


def test_workers_that_share_no_counters_directory_with_the_api_serve_their_own(stack: Stack, tmp_path: Path) -> None:
    """Nearly every count is made in a worker (its model calls, fallbacks, costs, most turn ends). Workers on
    a host of their own (a container, a dyno) write them where no API process reads, and its `/metrics` never
    showed them: `--metrics-port` (`AGENTQ_WORKER_METRICS_PORT`) serves that host's counters."""
    from tests.support import free_port

    port = free_port()
    stack.start_worker(PROMETHEUS_MULTIPROC_DIR=str(tmp_path / "worker-host"), AGENTQ_WORKER_METRICS_PORT=str(port))
    agent_id = stack.agent(stack.model("own-host", "echo"))
    _, key = stack.user("own-host")
    answer = stack.send(key, stack.conversation(key, agent_id), "count me")
    assert stack.wait_terminal(key, answer["id"])["status"] == "success"
    served = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10)
    assert served.status_code == 200
    values = {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
              for family in text_string_to_metric_families(served.text) for sample in family.samples}
    assert metric(values, "agentq_turns_total", status="success") == 1
    assert metric(values, "agentq_model_attempts_total", model="own-host", outcome="success") == 1
    assert not any(name == "agentq_backing_service_up" for name, _ in values)  # the API's gauges stay the API's
    assert metric(scrape(stack), "agentq_model_attempts_total", model="own-host", outcome="success") == 0


def test_the_workers_counters_server_asks_for_the_metrics_token_when_one_is_set(stack: Stack) -> None:
    """`AGENTQ_METRICS_TOKEN` kept strangers out of the API's `/metrics` but not out of the worker group's
    counters server, which a container exposes on 0.0.0.0."""
    from tests.support import free_port

    port, token = free_port(), "a-scrape-token-of-some-length"
    stack.start_worker(AGENTQ_WORKER_METRICS_PORT=str(port), AGENTQ_METRICS_TOKEN=token)
    url = f"http://127.0.0.1:{port}/metrics"
    for headers in ({}, {"Authorization": "Bearer a-wrong-token-of-some-length"}, {"Authorization": token}):
        refused = httpx.get(url, headers=headers, timeout=10)
        assert (refused.status_code, refused.headers["WWW-Authenticate"]) == (401, "Bearer")
        assert refused.json()["error"]["code"] == "invalid_metrics_token"
    served = httpx.get(url, headers={"Authorization": f"Bearer {token}"}, timeout=10)
    assert served.status_code == 200
    assert "agentq_fallbacks" in {family.name for family in text_string_to_metric_families(served.text)}


def test_metrics_count_real_turns_across_worker_and_web_processes(stack: Stack) -> None:
    stack.start_worker(processes=2)
    slow = slow_agent(stack, "metrics-slow", "echo;ttft=0.2;words=30;gap=0.1")
    good_model = stack.model("metrics-good", "echo;ttft=0.05")
    plain = stack.agent(good_model)
    falling_back = stack.agent(stack.model("metrics-broken", "echo;fail=500"), good_model)
    _, key = stack.user("metrics")
    before = scrape(stack)

    in_flight = stack.send(key, stack.conversation(key, slow), "watch me")
    stack.wait_status(key, in_flight["id"], ("processing",))
    during = scrape(stack)
    assert metric(during, "agentq_turns_in_flight", status="processing") == 1
    turns = [stack.send(key, stack.conversation(key, plain), f"plain {i}") for i in range(2)]
    assert stack.wait_terminal(key, in_flight["id"])["status"] == "success"
    turns += [stack.send(key, stack.conversation(key, falling_back), f"fallback {i}") for i in range(2)]
    assert [stack.wait_terminal(key, t["id"])["status"] for t in turns] == ["success"] * 4
    turns.append(in_flight)

    def total(values: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str) -> float:
        return sum(v for (series, _), v in values.items() if series == name)

    # A worker counts a turn's end just after its commit, which the API may show first on a loaded host; and
    # the presences of the workers an earlier test killed are listed until they expire (6 s).
    wait_for(lambda: total(now := scrape(stack), "agentq_model_attempts_total")
             - total(before, "agentq_model_attempts_total") == 7
             and metric(now, "agentq_turns_total", status="success") - metric(before, "agentq_turns_total",
                                                                              status="success") == 5
             and total(now, "agentq_worker_processes") == 2,
             what="the workers' counts of the five ends, and this test's two worker processes alone listed")
    scrapes = [scrape(stack) for _ in range(6)]
    differing = {series for s in scrapes[1:] for series in set(s) | set(scrapes[0])
                 if s.get(series) != scrapes[0].get(series)}
    assert not differing, sorted(differing)
    after = scrapes[-1]

    def grew(name: str, **labels: str) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert grew("agentq_turns_total", status="success") == 5
    assert grew("agentq_model_attempts_total", model="metrics-good", outcome="success") == 4
    assert grew("agentq_model_attempts_total", model="metrics-slow", outcome="success") == 1
    broken = {k: v for k, v in after.items() if k[0] == "agentq_model_attempts_total"
              and ("model", "metrics-broken") in k[1]}
    assert sum(broken.values()) == 2 and all(("outcome", "success") not in k[1] for k in broken)
    assert grew("agentq_fallbacks_total") == 2
    costs = sum(Decimal(stack.message(key, t["id"])["cost"]) for t in turns)
    assert costs > 0 and grew("agentq_cost_credits_total", kind="turn") == pytest.approx(float(costs))
    assert grew("agentq_llm_latency_seconds_count", model="metrics-good") == 4
    assert grew("agentq_llm_first_token_seconds_count", model="metrics-good") == 4
    assert grew("agentq_llm_first_token_seconds_bucket", model="metrics-slow", le="0.1") == 0
    assert grew("agentq_llm_first_token_seconds_count", model="metrics-slow") == 1
    assert metric(after, "agentq_turns_in_flight", status="processing") == 0
    assert metric(after, "agentq_turns_in_flight", status="pending") == 0
    assert metric(after, "agentq_queue_depth", queue="turns", state="ready") == 0
    assert metric(after, "agentq_queue_depth", queue="turns", state="delayed") == 0
    assert metric(after, "agentq_dead_letters", queue="turns") == 0


def test_worker_logs_are_json_lines_that_carry_the_turn_id(stack: Stack) -> None:
    """A turn can be followed by its id from the POST to its end: the API's send, the worker's claim, each
    failed attempt and the fallback, and the settlement with its model and cost; an admin test run's send
    carries its id as well."""
    worker = stack.start_worker()
    agent_id = stack.agent(stack.model("logged-down", "echo;fail=503"), stack.model("logged", "echo"))
    _, key = stack.user("logs")
    turn = stack.send(key, stack.conversation(key, agent_id), "log me")
    ended = stack.wait_terminal(key, turn["id"])
    assert ended["status"] == "success"

    records = wait_for(lambda: (about := [r for r in log_records(worker) if r.get("turn_id") == turn["id"]])
                       and "ended" in about[-1]["message"] and about, what="the settlement's log line")
    assert {"time", "level", "logger", "message", "process"} <= set(records[0])
    assert [(r["level"], r["message"]) for r in records] == [
        ("INFO", f"turn {turn['id']} claimed (delivery 1)"),
        ("WARNING", f"model logged-down failed after {records[1]['message'].split(' after ')[1].split(' ms')[0]} "
         "ms (server_error: HTTP 503: Error code: 503 - scripted failure 503); falling back to logged"),
        ("INFO", f"turn {turn['id']} ended success: model logged, cost {ended['cost']}"),
    ]
    assert stack.web is not None
    web_records = log_records(stack.web)
    assert any("Booting worker" in r["message"] for r in web_records)
    assert [r["message"] for r in web_records if r.get("turn_id") == turn["id"]] \
        == [f"turn {turn['id']} sent to queue turns"]

    started = stack.call("POST", f"/api/admin/agents/{agent_id}/debug/execute", json={"content": "log me too"})
    assert started.status_code == 202, started.text
    run_id = started.json()["debug_log_id"]
    web = stack.web
    assert wait_for(lambda: [r["message"] for r in log_records(web) if r.get("debug_log_id") == run_id],
                    what="the test run's send in the API's log") == [f"test run {run_id} sent to queue debug"]
    # Ended here: left running, the module's next worker would take it over and log its fallback too.
    wait_for(lambda: ended_test_run(stack, run_id), what="the test run's end")


def test_an_idle_worker_takes_a_sent_turn_at_once_not_at_its_next_look(stack: Stack) -> None:
    """The doorbell end to end: the API's send rings, the worker process's listener wakes its consumer.

    The only worker left looks at its queue every 30 s on its own, so each turn ending within 15 s
    of its POST was woken by the ring (the first look after boot cannot take the second turn)."""
    for process in stack.workers:
        process.kill_group()
    worker = stack.start_worker(AGENTQ_BROKER_POLL_MS="30000")
    agent_id = stack.agent(stack.model("rung", "echo"))
    _, key = stack.user("rung")
    for index in range(2):
        turn = stack.send(key, stack.conversation(key, agent_id), f"ring {index}")
        assert stack.wait_terminal(key, turn["id"], timeout=15)["status"] == "success"
    assert [line["message"] for line in claims_of(worker, turn["id"])] == [f"turn {turn['id']} claimed (delivery 1)"]


def test_an_admin_test_runs_log_lines_carry_its_id(stack: Stack) -> None:
    """A test run's lines (here its primary's failure and the fallback taken) carried no id, as a turn's carry
    `turn_id`: an operator could not tell which run a line was about."""
    worker = stack.start_worker()
    agent_id = stack.agent(stack.model("refuses-test-runs", "echo;fail=503"), stack.model("answers-test-runs"))
    started = stack.call("POST", f"/api/admin/agents/{agent_id}/debug/execute", json={"content": "hi"})
    assert started.status_code == 202
    run_id = started.json()["debug_log_id"]
    fell_back = wait_for(lambda: [r for r in log_records(worker) if "falling back" in r["message"]],
                         what="the line of the test run's fallback")
    assert [(r.get("debug_log_id"), r.get("turn_id")) for r in fell_back] == [(run_id, None)]
