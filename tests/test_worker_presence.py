"""The worker processes alive, as `GET /api/admin/workers` lists them (`app.worker_presence`), against real
`agentq worker` groups, `agentq web`, PostgreSQL, Redis and the mock upstream."""

from __future__ import annotations

import json
import os
import signal
from typing import Any

from tests.stack import Stack, stack_on_shared_redis
from tests.support import Process, wait_for

SLOW_ANSWER = "echo;words=100;gap=0.1"
"""Ten seconds of streaming (within the tests' shutdown grace): a run a test can see held, and stopping."""


def listed(stack: Stack) -> list[dict[str, Any]]:
    response = stack.call("GET", "/api/admin/workers")
    assert response.status_code == 200, response.text
    return response.json()["items"]


def test_the_workers_list_shows_what_each_live_process_holds_and_drops_a_dead_or_stopped_one(
        mock_upstream: Process) -> None:
    """Each process of each group is listed with its threads and the runs it holds; one SIGKILLed leaves the
    list once its presence expires (6 s), one stopped says `stopping` while it finishes its run and leaves the
    list as it exits. A presence this release cannot read is left out, and an id whose presence expired is
    dropped. `agentq workers` prints the same list from a shell."""
    with stack_on_shared_redis("presence") as stack:
        stack.init().start_web()
        pair = stack.start_worker(processes=2, threads=3)
        single = stack.start_worker(processes=1, threads=2)
        every = wait_for(lambda: len(items := listed(stack)) == 3 and items, what="three worker processes listed")
        assert sorted((item["pid"], item["threads"], item["running"], item["state"]) for item in every) == sorted(
            [(pid, 3, 0, "taking_runs") for pid in pair.children()]
            + [(pid, 2, 0, "taking_runs") for pid in single.children()])
        assert len({item["instance"] for item in every}) == 3
        assert {item["host"] for item in every} == {os.uname().nodename}

        # Another release's presence, and an id whose presence expired: neither fails the list or the metrics.
        client = stack.redis.client()
        client.set(f"{stack.key_prefix}:worker:other-release", b'{"id": "other-release", "state": "resting"}')
        client.sadd(f"{stack.key_prefix}:workers", "other-release", "expired")
        assert sorted(item["pid"] for item in listed(stack)) == sorted(pair.children() + single.children())
        assert not client.sismember(f"{stack.key_prefix}:workers", "expired")
        assert '\nagentq_worker_processes{state="taking_runs"} 3.0\n' in stack.http.get("/metrics").text
        client.delete(f"{stack.key_prefix}:worker:other-release")

        printed = json.loads(stack.run("workers").stdout)["items"]
        assert sorted(item["pid"] for item in printed) == sorted(pair.children() + single.children())

        single.kill_group()
        wait_for(lambda: sorted(item["pid"] for item in listed(stack)) == sorted(pair.children()), timeout=15,
                 what="the killed process to leave the list once its presence expired")

        _, key = stack.user("watcher")
        answer = stack.send(key, stack.conversation(key, stack.agent(stack.model("slow", SLOW_ANSWER))), "hold it")
        holder = wait_for(lambda: next((item for item in listed(stack) if item["running"] == 1), None),
                          what="the process holding the turn to say so")
        os.killpg(pair.pid, signal.SIGTERM)
        stopping = wait_for(lambda: next((item for item in listed(stack) if item["state"] == "stopping"
                                          and item["pid"] == holder["pid"]), None), what="the holder to say it stops")
        assert stopping["running"] == 1
        assert stack.wait_terminal(key, answer["id"])["status"] == "success"
        assert pair.popen is not None and pair.popen.wait(timeout=30) == 0
        assert listed(stack) == []
