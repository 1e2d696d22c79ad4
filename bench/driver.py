"""Driving turns through the HTTP API like clients do, and noticing their end without touching the API.

Clients POST over keep-alive connections (one per client thread) and time each POST. The end of a
turn is read from the database by one watcher thread (as the bench's own role, so neither the web
processes' CPU nor the application's statement counts include the waiting).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import httpx
import psycopg

from bench.deploy import Deployment, turn_content
from bench.procs import BenchError

IN_FLIGHT = ("pending", "processing")


@dataclass
class Posted:
    message_id: int
    posted_at: float
    """Wall-clock time (time.time()) the POST was sent."""
    latency_ms: float


@dataclass
class Intake:
    posted: list[Posted] = field(default_factory=list)
    refused: int = 0
    first_post_at: float = 0.0
    last_post_done_at: float = 0.0

    @property
    def latencies(self) -> list[float]:
        return [p.latency_ms for p in self.posted]

    @property
    def ids(self) -> list[int]:
        return [p.message_id for p in self.posted]

    @property
    def rate(self) -> float:
        span = self.last_post_done_at - self.first_post_at
        return len(self.posted) / span if span > 0 else float("nan")


class TurnWatcher:
    """Polls the database for turns that reached a terminal status and wakes whoever waits on them."""

    def __init__(self, dep: Deployment, interval: float = 0.01) -> None:
        self._conn = psycopg.connect(dep.pg.url(database="agentq"), autocommit=True)
        self._interval = interval
        self._waiting: dict[int, threading.Event] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="turn-watcher", daemon=True)
        self._thread.start()

    def expect(self, message_id: int) -> threading.Event:
        event = threading.Event()
        with self._lock:
            self._waiting[message_id] = event
        return event

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            with self._lock:
                ids = list(self._waiting)
            if not ids:
                continue
            rows = self._conn.execute(
                "SELECT id FROM conversation_messages WHERE id = ANY(%s) AND status NOT IN ('pending', 'processing')",
                (ids,),
            ).fetchall()
            with self._lock:
                for (ident,) in rows:
                    event = self._waiting.pop(ident, None)
                    if event is not None:
                        event.set()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._conn.close()


def post_turn(http: httpx.Client, key: str, conversation_id: int, tag: str) -> tuple[int, float, float]:
    """POST one turn; returns (assistant message id, wall time sent, latency in ms)."""
    sent_at = time.time()
    started = time.perf_counter()
    response = http.post(f"/api/conversations/{conversation_id}/messages", json={"content": turn_content(tag)},
                         headers={"Authorization": f"Bearer {key}"})
    latency = (time.perf_counter() - started) * 1000
    if response.status_code != 202:
        raise BenchError(f"POST messages answered {response.status_code}: {response.text[:300]}")
    return response.json()["assistant_message"]["id"], sent_at, latency


def work_items(dep: Deployment, conversations: dict[int, list[int]], turns: int) -> Iterator[tuple[str, int]]:
    """(api key, conversation id) pairs, one conversation per turn, users taken in turn."""
    keys = dict(dep.seed.users)
    queues = [(keys[user], iter(ids)) for user, ids in conversations.items()]
    given = 0
    while given < turns:
        for key, ids in queues:
            conversation = next(ids, None)
            if conversation is None:
                raise BenchError("the bench made too few conversations for its turns")
            yield key, conversation
            given += 1
            if given == turns:
                return


def run_clients(dep: Deployment, work: Iterator[tuple[str, int]], clients: int, name: str,
                one: Callable[[httpx.Client, str, int], None]) -> None:
    """Run `one(http, api key, conversation)` for each work item, from `clients` threads with a keep-alive
    connection each; the first error stops every client and is raised here."""
    lock = threading.Lock()
    errors: list[BaseException] = []

    def client() -> None:
        with httpx.Client(base_url=dep.web_url, timeout=60) as http:
            while not errors:
                with lock:
                    item = next(work, None)
                if item is None:
                    return
                try:
                    one(http, *item)
                except BaseException as exc:
                    errors.append(exc)
                    return

    threads = [threading.Thread(target=client, name=f"{name}-{i}") for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]


def drive(dep: Deployment, conversations: dict[int, list[int]], turns: int, clients: int, *,
          wait: TurnWatcher | None, timeout: float = 300.0) -> Intake:
    """POST `turns` turns from `clients` threads; with `wait`, each client waits for its turn's end first
    (a closed loop: `clients` turns in flight), else clients POST back to back."""
    intake = Intake()
    intake_lock = threading.Lock()
    deadline = time.monotonic() + timeout

    def one(http: httpx.Client, key: str, conversation: int) -> None:
        message_id, sent_at, latency = post_turn(http, key, conversation, f"c{conversation}")
        done = wait.expect(message_id) if wait is not None else None
        with intake_lock:
            intake.posted.append(Posted(message_id, sent_at, latency))
            intake.first_post_at = min(intake.first_post_at or sent_at, sent_at)
            intake.last_post_done_at = max(intake.last_post_done_at, sent_at + latency / 1000)
        if done is not None and not done.wait(max(0.0, deadline - time.monotonic())):
            raise BenchError(f"turn {message_id} did not end within {timeout:g}s")

    run_clients(dep, work_items(dep, conversations, turns), clients, "client", one)
    return intake


def wait_all_terminal(dep: Deployment, ids: list[int], timeout: float) -> None:
    """Poll until no turn of `ids` is in flight. The times a run reports come from the database (`ends`), not
    from this loop, so it polls slowly: each poll looks up every id, and its CPU competes with the run."""
    deadline = time.monotonic() + timeout
    while True:
        left = dep.sql("SELECT count(*) FROM conversation_messages WHERE id = ANY(%s) "
                       "AND status IN ('pending', 'processing')", (ids,))[0][0]
        if left == 0:
            return
        if time.monotonic() > deadline:
            raise BenchError(f"{left} of {len(ids)} turns still in flight after {timeout:g}s")
        time.sleep(0.25)


def ends(dep: Deployment, ids: list[int]) -> dict[str, object]:
    """Statuses of the turns, and when they started executing and ended (database clock, epoch seconds)."""
    statuses = dict(dep.sql("SELECT status, count(*) FROM conversation_messages WHERE id = ANY(%s) GROUP BY status",
                            (ids,)))
    first_start, last_end = dep.sql(
        "SELECT extract(epoch FROM min(updated_at - make_interval(secs => coalesce(latency_ms, 0) / 1000.0))), "
        "extract(epoch FROM max(updated_at)) FROM conversation_messages WHERE id = ANY(%s)", (ids,))[0]
    return {"statuses": statuses, "first_start": float(first_start), "last_end": float(last_end)}


def upstream_arrivals(dep: Deployment, prefix: str) -> dict[str, float]:
    """When the upstream received each chat request, by the tag (`turn_content`) of turns tagged `prefix…`."""
    arrived: dict[str, float] = {}
    for request in httpx.get(f"{dep.mock_url}/_requests", timeout=60).json():
        if request["path"] != "/v1/chat/completions":
            continue
        user = next((m["content"] for m in reversed(request["body"]["messages"]) if m["role"] == "user"), "")
        if user.startswith(f"[{prefix}"):
            arrived[user[1:user.index("]")]] = request["at"]
    return arrived
