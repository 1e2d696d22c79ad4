"""The embedded default (SQLite) end to end, as `make run` starts it, driven by the README's curl session.

Everything runs as real processes: `agentq db init`, `agentq demo seed`, `agentq web` (gunicorn) and
`agentq worker`, against the mock upstream; the shell block of README.md marked `curl-session` is
executed as printed, so the README cannot rot.
"""

from __future__ import annotations

import functools
import json
import re
import subprocess
import time
import uuid
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import httpx
import pytest

from tests.conftest import LOG_DIR, MOCK_URL, child_env
from tests.support import ROOT, VENV_BIN, Process, agentq, free_port, wait_for, wait_http


def readme_curl_session() -> str:
    text = (ROOT / "README.md").read_text()
    match = re.search(r"<!-- curl-session -->\s*```bash\n(.*?)```", text, re.S)
    assert match, "README.md must keep its curl session between the curl-session marker and a bash fence"
    return match.group(1)


@pytest.fixture(scope="module")
def sqlite_deployment(mock_upstream: Process, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    work: Path = tmp_path_factory.mktemp("sqlite")
    port = free_port()
    # Names of this run's own: the shared Redis keeps keys across runs (a stop flag lasts two hours), and this
    # run's new SQLite file numbers its turns from 1 again.
    prefix = f"agentq-sqlite-{uuid.uuid4().hex[:8]}"
    env = child_env(DATABASE_URL=f"sqlite:///{work}/agentq.sqlite3", AGENTQ_BROKER_NAMESPACE=prefix,
                    AGENTQ_REDIS_KEY_PREFIX=prefix, PORT=str(port))
    subprocess.run(agentq("db", "init"), env=env, check=True, cwd=ROOT, capture_output=True)
    seeded = subprocess.run(agentq("demo", "seed", "--mock-url", MOCK_URL, "--key-file", str(work / "key")),
                            env=env, check=True, cwd=ROOT, capture_output=True, text=True)
    demo = json.loads(seeded.stdout)
    web = Process("sqlite-web", agentq("web", "--port", str(port), "--workers", "1", "--threads", "8"), env,
                  LOG_DIR).start()
    worker = Process("sqlite-worker", agentq("worker", "--processes", "1", "--threads", "4"), env, LOG_DIR).start()
    wait_http(f"http://127.0.0.1:{port}/healthz")
    yield {"url": f"http://127.0.0.1:{port}", "key": demo["api_key"], "agent_id": str(demo["agent_id"]),
           "key_file": str(work / "key"), "database": str(work / "agentq.sqlite3")}
    web.stop()
    worker.stop()


def test_readme_curl_session_answers_on_the_sqlite_default(sqlite_deployment: dict[str, str]) -> None:
    script = readme_curl_session()
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", script], capture_output=True, text=True, timeout=60,
                            env=child_env(AGENTQ=sqlite_deployment["url"], KEY=sqlite_deployment["key"],
                                          AGENT=sqlite_deployment["agent_id"]), cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    final = json.loads(result.stdout.strip().splitlines()[-1])
    assert final["status"] == "success"
    assert final["role"] == "assistant" and final["seq"] == 2
    assert final["content"] == "echo: Hello, agent!"
    assert final["model"] == "demo-echo"
    assert final["cost"] == "0.000018"


def test_readiness_answers_within_its_bound_while_another_writer_holds_the_file(
        sqlite_deployment: dict[str, str]) -> None:
    """An operator's `sqlite3` shell left in a write transaction holds the file's lock, which every transaction
    waits for: `/readyz` waited the whole 30 s busy timeout for it. It answers 503 within its probe's bound (the
    connect timeout, 5 s), and 200 once the lock is let go."""
    import sqlite3

    holder = sqlite3.connect(sqlite_deployment["database"], isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")
        asked = time.monotonic()
        held = httpx.get(f"{sqlite_deployment['url']}/readyz", timeout=60)
        waited = time.monotonic() - asked
        assert (held.status_code, held.json()["checks"]["database"]) == (503, "error: OperationalError")
        assert waited < 15, f"/readyz answered after {waited:.1f}s"
    finally:
        holder.rollback()
        holder.close()
    assert httpx.get(f"{sqlite_deployment['url']}/readyz", timeout=60).status_code == 200


def test_idempotent_redelivery_and_balance_on_sqlite(sqlite_deployment: dict[str, str]) -> None:
    base, headers = sqlite_deployment["url"], {"Authorization": f"Bearer {sqlite_deployment['key']}"}
    before = httpx.get(f"{base}/api/me", headers=headers).json()["balance"]
    conversation = httpx.post(f"{base}/api/conversations", headers=headers,
                              json={"agent_id": int(sqlite_deployment["agent_id"]), "project_id": 99}).json()
    accepted = httpx.post(f"{base}/api/conversations/{conversation['id']}/messages",
                          headers={**headers, "Idempotency-Key": "sqlite-1"}, json={"content": "two words"})
    again = httpx.post(f"{base}/api/conversations/{conversation['id']}/messages",
                       headers={**headers, "Idempotency-Key": "sqlite-1"}, json={"content": "two words"})
    assert accepted.status_code == again.status_code == 202
    message_id = accepted.json()["assistant_message"]["id"]
    assert again.json() == accepted.json()  # the first answer, its times read back from SQLite as written
    done = wait_for(lambda: (m := httpx.get(f"{base}/api/messages/{message_id}", headers=headers).json())["status"]
                    == "success" and m, what="the SQLite turn")
    after = httpx.get(f"{base}/api/me", headers=headers).json()["balance"]
    assert Decimal(before) - Decimal(after) == Decimal(done["cost"])
    ledger = httpx.get(f"{base}/api/me/transactions", headers=headers).json()["items"]
    assert len([t for t in ledger if t["message_id"] == message_id]) == 1


def test_a_turn_that_outlives_its_first_lease_renewal_runs_to_its_end_on_sqlite(
        sqlite_deployment: dict[str, str]) -> None:
    """SQLite (3.40) evaluates `cancel_requested_at IS NOT NULL` in a RETURNING clause as true on a NULL: the
    lease renewal, which read a user's stop that way, stopped every turn still running at its first renewal
    (a third of the lease: 1 s here, 10 s by default), `cancelled` "stopped on request" with no stop asked."""
    base, headers = sqlite_deployment["url"], {"Authorization": f"Bearer {sqlite_deployment['key']}"}
    model = httpx.post(f"{base}/api/admin/models", headers=headers, json={
        "name": "slow-on-sqlite", "model": "echo;words=12;gap=0.25", "base_url": MOCK_URL,
        "input_price_per_1k": "0", "output_price_per_1k": "0"}).json()["id"]
    agent = httpx.post(f"{base}/api/admin/agents", headers=headers, json={
        "name": "slow", "system_prompt": "You are slow.", "model_id": model}).json()["id"]
    conversation = httpx.post(f"{base}/api/conversations", headers=headers, json={"agent_id": agent}).json()
    turn = httpx.post(f"{base}/api/conversations/{conversation['id']}/messages", headers=headers,
                      json={"content": "take your time"}).json()["assistant_message"]["id"]
    done = wait_for(lambda: (m := httpx.get(f"{base}/api/messages/{turn}", headers=headers).json())["status"]
                    not in ("pending", "processing") and m, what="the slow SQLite turn")
    assert (done["status"], done["content"]) == ("success", " ".join(f"w{i}" for i in range(12)))


def test_debug_costs_add_up_past_what_a_64_bit_sum_of_millionths_holds_on_sqlite(
        sqlite_deployment: dict[str, str]) -> None:
    """Money is whole millionths on SQLite, whose SUM of integers fails with an overflow past 9.2e12 credits:
    ten test runs at the highest price made `GET /api/admin/debug-costs` a 503 for good, whatever the grouping.
    The total is exact, as on PostgreSQL."""
    base, headers = sqlite_deployment["url"], {"Authorization": f"Bearer {sqlite_deployment['key']}"}
    highest = "999999999999.999999"
    model = httpx.post(f"{base}/api/admin/models", headers=headers, json={
        "name": "priciest-on-sqlite", "model": "echo", "base_url": MOCK_URL,
        "input_price_per_1k": highest, "output_price_per_1k": highest}).json()["id"]
    agent = httpx.post(f"{base}/api/admin/agents", headers=headers, json={
        "name": "priciest", "system_prompt": "You cost.", "model_id": model}).json()["id"]
    runs = [httpx.post(f"{base}/api/admin/agents/{agent}/debug/execute", headers=headers,
                       json={"content": "x" * 8000}).json()["debug_log_id"] for _ in range(10)]

    def ended(run: int) -> dict[str, str] | None:
        log = httpx.get(f"{base}/api/admin/debug-logs/{run}", headers=headers).json()
        return log if log["status"] not in ("pending", "processing") else None

    logs = [wait_for(functools.partial(ended, run), what=f"test run {run}") for run in runs]
    assert [log["status"] for log in logs] == ["success"] * 10
    assert {log["cost"] for log in logs} == {highest}
    for group_by, key in (("agent", agent), ("model", model)):
        response = httpx.get(f"{base}/api/admin/debug-costs?group_by={group_by}", headers=headers)
        assert response.status_code == 200, response.text
        line = next(item for item in response.json()["items"] if item["key"] == key)
        assert (line["runs"], line["cost"]) == (10, "9999999999999.999990")


RESERVATIONS_ON_SQLITE = """
import sqlite3, sys
from decimal import Decimal
from app.db import plain_transaction
from app.ledger import release, reserve
from app.schema import init_schema
from app.users import create_user

init_schema()
user_id = create_user("exact", balance=Decimal("0.3")).user.id
results = []
with plain_transaction() as connection:
    for amount in ("0.1", "0.2"):
        results.append(reserve(connection, user_id, Decimal(amount)).rowcount)
with plain_transaction() as connection:
    for amount in ("0.1", "0.2"):
        release(connection, user_id, Decimal(amount))
raw = sqlite3.connect(sys.argv[1]).execute("SELECT balance, reserved FROM users WHERE id = ?", (user_id,)).fetchone()
print(results, raw)
with sqlite3.connect(sys.argv[1]) as older:  # a file as an earlier agentq wrote it: amounts as numbers
    older.execute("UPDATE users SET balance = 12.5, reserved = 0.25 WHERE id = ?", (user_id,))
    older.execute("PRAGMA user_version = 0")
print(init_schema().converted_money_columns)
print(sqlite3.connect(sys.argv[1]).execute("SELECT balance, reserved FROM users WHERE id = ?", (user_id,)).fetchone())
"""


def test_money_arithmetic_on_sqlite_is_exact(tmp_path: Path) -> None:
    """SQLite does a reservation's arithmetic itself, inside the statement; on a NUMERIC column that is binary
    floating point there: with 0.1 of a balance of 0.3 held, 0.3 - 0.1 fell just short of a 0.2 reservation.
    Money is whole millionths there, so both are held, and both released leave nothing held; a file an
    earlier agentq wrote, with amounts as numbers, is converted once by `db init`."""
    database = tmp_path / "money.sqlite3"
    result = subprocess.run([str(VENV_BIN / "python"), "-c", RESERVATIONS_ON_SQLITE, str(database)],
                            env=child_env(DATABASE_URL=f"sqlite:///{database}"), cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    reserved, converted, older = result.stdout.strip().splitlines()
    assert reserved == "[1, 1] (300000, 0)"
    assert (converted, older) == ("10", "(12500000, 250000)")


def test_dead_letters_are_paged_on_sqlite(tmp_path: Path) -> None:
    """SQLite keeps a time as text without its offset, and compares row values itself: a cursor pages there as
    on PostgreSQL, letters that died at one time included."""
    import sqlite3

    database = tmp_path / "paging.sqlite3"
    env = child_env(DATABASE_URL=f"sqlite:///{database}",
                    AGENTQ_BROKER_NAMESPACE=f"agentq-sqlite-paging-{uuid.uuid4().hex[:8]}")
    subprocess.run(agentq("db", "init"), env=env, check=True, cwd=ROOT, capture_output=True)
    with sqlite3.connect(database) as connection:
        connection.executemany(
            "INSERT INTO dead_letters (id, redis_message_id, queue, actor, args, retries, error, dead_at) "
            "VALUES (?, ?, 'turns', 'run_turn', '[]', 0, 'boom', ?)",
            [(ident, f"m-{ident}", f"2026-12-03 10:00:0{second}.250000")
             for ident, second in ((1, 7), (2, 9), (3, 9), (4, 9), (5, 8), (6, 5))])

    def page(*flags: str) -> tuple[list[int], str | None]:
        done = subprocess.run(agentq("dlq", "list", "--limit", "2", *flags), env=env, cwd=ROOT, capture_output=True,
                              text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        listed = json.loads(done.stdout)
        return [item["id"] for item in listed["items"]], listed["next_cursor"]

    pages, cursor = [page()], None
    while (cursor := pages[-1][1]) is not None:
        pages.append(page("--cursor", cursor))
    assert [ids for ids, _ in pages] == [[4, 3], [2, 5], [1, 6]]
