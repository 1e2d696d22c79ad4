"""Full turns through the HTTP API against the instant upstream: CPU per turn, throughput, POST latency.

A closed loop: `clients` client threads each POST a turn on a fresh conversation and wait for its
terminal status (read from the database by the bench) before the next, so the deployment runs at a
steady `clients` turns in flight. CPU is the web tree (gunicorn master and workers) and the worker
tree (`agentq worker` and its processes) from just before the first POST to just after the last
turn ended: background work of those processes (recovery sweeps, lease keeper, broker heartbeats)
is included, the mock upstream, PostgreSQL and Redis are not. Statements and transactions per
turn come from `pg_stat_statements`, restricted to the application's role.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

from bench.deploy import Deployment
from bench.driver import TurnWatcher, drive, ends
from bench.procs import cpu_seconds, percentile


@dataclass
class Pipeline:
    turns: int
    clients: int
    worker_processes: int
    worker_threads: int
    statuses: dict[str, int]
    web_cpu_ms: float
    worker_cpu_ms: float
    cpu_ms: float
    postgres_cpu_ms: float
    turns_per_second: float
    post_p50_ms: float
    post_p99_ms: float
    post_max_ms: float
    statements_per_turn: float
    transactions_per_turn: float
    db_connections_per_turn: float
    top_statements: list[dict[str, object]] = field(default_factory=list)
    post_latencies_ms: list[float] = field(default_factory=list)


def _statement_counts(dep: Deployment, turns: int) -> tuple[float, float, list[dict[str, object]]]:
    rows = dep.sql(
        "SELECT query, calls FROM pg_stat_statements s JOIN pg_roles r ON r.oid = s.userid "
        "WHERE r.rolname = 'agentq' ORDER BY calls DESC")
    total = sum(calls for _, calls in rows)
    commits = sum(calls for query, calls in rows if query.strip().upper() in ("COMMIT", "ROLLBACK"))
    top = [{"per_turn": round(calls / turns, 2), "query": " ".join(query.split())[:160]} for query, calls in rows[:25]]
    return total / turns, commits / turns, top


def _sessions(dep: Deployment) -> int:
    """Connections ever opened to the application's database (the bench's own included: one per call)."""
    return int(dep.sql("SELECT sessions FROM pg_stat_database WHERE datname = 'agentq'")[0][0])


def run(dep: Deployment, turns: int, clients: int, processes: int, threads: int) -> Pipeline:
    users = len(dep.seed.users)
    conversations = dep.conversations("instant", per_user=math.ceil(turns / users) + 1)
    dep.start_worker(processes, threads)
    assert dep.web is not None and dep.worker is not None
    time.sleep(1.0)
    watcher = TurnWatcher(dep)
    try:
        dep.sql("SELECT pg_stat_statements_reset()")
        sessions_before = _sessions(dep)
        web_before, worker_before = cpu_seconds([dep.web.pid]), cpu_seconds([dep.worker.pid])
        pg_before = cpu_seconds([dep.pg.postmaster_pid()])
        intake = drive(dep, conversations, turns, clients, wait=watcher)
        web_cpu = cpu_seconds([dep.web.pid]) - web_before
        worker_cpu = cpu_seconds([dep.worker.pid]) - worker_before
        pg_cpu = cpu_seconds([dep.pg.postmaster_pid()]) - pg_before
        sessions = _sessions(dep) - sessions_before - 1  # less the connection that reads the counter
    finally:
        watcher.close()
    statements, transactions, top = _statement_counts(dep, turns)
    end = ends(dep, intake.ids)
    span = float(end["last_end"]) - intake.first_post_at  # type: ignore[arg-type]
    latencies = intake.latencies
    return Pipeline(
        turns=turns, clients=clients, worker_processes=processes, worker_threads=threads,
        statuses=end["statuses"],  # type: ignore[arg-type]
        web_cpu_ms=web_cpu * 1000 / turns, worker_cpu_ms=worker_cpu * 1000 / turns,
        cpu_ms=(web_cpu + worker_cpu) * 1000 / turns, postgres_cpu_ms=pg_cpu * 1000 / turns,
        turns_per_second=turns / span,
        post_p50_ms=percentile(latencies, 50), post_p99_ms=percentile(latencies, 99),
        post_max_ms=max(latencies), statements_per_turn=statements, transactions_per_turn=transactions,
        db_connections_per_turn=sessions / turns,
        top_statements=top, post_latencies_ms=[round(v, 2) for v in latencies],
    )
