"""An API whose database accepts connections and never answers: bounded refusals, and metrics that stay up."""

from __future__ import annotations

import json
import re
import socket
import sqlite3
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import LOG_DIR, api_process, child_env
from tests.stack import drop_database, scratch_database
from tests.support import Process, agentq, free_port, run_to_end, wait_for, wait_http

if TYPE_CHECKING:
    from tests.conftest import World


@pytest.fixture
def silent_database() -> Iterator[str]:
    """A PostgreSQL URL whose host completes the TCP handshake (the kernel does, into the backlog) and then
    says nothing: a half-dead host or a stuck proxy, not a refused port."""
    listener = socket.create_server(("127.0.0.1", 0), backlog=64)
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:{listener.getsockname()[1]}/agentq"
    finally:
        listener.close()


def test_a_database_that_never_answers_is_503_within_the_connect_timeout_and_metrics_still_answer(
        silent_database: str) -> None:
    port = free_port()
    web = Process("web-silent-db", agentq("web", "--port", str(port), "--workers", "1", "--threads", "8"),
                  child_env(DATABASE_URL=silent_database, AGENTQ_DB_CONNECT_TIMEOUT_SECONDS="2"), LOG_DIR).start()
    try:
        url = f"http://127.0.0.1:{port}"
        wait_http(f"{url}/healthz")
        for path in ("/readyz", "/api/me"):
            started = time.monotonic()
            answer = httpx.get(f"{url}{path}", headers={"Authorization": "Bearer nobody"}, timeout=30)
            took = time.monotonic() - started
            assert answer.status_code == 503, answer.text
            assert took < 10, f"{path} answered after {took:.1f}s"
        assert answer.json()["error"]["code"] == "service_unavailable"

        scraped = httpx.get(f"{url}/metrics", timeout=30)
        assert scraped.status_code == 200, scraped.text
        families = {f.name: f for f in text_string_to_metric_families(scraped.text)}
        up = {s.labels["service"]: s.value for s in families["agentq_backing_service_up"].samples}
        assert up == {"database": 0.0, "redis": 1.0}
        assert "agentq_turns_in_flight" not in families
        assert {s.labels["queue"] for s in families["agentq_queue_depth"].samples} == {"turns", "debug"}
    finally:
        web.stop()


@pytest.mark.parametrize("database", ["sqlite-no-file", "sqlite-empty-file", "postgresql"])
def test_a_database_without_the_schema_is_not_ready_and_says_to_run_db_init(database: str, tmp_path: Path) -> None:
    """On the SQLite default (a path relative to the working directory) a web started in another directory
    opened an empty file: /readyz said ready while every request answered "unavailable for a moment". A file
    that is there but empty (made by hand, or by an earlier release) is said the same way as one not there."""
    if database.startswith("sqlite"):
        url = f"sqlite:///{tmp_path}/empty.sqlite3"
        if database == "sqlite-empty-file":
            sqlite3.connect(tmp_path / "empty.sqlite3").close()
    else:
        name = scratch_database("agentq_no_schema")
        url = f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    port = free_port()
    web = Process(f"web-no-schema-{database}", agentq("web", "--port", str(port), "--workers", "1", "--threads", "4"),
                  child_env(DATABASE_URL=url, AGENTQ_RECOVERY_INTERVAL_SECONDS="0.2"), LOG_DIR).start()
    try:
        base = f"http://127.0.0.1:{port}"
        wait_http(f"{base}/healthz")
        ready = httpx.get(f"{base}/readyz", timeout=30)
        assert ready.status_code == 503
        assert ready.json()["checks"]["database"] == "error: the database has no agentq schema; run `agentq db init`"
        refused = httpx.get(f"{base}/api/agents", headers={"Authorization": "Bearer any"}, timeout=30)
        assert refused.status_code == 503
        assert "agentq db init" in refused.json()["error"]["message"]
        metrics = httpx.get(f"{base}/metrics", timeout=30)  # still answered, the database said to be down
        assert metrics.status_code == 200
        assert 'agentq_backing_service_up{service="database"} 0.0' in metrics.text
        # The process's own loop (runs pending too long) fails every 0.1-0.2 s alike: said once, in one line.
        said = ("failed: the SQLite file does not exist: run `agentq db init` to create it"
                if database == "sqlite-no-file"
                else "failed: the database has no agentq schema: run `agentq db init` against it")
        wait_for(lambda: said in web.output(), timeout=10, what="the bounds loop to say the setup step")
        time.sleep(1.0)  # five rounds or more: no event marks a round that logs nothing
        assert web.output().count(said) == 1
        assert "Traceback" not in web.output()
        # A worker refuses to start on it, saying the same step (it would take turns off the queue to fail them).
        returncode, _, stderr = run_to_end(agentq("worker", "--processes", "1", "--threads", "1"),
                                           child_env(DATABASE_URL=url))
        location = url if database == "postgresql" else f"{tmp_path}/empty.sqlite3"
        refusal = (f"The SQLite file {location} does not exist: run `agentq db init` to create it (a SQLite path is "
                   "relative to the directory a command runs in)." if database == "sqlite-no-file" else
                   f"No worker starts on the database {location}, whose turns it could not run: the database has no "
                   "agentq schema: run `agentq db init` against it (a SQLite path is relative to the directory a "
                   "command runs in).")
        assert (returncode, json.loads(stderr)["error"]) == (1, {"code": "service_unavailable", "message": refusal})
    finally:
        web.stop()
        if database == "postgresql":
            drop_database(name)


