"""A whole agentq of a test's own: `agentq web` and `agentq worker` processes on their own database,
Redis server and metrics directory, for tests that stop, kill and restart those services.

The session's fixtures share one database and Redis database between the in-process API and one worker;
a test that kills Redis, sends SIGTERM to workers or counts metrics exactly needs services nobody else
uses, which this module builds from the same commands an operator runs.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

import httpx
import psycopg

from tests.conftest import LOG_DIR, MOCK_URL, PG_ADMIN_URL, child_env
from tests.support import ROOT, Process, agentq, free_port, refusing, wait_for, wait_http


class RedisServer:
    """A private, memory-only redis-server on a free port, which a test may kill and start again (empty). Its
    working directory is one of its own: a replica writes the copy it receives from its primary there, which
    landed in the checkout (`dump.rdb`) when the server was started from it."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.port = free_port()
        self.process: Process | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        self.starts += 1
        workdir = LOG_DIR / f"{self.name}-data"
        workdir.mkdir(exist_ok=True)
        argv = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                "--dir", str(workdir)]
        self.process = Process(f"{self.name}-{self.starts}", argv, dict(os.environ), LOG_DIR).start()
        wait_for(self.ping, timeout=10, interval=0.05, what=f"{self.name} to answer")
        return self

    def ping(self) -> bool:
        try:
            return bool(self.client().ping())
        except Exception:
            return False

    def client(self) -> Any:
        import redis

        return redis.Redis.from_url(self.url, socket_timeout=5, socket_connect_timeout=1)

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill_group()


class SharedRedis:
    """A database of the machine's Redis, for a test that may flush it but never stops the server."""

    def __init__(self, url: str) -> None:
        self.url = url

    def client(self) -> Any:
        import redis

        return redis.Redis.from_url(self.url, socket_timeout=5, socket_connect_timeout=1)


