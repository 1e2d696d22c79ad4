"""An API, worker or command run before a setup step the operator must take (`agentq db init` upgrading the
database to this release, a DATABASE_URL the server accepts): each says so, never "retry shortly" nor a 500, and
the API serves once the step is taken, without a restart."""

from __future__ import annotations

import json
import sqlite3
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import psycopg

from tests.conftest import LOG_DIR, child_env
from tests.stack import drop_database, scratch_database
from tests.support import Process, agentq, free_port, run_to_end, wait_http

if TYPE_CHECKING:
    import pytest

    from tests.conftest import Workers, World

BEHIND = {"error": {"code": "service_unavailable", "message": "The service's database predates this release. The "
                                                               "operator must run `agentq db init` to upgrade it."}}


def _agentq(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    returncode, stdout, stderr = run_to_end(agentq(*args), env, timeout=60)
    return subprocess.CompletedProcess(args, returncode, stdout, stderr)


def _web(name: str, env: dict[str, str]) -> tuple[Process, str]:
    port = free_port()
    web = Process(name, agentq("web", "--port", str(port), "--workers", "1", "--threads", "4"), env, LOG_DIR).start()
    wait_http(f"http://127.0.0.1:{port}/healthz")
    return web, f"http://127.0.0.1:{port}"


def test_a_sqlite_file_whose_amounts_await_conversion_is_opened_by_nothing_but_db_init(tmp_path: Path) -> None:
    """A file written before money was kept in millionths was read by the API as it stood, every balance a
    millionth of itself (12.5 credits shown as 0.000012), until someone ran `db init`; a worker started and
    found every user unable to afford a turn, and a credit written meanwhile was multiplied again by the
    conversion. The API answers 503 until the conversion, then serves the converted amounts; the worker and
    the other commands refuse to start."""
    database = tmp_path / "older.sqlite3"
    env = child_env(DATABASE_URL=f"sqlite:///{database}")
    assert _agentq(env, "db", "init").returncode == 0
    created = json.loads(_agentq(env, "users", "create", "older", "--balance", "1").stdout)
    with sqlite3.connect(database) as older:  # as an earlier agentq wrote it: amounts as numbers
        older.execute("UPDATE users SET balance = 12.5 WHERE id = ?", (created["id"],))
        older.execute("PRAGMA user_version = 0")

    refused = _agentq(env, "worker", "--processes", "1", "--threads", "1")
    assert (refused.returncode, json.loads(refused.stderr)["error"]) == (1, {
        "code": "schema_incomplete",
        "message": f"No worker starts on the database {database}, whose turns it could not run: the SQLite file "
                   "was written by an earlier release and awaits its upgrade: run `agentq db init` against it."})
    refused = _agentq(env, "users", "create", "meanwhile", "--balance", "3")
    assert (refused.returncode, json.loads(refused.stderr)["error"]) == (1, {
        "code": "schema_incomplete",
        "message": f"The SQLite file {database} was written by an earlier release and its amounts are not yet in "
                   "millionths: run `agentq db init` to upgrade it."})

    web, base = _web("web-sqlite-awaits-upgrade", env)
    try:
        headers = {"Authorization": f"Bearer {created['api_key']}"}
        answer = httpx.get(f"{base}/api/me", headers=headers, timeout=10)
        assert (answer.status_code, answer.json()) == (503, BEHIND)
        ready = httpx.get(f"{base}/readyz", timeout=10)
        assert (ready.status_code, ready.json()["checks"]["database"]) == (
            503, "error: the database predates this release; run `agentq db init`")
        assert f"the service cannot serve: The SQLite file {database} was written by an earlier release" \
            in web.output()

        report = json.loads(_agentq(env, "db", "init").stdout)
        assert report["converted_money_columns"] > 0
        answer = httpx.get(f"{base}/api/me", headers=headers, timeout=10)
        assert (answer.status_code, answer.json()["balance"]) == (200, "12.500000")
        assert httpx.get(f"{base}/readyz", timeout=10).status_code == 200
    finally:
        web.stop()
    with sqlite3.connect(database) as converted:
        assert converted.execute("SELECT name, balance FROM users").fetchall() == [("older", 12_500_000)]


def test_an_api_on_a_database_lacking_a_column_of_this_release_names_db_init(tmp_path: Path) -> None:
    """An API deployed before `db init` added a release's columns answered 500 `internal_error` on PostgreSQL
    (a bug, by this API's rule) and 503 "retry shortly" on SQLite (an outage no retry ends): both are the
    operator's setup step, said as such; once `db init` has added the column the API serves."""
    name = scratch_database("agentq_behind")
    try:
        url = f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
        env = child_env(DATABASE_URL=url)
        assert _agentq(env, "db", "init").returncode == 0
        admin = json.loads(_agentq(env, "users", "create", "root", "--admin").stdout)
        with psycopg.connect(f"postgresql://postgres@127.0.0.1:5432/{name}", autocommit=True) as conn:
            conn.execute("ALTER TABLE admin_debug_logs DROP COLUMN deliveries")
        for database_url, label in ((url, "postgresql"), (f"sqlite:///{tmp_path}/older.sqlite3", "sqlite")):
            env = child_env(DATABASE_URL=database_url)
            if label == "sqlite":
                assert _agentq(env, "db", "init").returncode == 0
                admin = json.loads(_agentq(env, "users", "create", "root", "--admin").stdout)
                with sqlite3.connect(tmp_path / "older.sqlite3") as older:
                    older.execute("ALTER TABLE admin_debug_logs DROP COLUMN deliveries")
            web, base = _web(f"web-lacking-a-column-{label}", env)
            try:
                headers = {"Authorization": f"Bearer {admin['api_key']}"}
                answer = httpx.get(f"{base}/api/admin/debug-logs/1", headers=headers, timeout=10)
                assert (answer.status_code, answer.json()) == (503, BEHIND), label
                assert "the service cannot serve: the database predates this release: run `agentq db init` against " \
                    "it to upgrade it. " in web.output()
                assert "(GET /api/admin/debug-logs/1)" in web.output()
                assert "Traceback" not in web.output()
                assert _agentq(env, "db", "init").returncode == 0
                answer = httpx.get(f"{base}/api/admin/debug-logs/1", headers=headers, timeout=10)
                assert (answer.status_code, answer.json()["error"]["code"]) == (404, "not_found"), label
            finally:
                web.stop()
    finally:
        drop_database(name)


def test_an_api_whose_database_refuses_its_role_says_it_is_not_configured_not_to_retry_shortly() -> None:
    """A DATABASE_URL naming a database the server does not have (or a role, or a password, it refuses) was
    answered "unavailable for a moment; retry shortly" with `Retry-After: 1`, for ever: no retry mends it. The
    caller is told the service is not configured, the log what the server refused."""
    env = child_env(DATABASE_URL="postgresql+psycopg://postgres@127.0.0.1:5432/agentq_never_made")
    web, base = _web("web-refused-database", env)
    try:
        answer = httpx.get(f"{base}/api/me", headers={"Authorization": "Bearer aq_any"}, timeout=10)
        assert (answer.status_code, answer.json(), answer.headers.get("Retry-After")) == (503, {"error": {
            "code": "invalid_configuration",
            "message": "The service is not configured to serve; its operators are told why in its log."}}, None)
        assert "the service cannot serve: the database refuses the database, role or password DATABASE_URL names: " \
               "mend DATABASE_URL. OperationalError: connection failed" in web.output()
        assert "(GET /api/me)" in web.output()
    finally:
        web.stop()


def test_an_api_whose_redis_refuses_its_password_says_so_once_and_serves_what_the_database_can(
        world: World, workers: Workers) -> None:
    """A password Redis refuses is a setting to mend, like a role the database refuses: `/readyz` is 503, the
    operator's queue view says Redis's refusal, and the log says what to mend in one line, not a traceback a
    request. A POST still stores its turn, which the workers (whose Redis is right) send."""
    from tests.conftest import api_process

    with api_process("web-redis-password", REDIS_URL="redis://:wrong@127.0.0.1:6379/0") as (url, web):
        ready = httpx.get(f"{url}/readyz", timeout=10)
        assert (ready.status_code, ready.json()["checks"]["redis"]) == (503, "error: AuthenticationError")
        queues = httpx.get(f"{url}/api/admin/queues", headers={"Authorization": f"Bearer {world.admin_key}"},
                           timeout=10)
        assert (queues.status_code, queues.json()["redis_error"]) == (
            200, "AuthenticationError: AUTH <password> called without any password configured for the default user. "
                 "Are you sure your configuration is correct?")
        agent_id = world.agent(world.model())
        _, key = world.user()
        sent = [httpx.post(f"{url}/api/conversations/{world.conversation(key, agent_id)}/messages",
                           headers={"Authorization": f"Bearer {key}"}, json={"content": f"hello {n}"}, timeout=10)
                for n in range(3)]
        assert [answer.status_code for answer in sent] == [202, 202, 202]
        said = web.output()
        assert "Traceback" not in said
        assert said.count("; the database alone guards it (") == 1
    for answer in sent:
        done = world.wait_terminal(key, answer.json()["assistant_message"]["id"], timeout=30)
        assert done["status"] == "success"


def test_what_redis_refuses_of_its_url_is_a_setting_of_redis_to_mend_met_directly_or_under_a_send(
        caplog: pytest.LogCaptureFixture) -> None:
    """Told apart once (`app.setup_problems`): the Redis client's refusal of a password or of a database number,
    and the same under Dramatiq's error for a send; a background loop that meets it names Redis, not the
    database, as what to mend. Another refusal of Redis's is not a setting."""
    import logging

    import dramatiq.errors
    import redis

    from app.failure_logs import log_failure
    from app.setup_problems import setup_problem

    refusals: list[redis.RedisError] = []
    for url in ("redis://someone:wrong@127.0.0.1:6379/0", "redis://127.0.0.1:6379/99"):
        try:
            redis.Redis.from_url(url).ping()
        except redis.RedisError as error:
            refusals.append(error)
    under_sends: list[BaseException] = []
    for refused in refusals:
        try:
            raise dramatiq.errors.ConnectionClosed(refused) from refused
        except dramatiq.errors.ConnectionClosed as error:
            under_sends.append(error)
    problems = [setup_problem(error) for error in (*refusals, *under_sends)]
    assert [(p.code, p.of_redis) if p else None for p in problems] == [("invalid_configuration", True)] * 4
    assert setup_problem(redis.ResponseError("WRONGTYPE Operation against a key holding the wrong kind of value")) \
        is None
    with caplog.at_level(logging.ERROR, logger="tests.setup"):
        log_failure(logging.getLogger("tests.setup"), refusals[0], "a sweep")
    assert [r.getMessage().split(" (Redis at ")[0] for r in caplog.records] == [
        "a sweep failed: Redis refuses the password or the database number REDIS_URL gives, or asks for a password "
        "it does not give: mend REDIS_URL. AuthenticationError: invalid username-password pair or user is disabled."]
