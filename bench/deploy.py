"""The bench's own deployment: a throwaway PostgreSQL cluster, a Redis database, the mock upstream,
`agentq web` and `agentq worker`, all with explicit environments.

PostgreSQL runs with `fsync=off` (and `full_page_writes=off`): a bench cluster that is deleted
afterwards has nothing to protect, and leaving disk flushes out keeps the numbers about agentq's
CPU rather than this machine's disk. Every other setting is PostgreSQL's default except
`max_connections` (sized for the largest worker run) and `pg_stat_statements` (to count queries).
The application connects as role `agentq`, the bench's own queries as `postgres`, so statement
counts are the application's alone.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psycopg
import redis

from bench.procs import ROOT, BenchError, Proc, free_port, wait_for, wait_http

VENV_BIN = Path(sys.executable).parent
SYSTEM_PROMPT = "You are helpful."


def _pg_bin() -> Path:
    explicit = os.environ.get("AGENTQ_BENCH_PG_BIN")
    if explicit:
        return Path(explicit)
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[4]))
    if not found:
        raise BenchError("no PostgreSQL server binaries found; set AGENTQ_BENCH_PG_BIN to the directory of initdb")
    return Path(found[-1]).parent


class PostgresCluster:
    """initdb + pg_ctl in a temp directory; as root the server runs as the `postgres` user."""

    def __init__(self, base: Path, max_connections: int) -> None:
        self.bin = _pg_bin()
        self.dir = base / "pgdata"
        self.socket_dir = base / "pgsock"
        self.log = base / "postgres.log"
        self.port = free_port()
        self.max_connections = max_connections
        self._as_postgres = os.geteuid() == 0
        self.started = False

    def _run(self, *argv: str, timeout: float = 120) -> None:
        prefix = ["runuser", "-u", "postgres", "--"] if self._as_postgres else []
        result = subprocess.run([*prefix, *argv], capture_output=True, text=True, timeout=timeout)
        if result.returncode != 0:
            raise BenchError(f"{' '.join(argv[:2])} failed: {result.stderr.strip() or result.stdout.strip()}")

    def start(self) -> PostgresCluster:
        self.dir.mkdir()
        self.socket_dir.mkdir()
        self.log.touch()
        if self._as_postgres:
            user = pwd.getpwnam("postgres")
            for path in (self.dir.parent, self.dir, self.socket_dir, self.log):
                os.chown(path, user.pw_uid, user.pw_gid)
        self._run(str(self.bin / "initdb"), "-D", str(self.dir), "-U", "postgres", "--auth=trust", "-E", "UTF8",
                  "--no-instructions")
        options = (f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.socket_dir} -c fsync=off "
                   f"-c full_page_writes=off -c max_connections={self.max_connections} -c shared_buffers=256MB "
                   "-c shared_preload_libraries=pg_stat_statements")
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.dir), "-l", str(self.log), "-o", options, "-w", "-t",
                  "60", "start")
        self.started = True
        return self

    def stop(self) -> None:
        if self.started:
            with contextlib.suppress(BenchError, subprocess.TimeoutExpired):
                self._run(str(self.bin / "pg_ctl"), "-D", str(self.dir), "-m", "immediate", "stop", timeout=60)
            self.started = False

    def url(self, user: str = "postgres", database: str = "postgres") -> str:
        return f"postgresql://{user}@127.0.0.1:{self.port}/{database}"

    def postmaster_pid(self) -> int:
        return int((self.dir / "postmaster.pid").read_text().split()[0])


@dataclass
class Seed:
    """What the bench made to drive turns: an admin, users (key per id), models and agents by purpose."""

    admin_key: str = ""
    users: list[tuple[int, str]] = field(default_factory=list)
    agents: dict[str, int] = field(default_factory=dict)


class Deployment:
    """Everything one bench run starts; `close()` stops it all and removes its files."""

    def __init__(self, keep: bool = False) -> None:
        self.run_id = uuid.uuid4().hex[:8]
        self.base = Path(tempfile.mkdtemp(prefix=f"agentq-bench-{self.run_id}-"))
        self.log_dir = self.base / "logs"
        self.log_dir.mkdir()
        self.metrics_dir = self.base / "metrics"
        self.metrics_dir.mkdir()
        self.keep = keep
        self.pg = PostgresCluster(self.base, max_connections=int(os.environ.get("AGENTQ_BENCH_PG_MAX_CONN", "800")))
        self.redis_url = os.environ.get("AGENTQ_BENCH_REDIS_URL", "redis://127.0.0.1:6379/13")
        self.namespace = f"agentq-bench-{self.run_id}"
        self.mock_port = free_port()
        self.web_port = free_port()
        self.mock: Proc | None = None
        self.web: Proc | None = None
        self.worker: Proc | None = None
        self.seed = Seed()
        self._redis: redis.Redis | None = None

    # -- set-up -------------------------------------------------------------------------------------------------

    @property
    def mock_url(self) -> str:
        return f"http://127.0.0.1:{self.mock_port}"

    @property
    def web_url(self) -> str:
        return f"http://127.0.0.1:{self.web_port}"

    @property
    def database_url(self) -> str:
        return f"postgresql+psycopg://agentq@127.0.0.1:{self.pg.port}/agentq"

    def env(self, **extra: str) -> dict[str, str]:
        """The children's environment: this process's, minus any agentq setting, plus the bench's."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTQ_")
               and k not in ("DATABASE_URL", "REDIS_URL", "PROMETHEUS_MULTIPROC_DIR")}
        env.update({
            "DATABASE_URL": self.database_url,
            "REDIS_URL": self.redis_url,
            "PROMETHEUS_MULTIPROC_DIR": str(self.metrics_dir),
            "AGENTQ_BROKER_NAMESPACE": self.namespace,
            "AGENTQ_MAX_ACTIVE_CONVERSATIONS": "100000",
            "AGENTQ_DEDUP_WINDOW_SECONDS": "0",
            "PYTHONPATH": str(ROOT),
            **extra,
        })
        return env

    def redis(self) -> redis.Redis:
        if self._redis is None:
            self._redis = redis.Redis.from_url(self.redis_url, socket_timeout=10)
        return self._redis

    def sql(self, query: str, params: Any = None) -> list[tuple[Any, ...]]:
        """A query of the bench's own, as `postgres` (kept apart from the application's statements)."""
        with psycopg.connect(self.pg.url(database="agentq"), autocommit=True) as conn:
            cursor = conn.execute(query, params)
            return cursor.fetchall() if cursor.description else []

    def start(self) -> Deployment:
        self.pg.start()
        with psycopg.connect(self.pg.url(), autocommit=True) as conn:
            conn.execute("CREATE ROLE agentq LOGIN")
            conn.execute("CREATE DATABASE agentq OWNER agentq")
        self.sql("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        client = self.redis()
        client.ping()
        client.flushdb()
        from app.redis_epoch import epoch_key, epoch_value, server_run

        # A deployment that has been running has its epoch key; without it the first recovery sweep would
        # take the bench's pending turns for ones Redis lost and send them a second time.
        client.set(epoch_key(), epoch_value(server_run(client)))
        self.agentq("db", "init")
        self.mock = Proc("mock-upstream", [str(VENV_BIN / "agentq"), "mock-llm", "--port", str(self.mock_port)],
                         self.env(), self.log_dir, self.base)
        wait_http(f"{self.mock_url}/_requests")
        self.start_web()
        return self

    def agentq(self, *args: str) -> str:
        result = subprocess.run([str(VENV_BIN / "agentq"), *args], env=self.env(), cwd=self.base,
                                capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            raise BenchError(f"agentq {' '.join(args)} failed: {result.stderr.strip()[-2000:]}")
        return result.stdout

    def start_web(self, workers: int = 2, threads: int = 256) -> Proc:
        self.web = Proc("web", [str(VENV_BIN / "agentq"), "web", "--port", str(self.web_port), "--workers",
                                str(workers), "--threads", str(threads)], self.env(), self.log_dir, self.base)
        wait_http(f"{self.web_url}/healthz")
        wait_for(lambda: len(_children(self.web.pid)) >= workers, 30, "gunicorn workers")  # type: ignore[union-attr]
        return self.web

    def start_worker(self, processes: int, threads: int, hold_turns: bool = False) -> Proc:
        """`agentq worker`; returns once every process logged that it is ready."""
        self.stop_worker()
        name = f"worker-p{processes}-t{threads}-{int(time.time())}"
        self.worker = Proc(name, [str(VENV_BIN / "agentq"), "worker", "--processes", str(processes), "--threads",
                                  str(threads)], self.env(), self.log_dir, self.base)
        worker = self.worker

        def ready() -> bool:
            worker.check_alive()
            return worker.output().count("Worker process is ready") >= processes

        wait_for(ready, 120, f"{name} to boot", interval=0.1)
        return worker

    def ensure_worker(self, processes: int, threads: int) -> Proc:
        """The running `agentq worker`, or a new one when none runs (a phase measured alone needs its own)."""
        return self.worker if self.worker is not None else self.start_worker(processes, threads)

    def stop_worker(self) -> None:
        if self.worker is not None:
            self.worker.stop(grace=40)
            self.worker = None

    def seed_world(self, users: int) -> Seed:
        """An admin (CLI), then users, models and agents through the admin API."""
        admin = json.loads(self.agentq("users", "create", "bench-admin", "--admin"))
        self.seed.admin_key = admin["api_key"]
        with httpx.Client(base_url=self.web_url, timeout=30,
                          headers={"Authorization": f"Bearer {self.seed.admin_key}"}) as http:
            for purpose, upstream in {"instant": "echo", "slow": "echo;ttft=1", "slow10": "echo;ttft=10",
                                     "slow20": "echo;ttft=20", "stream": "echo;ttft=0.25"}.items():
                model = http.post("/api/admin/models", json={
                    "name": f"bench-{purpose}", "model": upstream, "base_url": f"{self.mock_url}/v1",
                    "input_price_per_1k": "0.001", "output_price_per_1k": "0.002"})
                _expect(model, 201)
                agent = http.post("/api/admin/agents", json={
                    "name": f"bench-{purpose}", "system_prompt": SYSTEM_PROMPT, "model_id": model.json()["id"],
                    "timeout_seconds": 60})
                _expect(agent, 201)
                self.seed.agents[purpose] = agent.json()["id"]
            for index in range(users):
                user = http.post("/api/admin/users", json={"name": f"bench-user-{index}", "balance": "1000000"})
                _expect(user, 201)
                self.seed.users.append((user.json()["id"], user.json()["api_key"]))
        return self.seed

    def conversations(self, agent: str, per_user: int) -> dict[int, list[int]]:
        """Fresh, empty conversations (inserted directly: set-up, not measured), by user id."""
        rows = self.sql(
            "INSERT INTO conversations (user_id, agent_id, message_count, total_tokens) "
            "SELECT u, %s, 0, 0 FROM unnest(%s::bigint[]) AS u, generate_series(1, %s) "
            "RETURNING user_id, id",
            (self.seed.agents[agent], [u for u, _ in self.seed.users], per_user),
        )
        by_user: dict[int, list[int]] = {}
        for user_id, conversation_id in rows:
            by_user.setdefault(user_id, []).append(conversation_id)
        return by_user

    # -- tear-down ----------------------------------------------------------------------------------------------

    def close(self) -> None:
        for proc in (self.worker, self.web, self.mock):
            if proc is not None:
                proc.stop(grace=10)
        self.worker = self.web = self.mock = None
        with contextlib.suppress(Exception):
            self.redis().flushdb()
        self.pg.stop()
        if not self.keep:
            shutil.rmtree(self.base, ignore_errors=True)


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def _expect(response: httpx.Response, status: int) -> None:
    if response.status_code != status:
        raise BenchError(f"{response.request.method} {response.request.url.path} answered "
                         f"{response.status_code}: {response.text[:500]}")


FILLER = "please summarise the quarterly figures for the northern region in three short sentences with numbers"


def turn_content(tag: str) -> str:
    """A user message of 17 words: the echo upstream answers it in 18 streamed deltas."""
    return f"[{tag}] {FILLER}"