def test_every_request_is_counted_and_timed_by_the_route_it_matched(world: World, web_server: str) -> None:
    """The API's /metrics had no request counts or latencies: error rates and slow routes were an access log's
    or a proxy's to tell. Labels are the matched rule, never the path (its ids would make a series a
    message), and a method or a path the API does not serve is `other` or `unmatched`."""
    _, key = world.user("counted")
    auth = {"Authorization": f"Bearer {key}"}

    def scrape() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        served = httpx.get(f"{web_server}/metrics", timeout=30)
        return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
                for family in text_string_to_metric_families(served.text) for sample in family.samples
                if sample.name.startswith("agentq_http_request")}

    before = scrape()
    assert [httpx.get(f"{web_server}/api/me", headers=auth).status_code for _ in range(3)] == [200] * 3
    assert httpx.get(f"{web_server}/api/me").status_code == 401
    assert httpx.get(f"{web_server}/api/messages/987654321", headers=auth).status_code == 404
    assert httpx.get(f"{web_server}/no/such/path/123456789").status_code == 404
    assert httpx.request("BREW", f"{web_server}/api/me", headers=auth).status_code == 405
    after = scrape()

    def added(name: str, **labels: str) -> float:
        series = (name, tuple(sorted(labels.items())))
        return after.get(series, 0.0) - before.get(series, 0.0)

    counted = "agentq_http_requests_total"
    assert added(counted, route="/api/me", method="GET", status="200") == 3
    assert added(counted, route="/api/me", method="GET", status="401") == 1
    assert added(counted, route="/api/messages/<id:message_id>", method="GET", status="404") == 1
    assert added(counted, route="unmatched", method="GET", status="404") == 1
    assert added(counted, route="unmatched", method="other", status="405") == 1
    assert added("agentq_http_request_seconds_count", route="/api/me", method="GET") == 4
    assert added("agentq_http_request_seconds_bucket", route="/api/me", method="GET", le="+Inf") == 4
    assert 0 < added("agentq_http_request_seconds_sum", route="/api/me", method="GET") < 30
    assert not [series for series in after if any("987654321" in v or "123456789" in v for _, v in series[1])]


