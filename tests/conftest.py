"""Fixtures: a fresh PostgreSQL database and Redis database per run, the mock upstream, real workers.

Every test starts from empty tables and an empty Redis database. The API is driven in-process
through Flask's test client (the same app `agentq web` serves); turns are run by real
`agentq worker` processes talking to the real PostgreSQL, Redis and mock upstream over HTTP.
"""

from __future__ import annotations

import fcntl
import itertools
import os
import tempfile
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from decimal import Decimal
from pathlib import Path
from typing import IO, Any

import httpx
import psycopg
import pytest
import redis as redis_lib

from tests.support import ROOT, Process, SilentServer, agentq, free_port, wait_for, wait_http

PG_ADMIN_URL = os.environ.get("TEST_AGENTQ_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
XDIST_WORKER = os.environ.get("PYTEST_XDIST_WORKER", "")
"""`make test` runs the suite in pytest-xdist processes ("gw0", "gw1", …): each is a session of its own, with
its own database, mock upstream, workers, log directory and Redis database (9, 10, …)."""
REDIS_DB = int(os.environ.get("TEST_AGENTQ_REDIS_DB", "9")) + (int(XDIST_WORKER[2:]) if XDIST_WORKER else 0)
RUN_ID = uuid.uuid4().hex[:8]
DB_NAME = f"agentq_test_{RUN_ID}"
LOG_DIR = Path(os.environ.get("TEST_AGENTQ_LOG_DIR") or tempfile.mkdtemp(prefix=f"agentq-test-{RUN_ID}-"))
LOG_DIR = LOG_DIR / XDIST_WORKER if XDIST_WORKER else LOG_DIR
LOG_DIR.mkdir(parents=True, exist_ok=True)
MOCK_PORT = free_port()
MOCK_URL = f"http://127.0.0.1:{MOCK_PORT}/v1"

TEST_ENV = {
    "DATABASE_URL": f"postgresql+psycopg://postgres@127.0.0.1:5432/{DB_NAME}",
    "REDIS_URL": f"redis://127.0.0.1:6379/{REDIS_DB}",
    "AGENTQ_LEASE_SECONDS": "3",
    # Each process of the suite's (two pytest-xdist sessions, each with workers, API servers and a test's own
    # deployment) held up to 10 connections: at a busy moment that was past PostgreSQL's default 100.
    "AGENTQ_DB_POOL_SIZE": "4",
    "AGENTQ_RECOVERY_INTERVAL_SECONDS": "1",
    "AGENTQ_ENQUEUE_GRACE_SECONDS": "1",
    "AGENTQ_MIN_BACKOFF_MS": "200",
    "AGENTQ_MAX_BACKOFF_MS": "1000",
    "AGENTQ_MAX_RETRIES": "2",
    "AGENTQ_SHUTDOWN_GRACE_SECONDS": "10",
    "AGENTQ_BROKER_HEARTBEAT_MS": "5000",
    "AGENTQ_BROKER_MAINTENANCE_CHANCE": "200000",
    "PROMETHEUS_MULTIPROC_DIR": str(LOG_DIR / "metrics"),
    "AGENTQ_BLOCKED_TERMS": "forbidden-word, 禁止词",
    "AGENTQ_MODERATION_URL": MOCK_URL,
    "OPENAI_API_KEY": "sk-platform-test",
    "AGENTQ_METRICS_SNAPSHOT_SECONDS": "0",
    "TEST_PROVIDER_API_KEY": "sk-provider-test",
    "TEST_DATABASE_PASSWORD": "not-for-models",
}
(LOG_DIR / "metrics").mkdir(exist_ok=True)
os.environ.update(TEST_ENV)

TABLES = ("dead_letters", "model_attempts", "admin_debug_logs", "credit_transactions", "turns", "conversation_messages",
          "conversations", "agents", "llm_models", "users")


def sqlalchemy_warnings_in(log_dir: Path) -> list[str]:
    return [f"{path.relative_to(log_dir)}: {line.strip()}" for path in sorted(log_dir.rglob("*.log"))
            for line in path.read_text(errors="replace").splitlines() if "SAWarning" in line]


_held_redis_databases: list[IO[str]] = []


def pytest_configure(config: pytest.Config) -> None:
    """Two runs on one Redis database (a second `pytest -n 2` whose `TEST_AGENTQ_REDIS_DB` lands on the first's
    second database) flush each other's data and take each other's messages: their tests fail far from the cause.
    The run's first process locks the file of each database its sessions will use for as long as it runs (the lock
    goes with the process), and a run that finds one held stops before any test, saying so."""
    if XDIST_WORKER:
        return
    sessions = len(config.getoption("tx", default=None) or []) or 1  # pytest-xdist's processes, as it counted them
    for database in range(REDIS_DB, REDIS_DB + sessions):
        path = Path(tempfile.gettempdir()) / f"agentq-test-redis-6379-{database}.lock"
        held = path.open("a")
        try:
            fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            held.close()
            raise pytest.UsageError(f"Redis database {database} is in use by another test run on this machine "
                                    f"({path}): give this run another TEST_AGENTQ_REDIS_DB") from None
        _held_redis_databases.append(held)


@pytest.fixture(scope="session", autouse=True)
def no_sqlalchemy_warning_in_a_process_log() -> Iterator[None]:
    """`filterwarnings` fails a test whose own process warns; a web or worker process that warns (a cartesian
    product in the API's deadline bound did) only logs it, which no test reads: the session fails instead."""
    yield
    found = sqlalchemy_warnings_in(LOG_DIR)
    assert not found, "SQLAlchemy warned in a process the tests started:\n" + "\n".join(found[:20])


def child_env(**overrides: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    env.update(TEST_ENV)
    env.update(overrides)
    return env


@pytest.fixture(scope="session")
def database() -> Iterator[str]:
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{DB_NAME}"')
        conn.execute(f'ALTER DATABASE "{DB_NAME}" SET synchronous_commit = off')  # see tests/stack.py
    with psycopg.connect(TEST_ENV["DATABASE_URL"].replace("+psycopg", ""), autocommit=True) as conn:
        conn.execute((ROOT / "schema.sql").read_text())
    yield TEST_ENV["DATABASE_URL"]
    from app.db import dispose_engines

    dispose_engines()
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{DB_NAME}" WITH (FORCE)')


@pytest.fixture(scope="session")
def redis_client() -> redis_lib.Redis:
    client = redis_lib.Redis.from_url(TEST_ENV["REDIS_URL"])
    client.flushdb()
    return client


@pytest.fixture(scope="session")
def mock_upstream() -> Iterator[Process]:
    process = Process("mock-upstream", agentq("mock-llm", "--port", str(MOCK_PORT)), child_env(), LOG_DIR).start()
    wait_http(f"http://127.0.0.1:{MOCK_PORT}/_requests")
    yield process
    process.kill_group()


@pytest.fixture
def upstream(mock_upstream: Process) -> Iterator[UpstreamLog]:
    log = UpstreamLog()
    log.clear()
    yield log


class UpstreamLog:
    """What the mock upstream received, and what became of each stream."""

    base = f"http://127.0.0.1:{MOCK_PORT}"

    def clear(self) -> None:
        httpx.delete(f"{self.base}/_requests")

    def requests(self, path: str = "/v1/chat/completions") -> list[dict[str, Any]]:
        return [r for r in httpx.get(f"{self.base}/_requests").json() if r["path"] == path]

    def models(self) -> list[str]:
        """The upstream model of each chat completion request, in the order they came."""
        return [r["body"]["model"] for r in self.requests()]

    def streams(self) -> dict[str, str]:
        return httpx.get(f"{self.base}/_streams").json()


FRESH_ID_TABLES = ("conversation_messages", "admin_debug_logs", "conversations", "users")
"""Tables whose ids are the arguments of Dramatiq messages (a turn is its answer's message id), and those
whose rows a run's settlement takes: a run an earlier test left running finds none of this test's."""
RUN_ID_BLOCK = 1_000_000
_RUN_ID_BLOCKS = itertools.count(1)


@pytest.fixture
def clean(database: str, redis_client: redis_lib.Redis) -> Iterator[None]:
    """Empty tables and Redis; ids start at 1 again, except the ids messages carry.

    A test may end with a message still in a worker's memory (a retry waiting for its backoff, a stalled
    call): it outlives the flush and runs in a later test. Each test's turns and test runs therefore get
    ids of their own, so such a message finds no run rather than another test's run with the same id; and
    so do its users and conversations, whose rows a straggler's settlement, refused as it is, would lock
    (one such took the rows of the next test's first POST, and deadlocked with it)."""
    _empty_tables(database)
    redis_client.flushdb()
    yield


def _empty_tables(database: str) -> None:
    for attempt in range(10):
        try:
            # DELETE, children first, then the identities back to 1: a TRUNCATE makes new files and syncs
            # them at its commit, 50 ms a test on this machine against 9 ms.
            first_run_id = next(_RUN_ID_BLOCKS) * RUN_ID_BLOCK + 1
            statements = [f"DELETE FROM {table}" for table in TABLES] + [
                f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "
                f"{first_run_id if table in FRESH_ID_TABLES else 1}, false)" for table in TABLES if table != "turns"]
            with psycopg.connect(database.replace("+psycopg", "")) as conn:
                conn.execute("; ".join(statements))
            return
        except (psycopg.errors.DeadlockDetected, psycopg.errors.ForeignKeyViolation):
            # A run an earlier test left in a worker may settle between two of these DELETEs: its ledger row
            # then refers to a message this transaction deletes. Emptied again, the tables are then empty.
            if attempt == 9:
                raise


class Workers:
    """`agentq worker` processes for the test session; tests may kill and restart them."""

    def __init__(self) -> None:
        self.processes: list[Process] = []
        self.started = 0

    def start(self, processes: int = 1, threads: int = 8, **env: str) -> Process:
        """A new log file for each start: a restart reading an earlier start's "ready" would not wait."""
        self.started += 1
        name = f"worker-{self.started}"
        process = Process(name, agentq("worker", "--processes", str(processes), "--threads", str(threads)),
                          child_env(**env), LOG_DIR).start()
        self.processes.append(process)
        wait_for(lambda: "Worker process is ready" in process.output() or "ready for action" in process.output()
                 or len(process.children()) >= processes, timeout=30, interval=0.1, what=f"{name} to boot")
        return process

    def stop_all(self) -> None:
        for process in self.processes:
            process.kill_group()
        self.processes.clear()


@pytest.fixture(scope="session")
def workers(database: str, mock_upstream: Process) -> Iterator[Workers]:
    """Started by the first test that needs them. Runs left pending by earlier tests, which ran without
    workers, are emptied first: the workers' first recovery sweep would otherwise send them, and their model
    calls would land in that test's upstream log."""
    _empty_tables(database)
    pool = Workers()
    pool.start()
    yield pool
    pool.stop_all()


@pytest.fixture(scope="session")
def web_server(database: str) -> Iterator[str]:
    """A real `agentq web` (gunicorn, threaded workers) on the test database, for concurrency over HTTP."""
    port = free_port()
    process = Process("web", agentq("web", "--port", str(port), "--workers", "2", "--threads", "32"), child_env(),
                      LOG_DIR).start()
    url = f"http://127.0.0.1:{port}"
    wait_http(f"{url}/healthz")
    yield url
    process.stop()


@pytest.fixture
def app(database: str) -> Any:
    from web import create_app

    return create_app({"TESTING": True, "VALIDATE_RESPONSES": True})


class Api:
    """The HTTP API through Flask's test client, with a key per call."""

    def __init__(self, client: Any) -> None:
        self.client = client

    def call(self, method: str, path: str, key: str | None = None, json: Any = None,
             headers: dict[str, str] | None = None, **kwargs: Any) -> Any:
        all_headers = dict(headers or {})
        if key is not None:
            all_headers["Authorization"] = f"Bearer {key}"
        return self.client.open(path, method=method, json=json, headers=all_headers, **kwargs)

    def get(self, path: str, key: str | None = None, **kw: Any) -> Any:
        return self.call("GET", path, key, **kw)

    def post(self, path: str, key: str | None = None, json: Any = None, **kw: Any) -> Any:
        return self.call("POST", path, key, json=json, **kw)

    def patch(self, path: str, key: str | None = None, json: Any = None, **kw: Any) -> Any:
        return self.call("PATCH", path, key, json=json, **kw)

    def delete(self, path: str, key: str | None = None, **kw: Any) -> Any:
        return self.call("DELETE", path, key, **kw)


@pytest.fixture
def api(app: Any, clean: None) -> Api:
    return Api(app.test_client())


class World:
    """Users, models and agents made through the services, for tests that are about something else."""

    def __init__(self, api: Api) -> None:
        self.api = api
        from app.users import create_user

        self.admin_key = create_user("admin", is_admin=True).api_key

    def user(self, name: str = "alice", balance: str = "10") -> tuple[int, str]:
        from app.users import create_user

        created = create_user(name, balance=Decimal(balance))
        return created.user.id, created.api_key

    def model(self, name: str = "primary", upstream: str = "echo", price_in: str = "0.001",
              price_out: str = "0.002", **extra: Any) -> int:
        body = {"name": name, "model": upstream, "base_url": MOCK_URL, "input_price_per_1k": price_in,
                "output_price_per_1k": price_out, **extra}
        response = self.api.post("/api/admin/models", self.admin_key, body)
        assert response.status_code == 201, response.json
        return response.json["id"]

    def agent(self, model_id: int, fallback_id: int | None = None, **extra: Any) -> int:
        body = {"name": "helper", "system_prompt": "You are helpful.", "model_id": model_id,
                "fallback_model_id": fallback_id, **extra}
        response = self.api.post("/api/admin/agents", self.admin_key, body)
        assert response.status_code == 201, response.json
        return response.json["id"]

    def conversation(self, key: str, agent_id: int, project_id: int | None = None) -> int:
        response = self.api.post("/api/conversations", key, {"agent_id": agent_id, "project_id": project_id})
        assert response.status_code in (200, 201), response.json
        return response.json["id"]

    def send(self, key: str, conversation_id: int, content: str = "hello", **kw: Any) -> Any:
        return self.api.post(f"/api/conversations/{conversation_id}/messages", key, {"content": content}, **kw)

    def message(self, key: str, message_id: int) -> dict[str, Any]:
        return self.api.get(f"/api/messages/{message_id}", key).json

    def wait_terminal(self, key: str, message_id: int, timeout: float = 30.0) -> dict[str, Any]:
        return wait_for(lambda: (m := self.message(key, message_id))["status"] not in ("pending", "processing")
                        and m, timeout=timeout, what=f"message {message_id} to end")


@pytest.fixture
def world(api: Api) -> World:
    return World(api)


@pytest.fixture
def settings_of(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., None]]:
    """Change this process's settings for the test: `settings_of(AGENTQ_X="1")`."""
    from app.config import get_settings

    def change(**values: str) -> None:
        for name, value in values.items():
            monkeypatch.setenv(name, value)
        get_settings.cache_clear()

    yield change
    monkeypatch.undo()
    get_settings.cache_clear()


@pytest.fixture
def silent_redis() -> Iterator[SilentServer]:
    """A Redis that takes connections and never answers (`tests.support.SilentServer`)."""
    server = SilentServer()
    yield server
    server.close()


@contextmanager
def api_process(name: str, threads: int = 4, **env: str) -> Iterator[tuple[str, Process]]:
    """An `agentq web` of a test's own (one gunicorn worker) on a free port, with `env` over the tests'
    settings: its URL once it answers /healthz, and its process; stopped when the block ends."""
    port = free_port()
    web = Process(name, agentq("web", "--port", str(port), "--workers", "1", "--threads", str(threads)),
                  child_env(**env), LOG_DIR).start()
    try:
        url = f"http://127.0.0.1:{port}"
        wait_http(f"{url}/healthz")
        yield url, web
    finally:
        web.stop()


@pytest.fixture
def unreachable_broker(monkeypatch: pytest.MonkeyPatch) -> None:
    """This process's Dramatiq broker pointed at a closed port: every send fails, as when Redis is down."""
    point_the_broker_at_a_closed_port(monkeypatch)


def point_the_broker_at_a_closed_port(patch: pytest.MonkeyPatch) -> None:
    """`unreachable_broker`, for a part of a test (`monkeypatch.context()`)."""
    import dramatiq

    from workers.broker import install_broker

    broker = install_broker()
    dead_client = type(broker.client).from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.2)
    patch.setattr(broker, "client", dead_client)
    patch.setattr(broker, "scripts", {n: dead_client.register_script(s.script) for n, s in broker.scripts.items()})
    assert dramatiq.get_broker() is broker