class Stack:
    """Services of one test: a database (already created), a Redis server, web and worker processes."""

    def __init__(self, name: str, database_url: str, redis: RedisServer | SharedRedis, **env: str) -> None:
        self.name = name
        self.database_url = database_url
        self.redis = redis
        self.key_prefix = f"agentq-{name}-{uuid.uuid4().hex[:8]}"
        """Its own Redis keys and queues: a stack may share a Redis database with the session's workers, and with
        the runs before this one, whose new databases numbered their turns from 1 too."""
        self.metrics_dir = Path(tempfile.mkdtemp(prefix=f"{name}-metrics-", dir=LOG_DIR))
        self.extra_env = env
        self.web: Process | None = None
        self.web_port = free_port()
        self.workers: list[Process] = []
        self.started = 0
        self.admin_key = ""
        self.http = httpx.Client(base_url=self.base_url, timeout=30)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.web_port}"

    def env(self, **overrides: str) -> dict[str, str]:
        return child_env(**{"DATABASE_URL": self.database_url, "REDIS_URL": self.redis.url,
                            "PROMETHEUS_MULTIPROC_DIR": str(self.metrics_dir),
                            "AGENTQ_REDIS_KEY_PREFIX": self.key_prefix,
                            "AGENTQ_BROKER_NAMESPACE": f"{self.key_prefix}-dramatiq", **self.extra_env, **overrides})

    def run(self, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(agentq(*args), env=self.env(**env), capture_output=True, text=True, cwd=ROOT,
                                timeout=120)
        assert result.returncode == 0, result.stderr
        return result

    def init(self) -> Stack:
        import json

        self.run("db", "init")
        self.admin_key = json.loads(self.run("users", "create", "admin", "--admin").stdout)["api_key"]
        return self

    def start_web(self, web_workers: int = 2, **env: str) -> Process:
        self.web = Process(f"{self.name}-web", agentq("web", "--port", str(self.web_port), "--workers",
                                                     str(web_workers), "--threads", "16"),
                           self.env(**env), LOG_DIR).start()
        wait_http(f"http://127.0.0.1:{self.web_port}/healthz")
        return self.web

    def start_worker(self, processes: int = 1, threads: int = 4, wait: bool = True, restart: bool = True,
                     queues: list[str] | None = None, **env: str) -> Process:
        self.started += 1
        name = f"{self.name}-worker-{self.started}"
        argv = ["worker", "--processes", str(processes), "--threads", str(threads)]
        argv += ([] if restart else ["--no-restart"]) + (["--queues", *queues] if queues else [])
        process = Process(name, agentq(*argv), self.env(**env), LOG_DIR).start()
        self.workers.append(process)
        if wait:
            self.wait_ready(process, processes)
        return process

    @staticmethod
    def wait_ready(group: Process, processes: int = 1) -> None:
        """The group's processes are ready (groups started with `wait=False` boot side by side meanwhile)."""
        wait_for(lambda: group.output().count("Worker process is ready") >= processes, timeout=60, interval=0.1,
                 what=f"{group.name} to boot")

    def stop(self) -> None:
        for process in [*self.workers, self.web]:
            if process is not None:
                process.kill_group()
        self.http.close()
        shutil.rmtree(self.metrics_dir, ignore_errors=True)

    def call(self, method: str, path: str, key: str | None = None, **kwargs: Any) -> httpx.Response:
        headers = dict(kwargs.pop("headers", {}))
        headers["Authorization"] = f"Bearer {key or self.admin_key}"
        return self.http.request(method, path, headers=headers, **kwargs)

    def model(self, name: str, upstream: str = "echo", **extra: Any) -> int:
        body = {"name": name, "model": upstream, "base_url": MOCK_URL, "input_price_per_1k": "0.001",
                "output_price_per_1k": "0.002", **extra}
        response = self.call("POST", "/api/admin/models", json=body)
        assert response.status_code == 201, response.text
        return response.json()["id"]

    def agent(self, model_id: int, fallback_id: int | None = None, **extra: Any) -> int:
        body = {"name": "helper", "system_prompt": "You are helpful.", "model_id": model_id,
                "fallback_model_id": fallback_id, **extra}
        response = self.call("POST", "/api/admin/agents", json=body)
        assert response.status_code == 201, response.text
        return response.json()["id"]

    def user(self, name: str, balance: str = "100") -> tuple[int, str]:
        response = self.call("POST", "/api/admin/users", json={"name": name, "balance": balance})
        assert response.status_code == 201, response.text
        return response.json()["id"], response.json()["api_key"]

    def conversation(self, key: str, agent_id: int) -> int:
        response = self.call("POST", "/api/conversations", key, json={"agent_id": agent_id})
        assert response.status_code in (200, 201), response.text
        return response.json()["id"]

    def send(self, key: str, conversation_id: int, content: str) -> dict[str, Any]:
        response = self.call("POST", f"/api/conversations/{conversation_id}/messages", key, json={"content": content})
        assert response.status_code == 202, response.text
        return response.json()["assistant_message"]

    def message(self, key: str, message_id: int) -> dict[str, Any]:
        return self.call("GET", f"/api/messages/{message_id}", key).json()

    def wait_status(self, key: str, message_id: int, statuses: tuple[str, ...], timeout: float = 30) -> dict[str, Any]:
        return wait_for(lambda: (m := self.message(key, message_id))["status"] in statuses and m,
                        timeout=timeout, interval=0.05, what=f"message {message_id} to reach {statuses}")

    def wait_terminal(self, key: str, message_id: int, timeout: float = 30) -> dict[str, Any]:
        return wait_for(lambda: (m := self.message(key, message_id))["status"] not in ("pending", "processing") and m,
                        timeout=timeout, interval=0.05, what=f"message {message_id} to end")

    def claims_fail(self, conversation_id: int) -> AbstractContextManager[None]:
        """Every attempt to start a turn of this conversation raises a database error until the block ends."""
        return refusing(self.sql, f"agentq_test_refuse_{int(conversation_id)}", "conversation_messages", "UPDATE",
                        f"NEW.status = 'processing' AND NEW.conversation_id = {int(conversation_id)}")

    def sql(self, query: str, params: dict[str, Any] | None = None) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.database_url.replace("+psycopg", ""), autocommit=True) as conn:
            cursor = conn.execute(query, params)
            return cursor.fetchall() if cursor.description else []


def scratch_database(prefix: str) -> str:
    """A new empty database on the session's PostgreSQL; the caller drops it with `drop_database`.

    Its commits do not wait for the WAL to reach the disk (`synchronous_commit = off`; the chaos test's own
    cluster runs with `fsync=off`): a test needs transactions, not survival of a machine crash, and on a
    slow disk the wait was 1-2 ms a commit, tens of thousands of commits a suite."""
    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
        conn.execute(f'ALTER DATABASE "{name}" SET synchronous_commit = off')
    return name


def drop_database(name: str) -> None:
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextmanager
def stack_on_shared_redis(name: str, **env: str) -> Iterator[Stack]:
    """A stack on a scratch database and the test Redis database (its keys and queues under its own prefix),
    for a test that starts its processes itself; stopped, and its database dropped, afterwards."""
    from tests.conftest import REDIS_DB

    database = scratch_database(f"agentq_{name}")
    stack = Stack(name, f"postgresql+psycopg://postgres@127.0.0.1:5432/{database}",
                  SharedRedis(f"redis://127.0.0.1:6379/{REDIS_DB}"), **env)
    try:
        yield stack
    finally:
        stack.stop()
        drop_database(database)


__all__ = ["RedisServer", "SharedRedis", "Stack", "drop_database", "scratch_database", "stack_on_shared_redis"]
