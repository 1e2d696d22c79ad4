"""A worker process cut off from the database alone takes no turn until it reaches it again
(`app.database_reach`), against real PostgreSQL (reached through a relay the test cuts), Redis, `agentq`
web and worker processes and the mock upstream."""

from __future__ import annotations

import threading

import psycopg
import redis
import sqlalchemy.exc

from app.database_reach import DatabaseReach
from app.db import ping
from tests.stack import Stack, stack_on_shared_redis
from tests.support import Process, TcpRelay, refused_connection, wait_for

FAILED_FOR_AN_OUTAGE = "(a backing service is out of reach)"
"""How a worker logs a delivery that failed because a backing service is out of reach: one line each."""


def states(stack: Stack) -> dict[int, str]:
    """Each listed worker process's state, by pid (`GET /api/admin/workers`)."""
    return {item["pid"]: item["state"] for item in stack.call("GET", "/api/admin/workers").json()["items"]}


def test_a_worker_cut_off_from_its_database_alone_takes_no_turn_until_it_answers_again(
        mock_upstream: Process) -> None:
    """It kept fetching turns only to fail their claims, and won the fetch races over the busy healthy worker
    too, so turns waited in retries for a healthy worker to win one. Here it fails the one turn it took when
    the database went, and no other, while the healthy worker runs all twenty-one; once the database answers
    its probe it runs turns again. The workers' list says which it is."""
    with stack_on_shared_redis("cut-off", AGENTQ_MIN_BACKOFF_MS="100", AGENTQ_MAX_BACKOFF_MS="1000",
                               AGENTQ_MAX_ACTIVE_CONVERSATIONS="100", AGENTQ_DEDUP_WINDOW_SECONDS="0") as stack:
        stack.init().start_web()
        relay = TcpRelay(5432)
        try:
            through_relay = stack.database_url.replace(":5432/", f":{relay.port}/")
            cut_off = stack.start_worker(threads=2, DATABASE_URL=through_relay)
            agent = stack.agent(stack.model("primary"))
            _, key = stack.user("ada")
            conversations = [stack.conversation(key, agent) for _ in range(24)]

            relay.cut()
            first = stack.send(key, conversations[0], "the first, taken by the cut-off worker")
            wait_for(lambda: "takes no new run" in cut_off.output(), timeout=30,
                     what="the cut-off worker to stop taking runs")
            wait_for(lambda: states(stack) == {pid: "database_cut_off" for pid in cut_off.children()},
                     what="the workers' list to say it is cut off")
            assert '\nagentq_worker_processes{state="database_cut_off"} 1.0\n' in stack.http.get("/metrics").text
            healthy = stack.start_worker(threads=2)
            while_cut = [first] + [stack.send(key, conversation, f"turn {index}")
                                   for index, conversation in enumerate(conversations[1:21])]
            assert [stack.wait_terminal(key, m["id"])["status"] for m in while_cut] == ["success"] * 21
            failed = [line for line in cut_off.output().splitlines() if FAILED_FOR_AN_OUTAGE in line]
            assert len(failed) == 1 and "[WARNING]" in failed[0] and f"[turn {first['id']}]" in failed[0], failed

            healthy.stop()
            after = [stack.send(key, conversation, "after") for conversation in conversations[21:]]
            relay.mend()
            assert [stack.wait_terminal(key, m["id"])["status"] for m in after] == ["success"] * 3
            assert "the database answers again: this worker process takes runs again" in cut_off.output()
            wait_for(lambda: states(stack) == {pid: "taking_runs" for pid in cut_off.children()},
                     what="the workers' list to say it takes runs again")
            counted = stack.http.get("/metrics").text
            assert "\nagentq_worker_database_cut_offs_total 1.0\n" in counted, counted
            assert cut_off.output().count(FAILED_FOR_AN_OUTAGE) == 1
        finally:
            relay.cut()


def test_only_a_database_out_of_reach_stops_the_fetching_and_an_answered_probe_lifts_it(database: str) -> None:
    """A lost Redis stops a consumer's fetches by itself, a full pool is a busy process whose database answers,
    and a bug or a refused statement is no reason to stop: none marks the process. A refused connection does,
    until the probe (a real one, to the test database, which answers once the test lets it) lifts the mark;
    once the process is stopping, nothing marks it."""
    let_probe = threading.Event()

    def probe_when_let() -> None:
        let_probe.wait()
        ping()

    reach = DatabaseReach(probe_when_let, interval=0.05)
    try:
        for error in (redis.ConnectionError("Redis is gone"), redis.TimeoutError(), ValueError("a bug"),
                      sqlalchemy.exc.TimeoutError("QueuePool limit of size 10 overflow 0 reached"),
                      sqlalchemy.exc.OperationalError("SELECT 1", {}, psycopg.errors.DeadlockDetected())):
            reach.failed(error)
            assert not reach.cut_off(), error
        refused = sqlalchemy.exc.OperationalError("SELECT 1", {}, refused_connection())
        reach.failed(refused)
        assert reach.cut_off()
        let_probe.set()
        wait_for(lambda: not reach.cut_off(), timeout=10, what="the probe to lift the mark")
    finally:
        reach.stop()
    reach.failed(refused)
    assert not reach.cut_off()

