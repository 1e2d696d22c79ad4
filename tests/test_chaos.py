"""Chaos: a few hundred turns while workers are SIGKILLed, Redis is flushed and PostgreSQL restarts.

Everything is real and this test's own: a throwaway PostgreSQL cluster (initdb + pg_ctl, as the
`postgres` OS user, on a free port), the test Redis database, an `agentq web` with two gunicorn
workers and two `agentq worker --processes 2` groups, which start again when one of their processes is
killed. Clients submit through HTTP and retry with an Idempotency-Key when a request fails during a
restart. At the end every turn must have succeeded and been charged exactly once, every balance must
equal its ledger, and no Redis lock or slot may be left held. Run by `make test-chaos`.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import REDIS_DB, UpstreamLog
from tests.stack import SharedRedis, Stack
from tests.support import Process, free_port, wait_for

PG_BIN = Path("/usr/lib/postgresql/15/bin")
USERS = 40
TURNS_PER_USER = 5
BALANCE = Decimal("10")
UPSTREAM = "echo;ttft=0.2;gap=0.02"
RESTARTED = "starting the group again"
CONTENT = "please answer this message with a few words so that the stream takes a little while"
DEADLINE_SECONDS = 150

pytestmark = pytest.mark.chaos


class Postgres:
    """A PostgreSQL cluster in a temporary directory owned by `postgres`, on a port of its own."""

    def __init__(self) -> None:
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="agentq-chaos-pg-"))
        self.data = self.root / "data"
        shutil.chown(self.root, "postgres", "postgres")

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _as_postgres(self, *argv: str) -> None:
        subprocess.run(["runuser", "-u", "postgres", "--", *argv], check=True, capture_output=True, timeout=120)

    def init(self) -> Postgres:
        self._as_postgres(str(PG_BIN / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres",
                          "--no-sync")
        return self

    def start(self) -> None:
        options = (f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c max_connections=400 "
                   "-c fsync=off -c synchronous_commit=off -c full_page_writes=off")
        self._as_postgres(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-o", options,
                          "-l", str(self.root / "postgres.log"), "-w", "start")

    def stop(self, mode: str = "fast") -> None:
        self._as_postgres(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop")

    def destroy(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)

    @contextlib.contextmanager
    def frozen(self) -> Iterator[None]:
        """The server's processes stopped (SIGSTOP), this cluster's alone: a server that says nothing while its
        host's kernel still accepts and acknowledges, as a storage stall or a paused VM leaves it."""
        postmaster = int((self.data / "postmaster.pid").read_text().split()[0])
        children = subprocess.run(["pgrep", "-P", str(postmaster)], capture_output=True, text=True).stdout.split()
        pids = [postmaster, *map(int, children)]
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        try:
            yield
        finally:
            for pid in pids:
                os.kill(pid, signal.SIGCONT)


@pytest.fixture(scope="module")
def postgres() -> Iterator[Postgres]:
    server = Postgres().init()
    server.start()
    yield server
    server.destroy()


@pytest.fixture(scope="module")
def redis_db(redis_client: Any) -> SharedRedis:
    """The test Redis database: flushed here, and once more on purpose during the run (never FLUSHALL)."""
    redis_client.flushdb()
    return SharedRedis(f"redis://127.0.0.1:6379/{REDIS_DB}")


CHAOS_ENV = {
    "AGENTQ_LEASE_SECONDS": "3",
    "AGENTQ_RECOVERY_INTERVAL_SECONDS": "1",
    "AGENTQ_BROKER_HEARTBEAT_MS": "5000",
    "AGENTQ_MAX_RETRIES": "20",
    "AGENTQ_MIN_BACKOFF_MS": "200",
    "AGENTQ_MAX_BACKOFF_MS": "2000",
    "AGENTQ_SHUTDOWN_GRACE_SECONDS": "5",
    "AGENTQ_MAX_DELIVERIES": "10",
    "AGENTQ_DB_POOL_SIZE": "5",
}