def test_a_request_is_named_in_its_answer_and_on_each_of_its_log_lines(world: World) -> None:
    """An operator told of a failed request had nothing to find its lines by: each is now stamped with the
    request's id, the client's `X-Request-ID` when it is a plain token (a proxy's, so that both logs share it),
    else a new one; sent back on every response, a refusal's too, and written in the access line."""
    _, key = world.user()
    conversation_id = world.conversation(key, world.agent(world.model()))
    with api_process("web-request-ids", AGENTQ_ACCESS_LOG="true", AGENTQ_LOG_JSON="true") as (url, web):
        auth = {"Authorization": f"Bearer {key}"}
        sent = httpx.post(f"{url}/api/conversations/{conversation_id}/messages", json={"content": "hi"},
                          headers={**auth, "X-Request-ID": "ticket-4711"})
        assert (sent.status_code, sent.headers["X-Request-ID"]) == (202, "ticket-4711")
        turn_id = sent.json()["assistant_message"]["id"]

        def lines_of(request_id: str) -> list[dict[str, object]]:
            return [line for line in map(json.loads, web.output().splitlines())
                    if line.get("request_id") == request_id or str(line["message"]).endswith(f" {request_id}")]

        def both_lines() -> list[dict[str, object]] | None:
            lines = lines_of("ticket-4711")
            return lines if len(lines) == 2 else None

        queued, access = wait_for(both_lines, what="the request's two lines")
        assert (queued["logger"], queued["message"]) == ("app.outbox", f"turn {turn_id} sent to queue turns")
        assert access["logger"] == "gunicorn.access" and "request_id" not in access
        for refused_with in ("two words", "x" * 129, None):
            refused = httpx.get(f"{url}/api/nowhere", headers={**auth, **(
                {"X-Request-ID": refused_with} if refused_with is not None else {})})
            given = refused.headers["X-Request-ID"]
            assert refused.status_code == 404 and re.fullmatch("[0-9a-f]{32}", given)
            wait_for(partial(lines_of, given), what="the refusal's access line")


def test_an_access_log_is_written_only_when_asked_for(web_server: str) -> None:
    """`AGENTQ_ACCESS_LOG=true` writes one line a request in agentq's format (JSON here), with the status, the
    size and the time; by default none, as before (a proxy in front usually keeps one)."""
    with api_process("web-access-log", AGENTQ_ACCESS_LOG="true", AGENTQ_LOG_JSON="true") as (url, web):
        assert httpx.get(f"{url}/api/me", headers={"Authorization": "Bearer nobody"}).status_code == 401

        def access_lines(path: str = "/api/me") -> list[dict[str, object]]:
            return [line for line in map(json.loads, filter(None, web.output().split("\n")))
                    if line["logger"] == "gunicorn.access" and path in str(line["message"])]

        [line] = wait_for(access_lines, what="the request's access line")
        message = str(line["message"])
        assert message.startswith('127.0.0.1 "GET /api/me HTTP/1.1" 401 ') and line["level"] == "INFO"
        agent = re.escape(f' ms "python-httpx/{httpx.__version__}" ')
        assert " bytes " in message and re.search(agent + "[0-9a-f]{32}$", message)
        # A C1 control (NEL) in what the client sent is a line break to Unicode's line readers: written escaped.
        forged = b"x\x85[2026-12-06 16:30:00,000] [app.auth] [CRITICAL] a line the client wrote"
        assert httpx.get(f"{url}/healthz", headers={b"User-Agent": forged}).status_code == 200
        [forging] = wait_for(partial(access_lines, "the client wrote"), what="the forged request's line")
        assert re.search(re.escape('"x\\x85[2026-12-06 16:30:00,000] [app.auth] [CRITICAL] a line the client wrote" ')
                         + "[0-9a-f]{32}$", str(forging["message"]))
        assert "\x85" not in web.output()
    assert httpx.get(f"{web_server}/api/me", headers={"Authorization": "Bearer nobody"}).status_code == 401
    assert "gunicorn.access" not in (LOG_DIR / "web.log").read_text()