class Client(threading.Thread):
    """One user sending its turns one after another, retrying through outages with an Idempotency-Key."""

    def __init__(self, base_url: str, key: str, agent_id: int, turns: int, stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.http = httpx.Client(base_url=base_url, timeout=10, headers={"Authorization": f"Bearer {key}"})
        self.agent_id, self.turns, self.stop = agent_id, turns, stop
        self.sent: list[int] = []
        self.final: dict[int, dict[str, Any]] = {}
        self.retries = 0
        self.failure: str | None = None

    def _call(self, method: str, path: str, ok: tuple[int, ...], **kwargs: Any) -> dict[str, Any]:
        while not self.stop.is_set():
            try:
                response = self.http.request(method, path, **kwargs)
                if response.status_code in ok:
                    return response.json()
                if response.status_code < 500:
                    raise AssertionError(f"{method} {path}: {response.status_code} {response.text}")
            except httpx.HTTPError:
                pass
            self.retries += 1
            time.sleep(0.3)
        raise TimeoutError(f"{method} {path} gave up")

    def run(self) -> None:
        try:
            conversation = self._call("POST", "/api/conversations", (200, 201), json={"agent_id": self.agent_id})
            for n in range(self.turns):
                accepted = self._call("POST", f"/api/conversations/{conversation['id']}/messages", (202,),
                                      json={"content": f"{CONTENT} #{n}"},
                                      headers={"Idempotency-Key": uuid.uuid4().hex})
                turn_id = accepted["assistant_message"]["id"]
                self.sent.append(turn_id)
                while True:
                    message = self._call("GET", f"/api/messages/{turn_id}", (200,))
                    if message["status"] not in ("pending", "processing"):
                        self.final[turn_id] = message
                        break
                    time.sleep(0.4)
        except Exception as exc:
            self.failure = f"{type(exc).__name__}: {exc}"
        finally:
            self.http.close()


def _fully_up(group: Process) -> bool:
    """Both processes of every start of this group are ready (a killed one's group logs its restart)."""
    output = group.output()
    starts = 1 + output.count(RESTARTED)
    running = [pid for pid in group.children() if not _exited(pid)]
    return output.count("Worker process is ready") >= 2 * starts and len(running) == 2


def _exited(pid: int) -> bool:
    """A killed process stays its parent's child, a zombie, until the parent reaps it (Dramatiq's within a second)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in "ZX"
    except OSError:
        return True


class Chaos(threading.Thread):
    """Kills worker processes at random moments (their group starts again), flushes Redis once, restarts
    PostgreSQL once, until the clients are done."""

    def __init__(self, stack: Stack, postgres: Postgres, redis: SharedRedis, done: threading.Event) -> None:
        super().__init__(daemon=True)
        self.stack, self.postgres, self.redis, self.done = stack, postgres, redis, done
        self.events: list[str] = []
        self.error: str | None = None
        self.rng = random.Random()

    def _kill_a_worker(self) -> None:
        """SIGKILL one process of a group that is fully up; Dramatiq stops the group and `agentq worker` starts it
        again."""
        live = wait_for(lambda: [p for p in self.stack.workers if _fully_up(p)], timeout=60, interval=0.2,
                        what="a worker group that is up")
        victim = self.rng.choice([pid for pid in self.rng.choice(live).children() if not _exited(pid)])
        os.kill(victim, signal.SIGKILL)
        self.events.append(f"SIGKILL worker process {victim}")

    def _flush_redis(self) -> None:
        self.redis.client().flushdb()
        self.events.append("FLUSHDB of the Redis database")

    def _restart_postgres(self) -> None:
        self.postgres.stop("fast")
        self.postgres.start()
        self.events.append("PostgreSQL restarted")

    def run(self) -> None:
        plan = [self._kill_a_worker, self._kill_a_worker, self._flush_redis, self._kill_a_worker,
                self._restart_postgres, self._kill_a_worker, self._kill_a_worker]
        try:
            for action in plan:
                if self.done.wait(self.rng.uniform(0.5, 2.0)):
                    return
                action()
        except Exception as exc:
            self.error = f"{type(exc).__name__}: {exc}"


@pytest.mark.timeout(300)
def test_turns_survive_killed_workers_a_flushed_redis_and_a_postgres_restart(postgres: Postgres,
                                                                          redis_db: SharedRedis,
                                                                          mock_upstream: Process) -> None:
    started = time.monotonic()
    stack = Stack("chaos", postgres.url, redis_db, **CHAOS_ENV).init()
    try:
        stack.start_web(web_workers=2)
        for _ in range(2):
            stack.start_worker(processes=2, threads=8)
        agent_id = stack.agent(stack.model("chaos-model", UPSTREAM))
        users = [stack.user(f"user-{i}", str(BALANCE)) for i in range(USERS)]

        stop, done = threading.Event(), threading.Event()
        clients = [Client(stack.base_url, key, agent_id, TURNS_PER_USER, stop) for _, key in users]
        chaos = Chaos(stack, postgres, redis_db, done)
        for client in clients:
            client.start()
        chaos.start()
        for client in clients:
            client.join(timeout=max(1.0, DEADLINE_SECONDS - (time.monotonic() - started)))
        done.set()
        stop.set()
        chaos.join(timeout=60)
        report(stack, redis_db, users, clients, chaos, started)
    finally:
        stack.stop()


@pytest.mark.timeout(180)
def test_runs_sent_during_a_database_outage_wait_it_out_in_redis_instead_of_dying(
        postgres: Postgres, redis_db: SharedRedis, mock_upstream: Process) -> None:
    """A worker that cannot reach PostgreSQL fails every claim at once. With `AGENTQ_MAX_RETRIES` (2 here,
    backoff 0.2-1 s) a restart of a few seconds dead-lettered every run taken meanwhile, and, the database
    being down, could not even end them: they waited for the stale-pending rule. An outage's errors got
    `AGENTQ_OUTAGE_RETRIES` instead, each a failed delivery and a warning line; now a worker that finds its
    database out of reach, here at its boot, takes no run until the database answers its probe
    (`app.database_reach`): the runs wait in Redis through the outage, none fails a delivery, none is retried
    or dead, and each is answered once the database is back, at its first delivery."""
    stack = Stack("outage", postgres.url, redis_db, AGENTQ_MAX_RETRIES="2", AGENTQ_OUTAGE_RETRIES="60",
                  AGENTQ_MIN_BACKOFF_MS="200", AGENTQ_MAX_BACKOFF_MS="1000", AGENTQ_LEASE_SECONDS="3",
                  AGENTQ_RECOVERY_INTERVAL_SECONDS="1").init()
    try:
        stack.start_web(web_workers=1)
        agent_id = stack.agent(stack.model("outage-model", "echo"))
        turns = []
        for i in range(4):
            _, key = stack.user(f"outage-user-{i}")
            turns.append((key, stack.send(key, stack.conversation(key, agent_id), "through the outage")["id"]))
        postgres.stop("fast")
        try:
            worker = stack.start_worker(processes=1, threads=4)
            wait_for(lambda: "takes no new run" in worker.output(), timeout=30,
                     what="the worker to find its database out of reach")
            time.sleep(3)  # the outage's length is what is tested: past every backoff AGENTQ_MAX_RETRIES allows
        finally:
            postgres.start()
        for key, message_id in turns:
            assert stack.wait_terminal(key, message_id, timeout=60)["status"] == "success"
        ids = [message_id for _, message_id in turns]
        assert stack.sql("SELECT count(*) FROM dead_letters WHERE run_id = ANY(%(ids)s)", {"ids": ids}) == [(0,)]
        assert stack.sql("SELECT deliveries, count(*) FROM turns WHERE assistant_message_id = ANY(%(ids)s) "
                         "GROUP BY deliveries", {"ids": ids}) == [(1, 4)]
        said = worker.output()
        assert [phrase in said for phrase in ("Failed to process message", "Retrying message", "Retries exceeded",
                                              "Traceback", "[ERROR]")] == [False] * 5, said[-3000:]
        assert "the database answers again: this worker process takes runs again" in said
    finally:
        stack.stop()


@pytest.mark.timeout(120)
def test_a_database_that_stops_answering_makes_requests_503_not_hang(postgres: Postgres, redis_db: SharedRedis) -> None:
    """A frozen server acknowledges what is sent and answers keepalives, so no TCP bound fires: every request of
    the API and `/readyz` waited for as long as it stayed frozen (a hunt froze it for 90 s, and they answered 200
    after 88 s). Each wait for the server's answer is bounded now (AGENTQ_DB_ANSWER_TIMEOUT_SECONDS, `/readyz` by
    the connect timeout): both answer 503 while it is frozen, and serve again once it answers."""
    stack = Stack("silent-db", postgres.url, redis_db, AGENTQ_DB_ANSWER_TIMEOUT_SECONDS="2",
                  AGENTQ_DB_CONNECT_TIMEOUT_SECONDS="2").init()
    try:
        stack.start_web(web_workers=1)
        _, key = stack.user("silent-db")
        assert stack.call("GET", "/api/conversations", key).status_code == 200
        with postgres.frozen():
            started = time.monotonic()
            listed = stack.call("GET", "/api/conversations", key)
            listing_took = time.monotonic() - started
            started = time.monotonic()
            ready = stack.call("GET", "/readyz")
            probe_took = time.monotonic() - started
        assert (listed.status_code, listed.json()["error"]["code"], listed.headers.get("Retry-After")) == (
            503, "service_unavailable", "1"), listed.text
        assert listing_took < 15, listing_took
        assert (ready.status_code, ready.json()["checks"]["redis"]) == (503, "ok"), ready.text
        assert ready.json()["checks"]["database"] != "ok"
        assert probe_took < 15, probe_took
        wait_for(lambda: stack.call("GET", "/readyz").status_code == 200, timeout=30, what="the API ready again")
        assert stack.call("GET", "/api/conversations", key).status_code == 200
    finally:
        stack.stop()


ENDS_IN_OUTAGE = "echo;ttft=0.2;gap=0.2;words=12"
STREAMS_THROUGH_OUTAGE = "echo;ttft=0.2;gap=0.5;words=20"


@pytest.mark.timeout(150)
def test_a_database_outage_longer_than_a_lease_makes_no_turn_call_its_model_twice(
        postgres: Postgres, redis_db: SharedRedis, upstream: UpstreamLog) -> None:
    """Six turns are streaming when PostgreSQL stops for two leases. Three answers end during the outage:
    their settlement waits the outage out instead of raising into a retry that took the turn over and
    called the model again. Three stream on past it: their workers renew their leases once the database is
    back, before the recovery sweeps (two processes, one a second) take any lease over, which they do only
    after the database has answered them for a renewal period. Each model is called once per turn, each
    turn is delivered and charged once."""
    stack = Stack("outage-once", postgres.url, redis_db, AGENTQ_LEASE_SECONDS="2",
                  AGENTQ_RECOVERY_INTERVAL_SECONDS="1", AGENTQ_MIN_BACKOFF_MS="200",
                  AGENTQ_MAX_BACKOFF_MS="1000").init()
    try:
        stack.start_web(web_workers=1)
        stack.start_worker(processes=2, threads=4)
        ending = stack.agent(stack.model("ends-in-outage", ENDS_IN_OUTAGE))
        streaming = stack.agent(stack.model("streams-through-outage", STREAMS_THROUGH_OUTAGE))
        turns = []
        for i, agent_id in enumerate([ending] * 3 + [streaming] * 3):
            _, key = stack.user(f"outage-once-{i}")
            turns.append((key, stack.send(key, stack.conversation(key, agent_id), f"through the outage {i}")["id"]))
        wait_for(lambda: len(upstream.requests()) == 6, timeout=30, what="each turn's model call")
        postgres.stop("fast")
        try:
            time.sleep(4)  # the outage's length is what is tested: two leases, so every lease runs out
        finally:
            postgres.start()
        ended = [stack.wait_terminal(key, message_id, timeout=60) for key, message_id in turns]
        words = [" ".join(f"w{i}" for i in range(n)) for n in (12, 20)]
        assert [(m["status"], m["content"]) for m in ended] == [("success", words[0])] * 3 + [("success", words[1])] * 3
        calls = Counter(upstream.models())
        assert calls == {ENDS_IN_OUTAGE: 3, STREAMS_THROUGH_OUTAGE: 3}
        ids = [message_id for _, message_id in turns]
        assert stack.sql("SELECT deliveries, count(*) FROM turns WHERE assistant_message_id = ANY(%(ids)s) "
                         "GROUP BY deliveries", {"ids": ids}) == [(1, 6)]
        assert stack.sql("SELECT count(DISTINCT message_id), count(*) FROM credit_transactions "
                         "WHERE message_id = ANY(%(ids)s)", {"ids": ids}) == [(6, 6)]
    finally:
        stack.stop()


FAILS_LATE = "echo;hang_headers=3;fail=500"
ANSWERS_LATE = "echo;ttft=4"


@pytest.mark.timeout(150)
def test_a_switch_to_the_fallback_during_a_database_outage_is_made_once(postgres: Postgres, redis_db: SharedRedis,
                                                                       upstream: UpstreamLog) -> None:
    """The contract's guarantee 6: a run switches to its fallback once. The switch is recorded before the
    fallback's call, so that a delivery taking the run over (its worker killed during that call) calls the
    fallback alone.
    With PostgreSQL down when the primary failed, the record failed and the fallback was called all the same:
    the worker killed then, the takeover called the primary again and switched a second time. The worker now
    waits the outage out before the fallback's call; killed while waiting, it has called no fallback, and the
    takeover's switch is the run's only one."""
    stack = Stack("fallback-outage", postgres.url, redis_db, AGENTQ_LEASE_SECONDS="2",
                  AGENTQ_RECOVERY_INTERVAL_SECONDS="1").init()
    try:
        stack.start_web(web_workers=1)
        worker = stack.start_worker(processes=1, threads=2)
        agent_id = stack.agent(stack.model("fails-late", FAILS_LATE), stack.model("answers-late", ANSWERS_LATE))
        _, key = stack.user("falls-back-once")
        turn = stack.send(key, stack.conversation(key, agent_id), "switch once")
        wait_for(lambda: upstream.models() == [FAILS_LATE], timeout=30, what="the primary's call")
        postgres.stop("fast")
        try:
            wait_for(lambda: ANSWERS_LATE in upstream.models()
                     or "switched to its fallback: a backing service is out of reach" in worker.output(),
                     timeout=30, what="the primary's failure, then the fallback's call or the wait for the database")
            worker.kill_group()
        finally:
            postgres.start()
        stack.start_worker(processes=1, threads=2)
        done = stack.wait_terminal(key, turn["id"], timeout=60)
        assert (done["status"], done["model"], done["content"]) == ("success", "answers-late", "echo: switch once")
        assert Counter(upstream.models()) == {FAILS_LATE: 2, ANSWERS_LATE: 1}
    finally:
        stack.stop()


@pytest.mark.timeout(120)
def test_a_stream_reader_waits_a_database_outage_out(postgres: Postgres, redis_db: SharedRedis,
                                                     mock_upstream: Process) -> None:
    """A reader whose turn sends nothing for a while looks at the database to see whether it ended; with the
    database down that look raised and ended the response without `done`, and a browser's EventSource
    does not reopen a stream whose reconnect is answered 503. The reader now waits the outage out."""
    import json

    stack = Stack("stream-outage", postgres.url, redis_db, AGENTQ_STREAM_HEARTBEAT_SECONDS="1",
                  AGENTQ_LEASE_SECONDS="30").init()
    try:
        stack.start_web(web_workers=1)
        stack.start_worker(processes=1, threads=2)
        _, key = stack.user("reader")
        agent_id = stack.agent(stack.model("silent-model", "echo;ttft=6;words=5"))
        message_id = stack.send(key, stack.conversation(key, agent_id), "wait for it")["id"]
        stack.wait_status(key, message_id, ("processing",))
        connected, lines = threading.Event(), []

        def follow() -> None:
            with httpx.stream("GET", f"{stack.base_url}/api/messages/{message_id}/stream", timeout=60,
                              headers={"Authorization": f"Bearer {key}"}) as response:
                assert response.status_code == 200
                for line in response.iter_lines():
                    lines.append(line)
                    if line.startswith("event: "):
                        connected.set()  # the first event: the stream has read the stored message

        reader = threading.Thread(target=follow, daemon=True)
        reader.start()
        assert connected.wait(10)
        postgres.stop("fast")
        try:
            time.sleep(3)  # the outage's length: the reader looks at the database every second meanwhile
        finally:
            postgres.start()
        reader.join(timeout=60)
        events = [line.removeprefix("event: ") for line in lines if line.startswith("event: ")]
        assert events[-1:] == ["done"], events
        done = json.loads([line for line in lines if line.startswith("data: ")][-1].removeprefix("data: "))
        deltas = "".join(json.loads(line.removeprefix("data: "))["text"] for line, kind in zip(
            [line for line in lines if line.startswith("data: ")], events, strict=True) if kind == "delta")
        assert done["status"] == "success" and deltas == done["content"] == "w0 w1 w2 w3 w4"
    finally:
        stack.stop()


def report(stack: Stack, redis: SharedRedis, users: list[tuple[int, str]],
           clients: list[Client], chaos: Chaos, started: float) -> None:
    unfinished = stack.sql(
        "SELECT t.assistant_message_id, m.status, t.deliveries, t.lease_expires_at, t.enqueued_at, m.updated_at, "
        "now() FROM turns t JOIN conversation_messages m ON m.id = t.assistant_message_id "
        "WHERE m.status IN ('pending', 'processing')")
    for row in unfinished:
        print(f"chaos: unfinished turn {row}")
    failures = [c.failure for c in clients if c.failure or c.is_alive()]
    assert failures == [], failures
    assert chaos.error is None
    turn_ids = [t for c in clients for t in c.sent]
    statuses = Counter(m["status"] for c in clients for m in c.final.values())
    rows = stack.sql("SELECT m.status, count(*) FROM conversation_messages m WHERE m.role = 'assistant' "
                     "GROUP BY m.status")
    charges = dict(stack.sql("SELECT message_id, count(*) FROM credit_transactions WHERE message_id IS NOT NULL "
                             "GROUP BY message_id"))
    balances = stack.sql(
        "SELECT u.id, u.balance, u.reserved, COALESCE(sum(t.amount), 0) FROM users u "
        "LEFT JOIN credit_transactions t ON t.user_id = u.id WHERE NOT u.is_admin GROUP BY u.id")
    deliveries = Counter(d for (d,) in stack.sql("SELECT deliveries FROM turns"))
    client = redis.client()
    locks = list(client.scan_iter(f"{stack.key_prefix}:conversation:*:lock"))
    held_slots = {k: client.zcard(k) for k in client.scan_iter(f"{stack.key_prefix}:user:*:slots")
                  if client.zcard(k)}

    print(f"\nchaos: {len(turn_ids)} turns from {len(users)} users in {time.monotonic() - started:.1f}s; "
          f"events: {chaos.events}")
    print(f"chaos: statuses {dict(statuses)}; database {dict(rows)}; deliveries per turn {dict(deliveries)}; "
          f"client retries {sum(c.retries for c in clients)}")
    print(f"chaos: charged once {sum(1 for t in turn_ids if charges.get(t) == 1)}/{len(turn_ids)}; "
          f"balances equal to ledger {sum(1 for _, b, r, s in balances if b == s and r == 0)}/{len(balances)}; "
          f"locks left {len(locks)}; slots left {sum(held_slots.values())}")

    assert len(turn_ids) == len(set(turn_ids)) == USERS * TURNS_PER_USER
    assert statuses == Counter({"success": USERS * TURNS_PER_USER})
    assert dict(rows) == {"success": USERS * TURNS_PER_USER}
    assert all(charges.get(t) == 1 for t in turn_ids)
    assert sum(charges.values()) == len(turn_ids)
    assert len(balances) == USERS
    assert all(balance == ledger and reserved == 0 for _, balance, reserved, ledger in balances)
    costs = {user_id: sum((Decimal(m["cost"]) for m in c.final.values()), Decimal(0))
             for (user_id, _), c in zip(users, clients, strict=True)}
    assert all(cost > 0 for cost in costs.values())
    assert {user_id: balance for user_id, balance, _, _ in balances} == {u: BALANCE - c for u, c in costs.items()}
    assert locks == []
    assert held_slots == {}
    kills = len([e for e in chaos.events if e.startswith("SIGKILL")])
    assert kills >= 3
    wait_for(lambda: sum(group.output().count(RESTARTED) for group in stack.workers) == kills, timeout=60,
             what="each group whose process was killed to log its restart (after its survivors stopped)")
    assert all(group.popen is not None and group.popen.poll() is None for group in stack.workers)
    assert "FLUSHDB of the Redis database" in chaos.events and "PostgreSQL restarted" in chaos.events
