"""The `agentq` command's own start-up, in a fresh interpreter as the console script runs it."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from tests.conftest import LOG_DIR, child_env
from tests.support import ROOT, VENV_BIN, Process, agentq, free_port, run_to_end, wait_for, wait_http

if TYPE_CHECKING:
    from tests.conftest import World

STORAGE_AFTER_START = """
import os, sys
from cli.main import main
try:
    main([sys.argv[1], "--help"])
except SystemExit:
    pass
from prometheus_client import values
print(os.environ.get("PROMETHEUS_MULTIPROC_DIR"), values.ValueClass.__name__)
"""


def _storage_after_start(tmp_path: Path, command: str, cwd: Path | None = None, **env: str) -> list[str]:
    environment = {k: v for k, v in child_env(**env).items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    environment["TMPDIR"] = str(tmp_path)
    environment["PYTHONPATH"] = str(ROOT)
    ran = subprocess.run([str(VENV_BIN / "python"), "-c", STORAGE_AFTER_START, command], env=environment,
                         cwd=cwd or tmp_path, capture_output=True, text=True, timeout=60)
    assert ran.returncode == 0, ran.stderr
    return ran.stdout.splitlines()[-1].split()


def test_counters_go_to_the_deployments_shared_directory_when_none_is_configured(tmp_path: Path) -> None:
    """Without PROMETHEUS_MULTIPROC_DIR (the Procfile, `make run`) web and worker pick a directory they share,
    before prometheus_client is first imported: it chooses in-process storage for good at that import, and
    the API's /metrics would then never see a worker's counter. The directory is the deployment's (its
    database and Redis): two on one host added up each other's counters. Other commands write none (a
    `dlq list` from cron left a file a run, which every scrape read)."""
    web, worker = _storage_after_start(tmp_path, "web"), _storage_after_start(tmp_path, "worker")
    assert web == worker and web[1] == "MmapedValue"
    assert web[0].startswith(str(tmp_path / f"agentq-metrics-{os.getuid()}-"))
    other = _storage_after_start(tmp_path, "worker", DATABASE_URL="postgresql+psycopg://postgres@127.0.0.1/other")
    assert other[1] == "MmapedValue" and other[0] != web[0]
    assert _storage_after_start(tmp_path, "dlq") == ["None", "MutexValue"]


def test_db_init_makes_a_new_sqlite_database_its_owners_alone(tmp_path: Path) -> None:
    """`agentq db init` made the SQLite file, which holds every conversation, with the umask's mode:
    world-readable under 022, outside `make run`, whose Makefile made its directory private. A file and a
    directory that exist keep their operator's mode."""
    import stat

    def mode(path: Path) -> int:
        return stat.S_IMODE(path.stat().st_mode)

    def init(url: str) -> None:
        ran = subprocess.run([str(VENV_BIN / "agentq"), "db", "init"], env=child_env(DATABASE_URL=url), cwd=ROOT,
                             capture_output=True, text=True, timeout=60, preexec_fn=lambda: os.umask(0o022))
        assert ran.returncode == 0, ran.stderr

    new = tmp_path / "made" / "var" / "agentq.sqlite3"
    init(f"sqlite:///{new}")
    assert (mode(new.parent), mode(new)) == (0o700, 0o600)
    assert [mode(Path(f"{new}{end}")) for end in ("-wal", "-shm") if Path(f"{new}{end}").exists()] in (
        [], [0o600], [0o600, 0o600])
    assert mode(tmp_path / "made") == 0o755  # a parent made on the way is the operator's tree, not the file's home
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o755)
    (shared / "agentq.sqlite3").touch()
    (shared / "agentq.sqlite3").chmod(0o640)
    init(f"sqlite:///{shared / 'agentq.sqlite3'}")
    assert (mode(shared), mode(shared / "agentq.sqlite3")) == (0o755, 0o640)


def test_a_web_and_a_worker_whose_urls_spell_one_deployment_two_ways_share_their_counters(tmp_path: Path) -> None:
    """The directory was named after the URLs as written: a worker whose `REDIS_URL` lacked the API's `/0`, or
    named the default port, or whose SQLite path was relative to another directory, wrote its counters where
    the API's /metrics never looked, and nothing said so."""
    database, redis_url = child_env()["DATABASE_URL"], child_env()["REDIS_URL"]
    assert database.startswith("postgresql+psycopg://postgres@127.0.0.1:5432/")
    assert redis_url.startswith("redis://127.0.0.1:6379/")
    web = _storage_after_start(tmp_path, "web")
    respelled = _storage_after_start(
        tmp_path, "worker", DATABASE_URL=database.replace("+psycopg://postgres@127.0.0.1:5432/",
                                                          "://postgres:a-password@127.0.0.1/"),
        REDIS_URL=redis_url.replace("127.0.0.1:6379", "127.0.0.1"))
    assert respelled == web
    other_redis = _storage_after_start(tmp_path, "worker", REDIS_URL=redis_url.rsplit("/", 1)[0] + "/15")
    assert other_redis[0] != web[0]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    sqlite = f"sqlite:///{tmp_path / 'agentq.sqlite3'}"
    assert _storage_after_start(tmp_path, "web", DATABASE_URL=sqlite) == _storage_after_start(
        tmp_path, "worker", elsewhere, DATABASE_URL=sqlite)
    assert _storage_after_start(tmp_path, "web", DATABASE_URL="sqlite:///agentq.sqlite3")[0] != _storage_after_start(
        tmp_path, "worker", elsewhere, DATABASE_URL="sqlite:///agentq.sqlite3")[0]


DOTENV_REACHES = """
import os
from decimal import Decimal
from cli.main import build_parser, main, worker_size
try:
    main(["--help"])
except SystemExit:
    pass
from app.upstream_clients import client_for
from app.model_target import ModelTarget
target = ModelTarget(1, "m", "echo", "http://127.0.0.1:9/v1", "PROVIDER_API_KEY", Decimal(0), Decimal(0), None)
print(client_for(target).api_key, os.environ["OPENAI_API_KEY"], worker_size(build_parser().parse_args(["worker"]))[1])
"""


def test_a_dotenv_file_supplies_model_keys_and_the_commands_defaults(tmp_path: Path) -> None:
    """`.env` reaches what reads the environment directly, not only the settings: a model's key and the
    worker's defaults; a variable set in the environment itself wins."""
    (tmp_path / ".env").write_text("PROVIDER_API_KEY=sk-from-dotenv\nOPENAI_API_KEY=sk-dotenv-loses\n"
                                   "AGENTQ_WORKER_THREADS=5\n")
    env = {k: v for k, v in child_env(OPENAI_API_KEY="sk-from-environment").items()
           if k not in ("PROVIDER_API_KEY", "AGENTQ_WORKER_THREADS")}
    env["PYTHONPATH"] = str(ROOT)
    ran = subprocess.run([str(VENV_BIN / "python"), "-c", DOTENV_REACHES], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=60)
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.splitlines()[-1].split() == ["sk-from-dotenv", "sk-from-environment", "5"]


def test_users_create_refuses_a_name_the_column_cannot_hold_with_the_contracts_error(database: str) -> None:
    """The API's schema bounds a user's name; the command line reached the database with a longer one and
    printed PostgreSQL's traceback instead of one JSON error."""
    import json

    result = subprocess.run([str(VENV_BIN / "agentq"), "users", "create", "x" * 201], env=child_env(), cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert json.loads(result.stderr)["error"]["code"] == "validation_failed"
    # and a name of two lines, which the API refuses too: it would forge a line of every log that names it
    result = subprocess.run([str(VENV_BIN / "agentq"), "users", "create", "a\nb"], env=child_env(), cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert (result.returncode, json.loads(result.stderr)["error"]) == (1, {
        "code": "validation_failed", "message": "name must not contain line breaks or control characters."})


@pytest.mark.parametrize(("args", "says"), [
    (["worker", "--threads", "0"], "must be 1 to 10000, not 0"),
    (["worker", "--processes", "0"], "must be 1 to 256, not 0"),
    # a typo's count of processes was forked one after another, hundreds a second, past any stop
    (["worker", "--processes", "99999999999999999999"], "must be 1 to 256, not 99999999999999999999"),
    (["web", "--threads", "10001"], "must be 1 to 10000, not 10001"),
    (["worker", "--queues", "nosuch"], "invalid choice: 'nosuch'"),
    (["web", "--port", "99999"], "a port is 1..65535, not 99999"),
    (["web", "--host", ""], "a host is a name or an address to listen on, not ''"),  # it listened everywhere
])
def test_options_that_would_leave_a_process_idle_or_broken_are_usage_errors(args: list[str], says: str) -> None:
    """A worker with no thread held a message out of every queue's sight, one with no process restarted
    for ever, one on an unknown queue served nothing; a port out of range was a traceback."""
    returncode, stderr = _run_agentq(args, {})
    assert (returncode, says in stderr, "Traceback" in stderr) == (2, True, False), stderr


def _run_agentq(args: list[Any], env: dict[str, str]) -> tuple[int, str]:
    """Run one command to its end; its exit status and what it wrote to stderr."""
    argv = [str(VENV_BIN / "agentq").encode(), *args] if isinstance(args[0], bytes) else agentq(*args)
    returncode, _, stderr = run_to_end(argv, child_env(**env))
    return returncode, stderr


@pytest.mark.parametrize(("args", "env", "code"), [
    (["dlq", "list"], {"DATABASE_URL": "postgresql+psycopg://postgres@127.0.0.1:9/agentq"}, "service_unavailable"),
    ([b"users", b"create", b"\xff"], {}, "validation_failed"),
    # a SQLite path is relative to where the command runs: elsewhere it opens an empty file
    (["users", "create", "x"], {"DATABASE_URL": f"sqlite:///{LOG_DIR}/never-initialised.sqlite3"},
     "service_unavailable: run `agentq db init`"),
    # a worker there would dead-letter every turn it took: it says where it looked, and does not start
    (["worker", "--processes", "1", "--threads", "1"],
     {"DATABASE_URL": f"sqlite:///{LOG_DIR}/never-initialised-worker.sqlite3"},
     f"service_unavailable: The SQLite file {LOG_DIR.resolve()}/never-initialised-worker.sqlite3 does not exist: run "
     "`agentq db init` to create it"),
])
def test_an_operators_mistake_is_one_json_error_not_a_traceback(args: list[Any], env: dict[str, str],
                                                                 code: str) -> None:
    import json

    returncode, stderr = _run_agentq(args, env)
    assert returncode == 1, stderr
    assert "Traceback" not in stderr
    code, _, says = code.partition(": ")
    error = json.loads(stderr)["error"]
    assert error["code"] == code and says in error["message"]


def test_a_worker_refuses_a_database_a_releases_new_column_was_not_added_to(tmp_path: Path) -> None:
    """Workers deployed before `agentq db init` upgraded the database started, and failed every claim on the
    missing column until each turn's retries were spent: the worker says what is missing and does not start."""
    import json
    import sqlite3

    url = f"sqlite:///{tmp_path}/older.sqlite3"
    assert subprocess.run([str(VENV_BIN / "agentq"), "db", "init"], env=child_env(DATABASE_URL=url), cwd=ROOT,
                          capture_output=True, timeout=60).returncode == 0
    with sqlite3.connect(tmp_path / "older.sqlite3") as older:
        older.execute("ALTER TABLE turns DROP COLUMN fell_back")

    returncode, stderr = _run_agentq(["worker", "--processes", "1", "--threads", "1"], {"DATABASE_URL": url})
    assert (returncode, "Traceback" in stderr) == (1, False), stderr
    assert json.loads(stderr)["error"] == {
        "code": "schema_incomplete",
        "message": f"The database {tmp_path}/older.sqlite3 lacks the columns turns.fell_back of this release: run "
                   "`agentq db init` against it to upgrade it."}


def test_the_web_server_opens_no_control_socket_shared_by_every_instance_on_the_host(tmp_path: Path) -> None:
    """gunicorn 27 opens one per user at the same path: each `agentq web` took it over, and stopping one
    removed it from the others."""
    port = free_port()
    web = Process("web-control-socket", agentq("web", "--port", str(port), "--workers", "1", "--threads", "4"),
                  child_env(XDG_RUNTIME_DIR=str(tmp_path)), LOG_DIR).start()
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz")
        assert list(tmp_path.iterdir()) == []
    finally:
        web.stop()


@pytest.mark.parametrize("given", ["::1", "[::1]"])
def test_the_web_server_listens_on_an_ipv6_address(given: str) -> None:
    """The bind was `host:port`, which gunicorn cannot split for an address with colons of its own: `--host ::1`
    stopped with "'' is not a valid port number"."""
    port = free_port()
    web = Process("web-ipv6", agentq("web", "--host", given, "--port", str(port), "--workers", "1", "--threads", "2"),
                  child_env(), LOG_DIR).start()
    try:
        wait_http(f"http://[::1]:{port}/healthz")
    finally:
        web.stop()


@pytest.mark.parametrize(("args", "env", "says"), [
    (["db", "init"], {"AGENTQ_MAX_ACTIVE_CONVERSATIONS": "0"},
     "AGENTQ_MAX_ACTIVE_CONVERSATIONS='0': Input should be greater than or equal to 1"),
    # the password is not printed
    (["users", "create", "x"], {"DATABASE_URL": "mysql://root:s3cret@127.0.0.1/agentq"},
     "DATABASE_URL='mysql://root:***@127.0.0.1/agentq': must be a SQLite file's URL"),
    (["web", "--port", str(free_port())], {"AGENTQ_LEASE_SECONDS": "abc"},
     "AGENTQ_LEASE_SECONDS='abc': Input should be a valid number"),
    (["worker", "--processes", "1"], {"DATABASE_URL": "sqlite://"}, "DATABASE_URL='sqlite://': must be a SQLite"),
    # a window past the calendar's range passed validation, then every new conversation was a 500
    (["db", "init"], {"AGENTQ_DEDUP_WINDOW_SECONDS": "100000000000"},
     "AGENTQ_DEDUP_WINDOW_SECONDS='100000000000': Input should be less than or equal to 31536000"),
    (["db", "init"], {"AGENTQ_LEASE_SECONDS": "nan"}, "AGENTQ_LEASE_SECONDS='nan': Input should be a finite number"),
    # settings each valid alone that together break what they set
    (["db", "init"], {"AGENTQ_DEFAULT_MAX_TOKENS": "8192"},
     "AGENTQ_DEFAULT_MAX_TOKENS (8192) must be less than AGENTQ_DEFAULT_CONTEXT_WINDOW (8192)"),
    (["db", "init"], {"AGENTQ_STALE_PENDING_SECONDS": "30", "AGENTQ_MAX_BACKOFF_MS": "30000"},
     "AGENTQ_STALE_PENDING_SECONDS (30) must be at least twice AGENTQ_MAX_BACKOFF_MS (30000 ms)"),
    # Dramatiq takes a backoff of 0 for none given: its defaults, retries up to a week apart
    (["db", "init"], {"AGENTQ_MAX_BACKOFF_MS": "0"},
     "AGENTQ_MAX_BACKOFF_MS='0': Input should be greater than or equal to 1"),
    # a command that never connects to Redis went through with it; `dlq list` failed with a traceback
    (["users", "create", "nobody"], {"REDIS_URL": "notaurl"}, "REDIS_URL='notaurl': must be a Redis URL"),
    (["dlq", "list"], {"REDIS_URL": "redis://127.0.0.1:port/0"}, "REDIS_URL='redis://127.0.0.1:port/0': must be"),
    (["worker", "--processes", "1"], {"REDIS_URL": "redis://127.0.0.1:6379/abc"},
     "the database after the port must be a number, not 'abc'"),
    (["web", "--port", str(free_port())], {"AGENTQ_LOG_LEVEL": "LOUD"}, "AGENTQ_LOG_LEVEL='LOUD': Input should be"),
    (["db", "init"], {"AGENTQ_MODERATION_URL": "notaurl"}, "AGENTQ_MODERATION_URL='notaurl': must be an http:// or "
     "https:// URL"),
    # the endpoint's whole path: the client adds /moderations to it, every call answered 404, and moderation,
    # which fails open, was off with a warning a turn
    (["db", "init"], {"AGENTQ_MODERATION_URL": "http://127.0.0.1:8765/v1/moderations"},
     "AGENTQ_MODERATION_URL='http://127.0.0.1:8765/v1/moderations': must be the API's base URL, to which the client "
     "adds /moderations: drop /moderations from its end (https://host/v1)"),
    # the process-size variables were refused by argparse under the flag's name, which the operator never typed
    (["web"], {"AGENTQ_WEB_WORKERS": "two"}, "AGENTQ_WEB_WORKERS='two': 'two' is not a whole number"),
    (["worker"], {"AGENTQ_WORKER_THREADS": "0"}, "AGENTQ_WORKER_THREADS='0': must be 1 to 10000, not 0"),
    (["web"], {"AGENTQ_WEB_WORKERS": "1000"}, "AGENTQ_WEB_WORKERS='1000': must be 1 to 256, not 1000"),
    (["worker"], {"AGENTQ_WORKER_METRICS_PORT": "99999"}, "AGENTQ_WORKER_METRICS_PORT='99999': a port is 1..65535"),
    # no database named: libpq picked the user's own, and `db init` wrote agentq's tables into it
    (["db", "init"], {"DATABASE_URL": "postgresql://127.0.0.1:5432"},
     "DATABASE_URL='postgresql://127.0.0.1:5432': must name its database"),
    # a URL no one can read was a traceback from the first connection, and a 500 from every request of the API
    (["users", "create", "x"], {"DATABASE_URL": "postgresql://127.0.0.1:notaport/agentq"},
     "is not a database URL that can be read: invalid literal for int() with base 10: 'notaport'"),
    (["dlq", "list"], {"REDIS_URL": "redis://127.0.0.1:6379/0?bogus_option=1"},
     "unexpected keyword argument 'bogus_option'"),
    # a password in a query option, or one holding an `@`, was printed (in part) too
    (["users", "create", "x"], {"DATABASE_URL": "postgresql://u@127.0.0.1:notaport/agentq?password=s3cret"},
     "DATABASE_URL='postgresql://u@127.0.0.1:notaport/agentq?password=***': is not a database URL"),
    (["users", "create", "x"], {"REDIS_URL": "redis://:s3c@ret@127.0.0.1:6379/0?bogus_option=1"},
     "REDIS_URL='redis://:***@127.0.0.1:6379/0?bogus_option=1': must be a Redis URL"),
    # a mistyped secret was printed back whole
    (["users", "create", "x"], {"AGENTQ_METRICS_TOKEN": "s3cret-but-short"[:13]},
     "AGENTQ_METRICS_TOKEN=<hidden>: Value should have at least 16 characters after validation, not 13"),
    # counters' directory: a traceback from the first counter a process wrote
    (["worker", "--processes", "1"], {"PROMETHEUS_MULTIPROC_DIR": str(ROOT / "README.md")},
     f"PROMETHEUS_MULTIPROC_DIR='{ROOT / 'README.md'}': not a directory"),
])
def test_a_setting_that_cannot_work_stops_the_command_with_one_json_error(args: list[str], env: dict[str, str],
                                                                          says: str) -> None:
    """A setting pydantic refuses (or a database URL no driver here serves) was a traceback, from deep in
    whichever call first read the settings; it is the variable, its value and what it must be."""
    import json

    command = subprocess.Popen([str(VENV_BIN / "agentq"), *args], env=child_env(**env), cwd=ROOT, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        _, stderr = command.communicate(timeout=30)
    finally:  # a server that started after all must not outlive the test
        if command.poll() is None:
            os.killpg(command.pid, signal.SIGKILL)
            command.wait()
    assert (command.returncode, "Traceback" in stderr) == (2, False), stderr
    error = json.loads(stderr)["error"]
    assert error["code"] == "invalid_configuration" and says in error["message"] and "s3cret" not in stderr


@pytest.mark.parametrize(("args", "says"), [
    (["dlq", "show", "99999999999999999999"], "an id is 1..9223372036854775807, not 99999999999999999999"),
    (["dlq", "purge", "0"], "an id is 1..9223372036854775807, not 0"),
    (["debug", "route", "1", "hello", "--admin-id", "99999999999999999999"], "an id is 1.."),
    (["debug", "prompt", "1", "hi", "--admin-id", "1", "--conversation-id", "-5"], "not -5"),
    (["debug", "execute", "1", "hi", "--admin-id", "1", "--wait", "--timeout", "-1"], "and finite, not -1"),
    # taken without a word, and the run started, as if the operator would be told how it ended
    (["debug", "execute", "1", "hi", "--admin-id", "1", "--timeout", "5"], "--timeout is how long --wait waits"),
    (["users", "create", "typo", "--balance", "5_00"], "digits 0-9, an optional sign and decimal point, not '5_00'"),
    # an account opened with 0, exit 0, as if the operator had typed nothing
    (["users", "create", "in-debt", "--balance=-5"], "a balance must be between 0 and 999999999999.999999, with at "
                                                     "most 6 decimals, not -5"),
    # said as typed, not as `1E-7`
    (["users", "create", "tiny", "--balance", "0.0000001"], "with at most 6 decimals, not 0.0000001"),
    (["dlq", "requeue"], "one of the arguments id --all is required"),
    (["dlq", "purge", "5", "--all"], "not allowed with argument id"),
    # named by the parser's attribute, `dlq_command`, which no operator typed or was shown
    (["dlq"], "agentq dlq: error: the following arguments are required: COMMAND"),
    ([], "agentq: error: the following arguments are required: COMMAND"),
])
def test_an_id_or_a_wait_out_of_range_or_a_missing_choice_is_a_usage_error(args: list[str], says: str) -> None:
    """An id past the database's integer was its `bigint out of range` traceback; a negative wait was taken, and
    a balance of `5_00` was 500; `dlq requeue` with neither an id nor --all (or both) exited 1, not 2."""
    result = subprocess.run([str(VENV_BIN / "agentq"), *args], env=child_env(), cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    assert (result.returncode, says in result.stderr, "Traceback" in result.stderr) == (2, True, False), result.stderr


def test_debug_execute_refuses_content_the_database_cannot_store(world: World) -> None:
    """A command line's undecodable bytes arrive as lone surrogates: refused as the API refuses them (its
    schema's check), not a traceback from the database driver."""
    import json

    agent_id = world.agent(world.model())
    admin_id = world.api.get("/api/me", world.admin_key).json["id"]
    result = subprocess.run([str(VENV_BIN / "agentq").encode(), b"debug", b"execute", str(agent_id).encode(),
                             b"bad\xff", b"--admin-id", str(admin_id).encode()], env=child_env(), cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert (result.returncode, "Traceback" in result.stderr) == (1, False), result.stderr
    assert json.loads(result.stderr)["error"] == {
        "code": "validation_failed",
        "message": "content must be valid Unicode text (it holds a lone surrogate, which no UTF-8 encodes)."}


def test_debug_execute_waiting_past_its_timeout_says_so_in_json(world: World) -> None:
    """It printed the log as it was, then a line of plain text on stderr."""
    import json

    agent_id = world.agent(world.model(upstream="echo;ttft=5"))
    admin_id = world.api.get("/api/me", world.admin_key).json["id"]
    result = subprocess.run([str(VENV_BIN / "agentq"), "debug", "execute", str(agent_id), "slow", "--admin-id",
                             str(admin_id), "--wait", "--timeout", "0.5"], env=child_env(), cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    log = json.loads(result.stdout)
    hint = " (is a worker serving the `debug` queue running?)" if log["status"] == "pending" else ""
    assert (result.returncode, json.loads(result.stderr)["error"]) == (1, {
        "code": "still_running", "message": f"test run {log['id']} is still {log['status']} after 0.5s{hint}"})


def test_seeding_the_demo_again_reuses_its_user_and_follows_the_mock_upstream_to_its_new_port(tmp_path: Path) -> None:
    """`make run` with another AGENTQ_DEMO_UPSTREAM_PORT: the demo model kept the first address, and every
    demo turn failed with llm_error. The demo key's file is its owner's alone."""
    import json
    import sqlite3
    import stat

    env = child_env(DATABASE_URL=f"sqlite:///{tmp_path}/demo.sqlite3")
    subprocess.run([str(VENV_BIN / "agentq"), "db", "init"], env=env, cwd=ROOT, check=True, capture_output=True)
    seeded = [json.loads(subprocess.run([str(VENV_BIN / "agentq"), "demo", "seed", "--mock-url", url, "--key-file",
                                         str(tmp_path / "key")], env=env, cwd=ROOT, check=True, capture_output=True,
                                        text=True).stdout)
              for url in ("http://127.0.0.1:8765/v1", "http://127.0.0.1:9876/v1")]
    assert seeded[0] == seeded[1]
    with sqlite3.connect(tmp_path / "demo.sqlite3") as database:
        models = database.execute("SELECT base_url FROM llm_models WHERE name = 'demo-echo'").fetchall()
        users = database.execute("SELECT count(*) FROM users").fetchone()
    assert (models, users) == ([("http://127.0.0.1:9876/v1",)], (1,))
    # an administrator's key, readable by its owner alone: the umask left it readable by every user
    assert stat.S_IMODE((tmp_path / "key").stat().st_mode) == 0o600


def test_seeding_the_demo_with_an_endpoint_no_worker_could_reach_is_refused_and_stores_nothing(tmp_path: Path) -> None:
    """The API refuses such a `base_url`; the seed, which writes the model without the API, stored it as given,
    and every demo turn then failed with llm_error."""
    import json
    import sqlite3

    env = child_env(DATABASE_URL=f"sqlite:///{tmp_path}/demo.sqlite3")
    subprocess.run([str(VENV_BIN / "agentq"), "db", "init"], env=env, cwd=ROOT, check=True, capture_output=True)
    status, stdout, stderr = run_to_end(agentq("demo", "seed", "--mock-url", "http:///v1", "--key-file",
                                               str(tmp_path / "key")), env)
    assert (status, stdout, json.loads(stderr)) == (1, "", {"error": {
        "code": "validation_failed", "message": "base_url: must be written as http://host/… or https://host/…."}})
    with sqlite3.connect(tmp_path / "demo.sqlite3") as database:
        assert database.execute("SELECT (SELECT count(*) FROM llm_models), (SELECT count(*) FROM users)").fetchone() \
            == (0, 0)


def test_a_reader_that_went_away_or_a_port_taken_ends_a_command_without_a_traceback(tmp_path: Path) -> None:
    """`agentq dlq show 1 | head -c 100` ended in a BrokenPipeError traceback; `agentq mock-llm` on a port
    in use in an OSError one."""
    import json
    import socket

    env = child_env(DATABASE_URL=f"sqlite:///{tmp_path / 'agentq.sqlite3'}")
    subprocess.run([str(VENV_BIN / "agentq"), "db", "init"], env=env, cwd=ROOT, check=True, capture_output=True)
    listing = subprocess.Popen([str(VENV_BIN / "agentq"), "dlq", "list"], env=env, cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert listing.stdout is not None and listing.stderr is not None
    listing.stdout.close()  # long before the command has anything to write
    said = listing.stderr.read()
    assert (listing.wait(timeout=60), "Traceback" in said, "BrokenPipe" in said) == (1, False, False), said

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        mock = subprocess.run([str(VENV_BIN / "agentq"), "mock-llm", "--port", str(port)], env=child_env(),
                              cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert (mock.returncode, "Traceback" in mock.stderr) == (1, False), mock.stderr
    assert json.loads(mock.stderr)["error"]["message"].startswith(f"the mock upstream cannot serve on 127.0.0.1:{port}")


@pytest.mark.parametrize("handed_over", ["LISTEN_FDS", "GUNICORN_FD"])
def test_a_socket_handed_to_the_api_is_not_taken_for_a_port_in_use(handed_over: str,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """systemd's socket activation and gunicorn's USR2 upgrade hand the listening socket over: its port is
    taken by that very socket, and the check stopped both."""
    import socket

    from web.server import check_can_listen

    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        with pytest.raises(OSError, match="Address already in use"):
            check_can_listen("127.0.0.1", port)
        monkeypatch.setenv(handed_over, "3")
        check_can_listen("127.0.0.1", port)


def test_an_api_that_cannot_listen_says_where_and_why() -> None:
    """gunicorn tried five times over five seconds and stopped with "Can't connect to (…)", which reads as a
    client's failure, after a traceback-like line per try."""
    import json
    import socket

    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        started = subprocess.run([str(VENV_BIN / "agentq"), "web", "--host", "127.0.0.1", "--port", str(port)],
                                 env=child_env(), cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert (started.returncode, json.loads(started.stderr)["error"]) == (1, {
        "code": "unavailable", "message": f"the API cannot listen on 127.0.0.1:{port}: Address already in use"})


def test_db_init_says_what_it_did_in_one_json_line(tmp_path: Path) -> None:
    """Like every other command: a relative SQLite path is said as the absolute one it is (relative to the
    directory the command ran in), and a second run finds nothing left to do."""
    import json

    printed = []
    for _ in range(2):
        result = subprocess.run([str(VENV_BIN / "agentq"), "db", "init"], cwd=tmp_path, capture_output=True, text=True,
                                env=child_env(DATABASE_URL="sqlite:///relative.sqlite3"), timeout=60)
        assert result.returncode == 0, result.stderr
        printed.append(json.loads(result.stdout))
    assert printed == [{"database": str((tmp_path / "relative.sqlite3").resolve()), "applied": "models",
                        "added_columns": [], "converted_money_columns": 0, "rebuilt_tables": [],
                        "refused_key_variables": []}] * 2


def test_the_upgrade_and_a_starting_worker_name_the_models_whose_turns_cannot_have_their_key(tmp_path: Path) -> None:
    """A model written before `AGENTQ_MODEL_KEY_VARIABLES` bounded the variables (or before the operator
    narrowed it) fails every turn `endpoint_unusable` after the upgrade: the upgrade says so first. A model
    whose variable the workers' environment lacks fails the same way, and the API, whose environment is not
    theirs, cannot tell: a worker group says so as it starts (here it stops right after, its counters' port
    taken, before any process is forked)."""
    import json
    import socket
    import sqlite3

    env = child_env(DATABASE_URL=f"sqlite:///{tmp_path}/older.sqlite3")
    env.pop("DEEPSEEK_API_KEY", None)
    subprocess.run([str(VENV_BIN / "agentq"), "db", "init"], env=env, check=True, capture_output=True, timeout=60)
    with sqlite3.connect(tmp_path / "older.sqlite3") as older:
        older.executemany(
            "INSERT INTO llm_models (id, name, model, api_key_env, input_price_per_1k, output_price_per_1k, "
            "deleted_at) VALUES (?, ?, 'm', ?, 0, 0, ?)",
            [(1, "kept", "GPT_KEY", None), (2, "allowed", "DEEPSEEK_API_KEY", None), (3, "none", None, None),
             (4, "deleted", "OTHER_KEY", "2026-12-01 00:00:00"), (5, "set", "TEST_PROVIDER_API_KEY", None),
             (6, "gone", "DEEPSEEK_API_KEY", "2026-12-01 00:00:00")])
    result = subprocess.run([str(VENV_BIN / "agentq"), "db", "init"], env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["refused_key_variables"] == [{"id": 1, "name": "kept", "api_key_env": "GPT_KEY"}]

    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        worker = subprocess.run([str(VENV_BIN / "agentq"), "worker", "--metrics-port", str(port)], env=env,
                                capture_output=True, text=True, timeout=60)
    lines = worker.stderr.splitlines()
    assert (worker.returncode, [line.split("] ", 4)[-1] for line in lines if "API key" in line]) == (1, [
        "[WARNING] model 2 (allowed) reads its API key from DEEPSEEK_API_KEY, which is not set in this worker's "
        "environment: its turns end endpoint_unusable until it is set and the workers restarted"]), lines


def test_the_procfiles_web_and_worker_lines_run_a_turn(mock_upstream: Process) -> None:
    """The contract's Procfile, run by the Procfile runner `make run` uses (honcho), as a platform would run
    it: `agentq web --host 0.0.0.0 --port $PORT` serves the API, `agentq worker` runs its turns, and
    `agentq users create` says the admin's id, name and key in its one JSON object."""
    import json

    import httpx

    from tests.stack import stack_on_shared_redis

    with stack_on_shared_redis("procfile") as stack:
        stack.run("db", "init")
        created = json.loads(stack.run("users", "create", "ops", "--admin", "--balance", "2.5").stdout)
        assert sorted(created) == ["api_key", "id", "name"] and created["name"] == "ops"
        stack.admin_key = created["api_key"]
        env = stack.env(PORT=str(stack.web_port), AGENTQ_WORKER_PROCESSES="1", AGENTQ_WORKER_THREADS="2",
                        PATH=f"{VENV_BIN}:{os.environ['PATH']}")
        deployment = Process("procfile", [str(VENV_BIN / "honcho"), "-f", str(ROOT / "Procfile"), "start"], env,
                             LOG_DIR).start()
        try:
            wait_http(f"{stack.base_url}/healthz")
            me = stack.call("GET", "/api/me").json()
            assert (me["id"], me["name"], me["is_admin"], me["balance"]) == (created["id"], "ops", True, "2.500000")
            agent_id = stack.agent(stack.model("procfile-model", "echo"))
            turn = stack.send(stack.admin_key, stack.conversation(stack.admin_key, agent_id), "from the Procfile")
            done = stack.wait_terminal(stack.admin_key, turn["id"])
            assert (done["status"], done["content"]) == ("success", "echo: from the Procfile")
            # --host 0.0.0.0: the API answers on an address of this machine other than loopback's 127.0.0.1
            assert httpx.get(f"http://127.0.0.2:{stack.web_port}/healthz", timeout=5).status_code == 200
        finally:
            deployment.stop()


def test_the_contracts_settings_from_the_environment_shape_the_api(mock_upstream: Process) -> None:
    """`AGENTQ_MAX_CONTENT_CHARS`, `AGENTQ_MAX_ACTIVE_CONVERSATIONS` and `AGENTQ_DEDUP_WINDOW_SECONDS` as an
    operator sets them: in the environment of `agentq web` (no worker runs here, so turns stay pending)."""
    import json

    from tests.stack import stack_on_shared_redis

    with stack_on_shared_redis("settings", AGENTQ_MAX_CONTENT_CHARS="10", AGENTQ_MAX_ACTIVE_CONVERSATIONS="1",
                               AGENTQ_DEDUP_WINDOW_SECONDS="0") as stack:
        stack.run("db", "init")
        stack.admin_key = json.loads(stack.run("users", "create", "ops", "--admin").stdout)["api_key"]
        stack.start_web(web_workers=1)
        agent_id = stack.agent(stack.model("settings-model"))
        _, key = stack.user("limited")
        first, second = (stack.call("POST", "/api/conversations", key, json={"agent_id": agent_id}) for _ in range(2))
        assert (first.status_code, second.status_code) == (201, 201) and first.json()["id"] != second.json()["id"]
        too_long = stack.call("POST", f"/api/conversations/{first.json()['id']}/messages", key,
                              json={"content": "x" * 11})
        assert (too_long.status_code, too_long.json()["error"]["code"]) == (413, "content_too_large")
        stack.send(key, first.json()["id"], "x" * 10)
        over = stack.call("POST", f"/api/conversations/{second.json()['id']}/messages", key, json={"content": "hi"})
        assert (over.status_code, over.json()["error"]["code"]) == (429, "too_many_active_conversations")


def test_a_worker_whose_counters_port_is_taken_says_so_and_does_not_start(database: str) -> None:
    """(The test database must exist: a worker stops at once, before its port, on a database that refuses it.)"""
    import json
    import socket

    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        command = subprocess.run([str(VENV_BIN / "agentq"), "worker", "--processes", "1", "--metrics-port", str(port)],
                                 env=child_env(), cwd=ROOT, text=True, capture_output=True, timeout=60)
    assert command.returncode == 1, command.stderr
    error = json.loads(command.stderr.strip().splitlines()[-1])["error"]
    assert error["code"] == "unavailable"
    assert error["message"].startswith(f"the worker's counters cannot be served on 127.0.0.1:{port}: ")


COUNTERS_SERVER = """
import os, signal, socket, sys, threading, time
from app import metrics, worker_services
with socket.create_server(("127.0.0.1", 0)) as probe:
    port = probe.getsockname()[1]
metrics.serve_host_counters("127.0.0.1", port)
"""


def _in_a_fresh_process(body: str) -> subprocess.CompletedProcess[str]:
    import sys
    import textwrap

    return subprocess.run([sys.executable, "-c", COUNTERS_SERVER + textwrap.dedent(body)], cwd=ROOT, env=child_env(),
                          capture_output=True, text=True, timeout=60)


def test_the_counters_servers_threads_leave_the_stop_signals_to_the_main_thread() -> None:
    """The worker group's parent blocks SIGTERM in its main thread while it forks its processes; a thread
    that did not block it took a stop sent to the parent then, whose handler only notes it, and the stop
    was lost (`docker stop` signals the parent alone)."""
    done = _in_a_fresh_process("""
        others = [t for t in threading.enumerate() if t is not threading.main_thread()]
        assert others, "the server runs no thread"
        for thread in others:
            status = open(f"/proc/self/task/{thread.native_id}/status").read()
            blocked = int(next(line for line in status.splitlines() if line.startswith("SigBlk:")).split()[1], 16)
            print(all(blocked & (1 << (s - 1)) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)))
    """)
    assert done.returncode == 0, done.stderr
    assert set(done.stdout.split()) == {"True"}


def test_a_process_forked_from_the_counters_server_leaves_its_port_free_when_the_server_goes() -> None:
    """The worker processes are forked from the group's parent, which serves the counters: each kept a copy
    of the listening socket, and a parent killed outright left its port taken until they had stopped (a
    supervisor's restart then could not listen)."""
    done = _in_a_fresh_process("""
        booted, told = os.pipe()
        child = os.fork()
        if child == 0:
            worker_services.after_fork()
            os.write(told, b"booted")
            time.sleep(30)
            os._exit(0)
        try:
            os.read(booted, 6)
            metrics._counters_server.shutdown()  # its thread's poll holds the socket open until it returns
            metrics._counters_server.server_close()
            socket.create_server(("127.0.0.1", port)).close()
            print("free")
        finally:
            os.kill(child, signal.SIGKILL)
    """)
    assert (done.returncode, done.stdout.strip()) == (0, "free"), done.stderr


WARNS_AFTER_LOGGING = """
import warnings
from app.logging_setup import configure_logging
configure_logging()
warnings.warn("a library's warning")
"""


def test_a_warning_is_a_json_log_line_like_any_other() -> None:
    """A library's warning was a bare line on stderr between the JSON objects a log collector parses (one
    from SQLAlchemy broke the API's log this way)."""
    import json

    env = child_env(AGENTQ_LOG_JSON="true", PYTHONPATH=str(ROOT))
    ran = subprocess.run([str(VENV_BIN / "python"), "-c", WARNS_AFTER_LOGGING], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert ran.returncode == 0, ran.stderr
    [line] = ran.stderr.splitlines()
    record = json.loads(line)
    assert (record["level"], record["logger"]) == ("WARNING", "py.warnings")
    assert "UserWarning: a library's warning" in record["message"]


def _failed_command(args: list[str], **env: str) -> tuple[int, dict[str, str]]:
    """The exit status and the one JSON error line of a command expected to fail, with no traceback."""
    import json

    result = subprocess.run([str(VENV_BIN / "agentq"), *args], env=child_env(**env), cwd=ROOT, text=True,
                            capture_output=True, timeout=60)
    assert "Traceback" not in result.stderr, result.stderr
    return result.returncode, json.loads(result.stderr.strip().splitlines()[-1])["error"]


def test_a_database_that_refuses_its_url_is_a_setting_to_mend_and_no_worker_starts_on_it() -> None:
    """A database or role that does not exist was `service_unavailable` (wait and try again), and a worker
    started on it waited it out at every sweep as an outage, forever."""
    url = "postgresql+psycopg://127.0.0.1:5432/agentq_no_such_database"
    assert _failed_command(["users", "create", "x"], DATABASE_URL=url) == (2, {
        "code": "invalid_configuration",
        "message": 'OperationalError: connection failed: connection to server at "127.0.0.1", port 5432 failed: '
                   f'FATAL:  database "agentq_no_such_database" does not exist (the database at {url}): the '
                   "database refuses the database, role or password DATABASE_URL names: mend DATABASE_URL."})
    assert _failed_command(["worker", "--processes", "1"], DATABASE_URL=url) == (2, {
        "code": "invalid_configuration",
        "message": f"No worker starts on the database {url}, whose turns it could not run: the database refuses "
                   "the database, role or password DATABASE_URL names: mend DATABASE_URL."})


def test_a_sqlite_file_that_cannot_be_made_or_read_is_named(tmp_path: Path) -> None:
    """Each was a traceback (an `OSError` from making the directory, a `DatabaseError` no handler caught)."""
    (tmp_path / "a-file").write_text("")
    (tmp_path / "not-a-database").write_text("this is no SQLite file, and long enough to be read as a header\n" * 4)
    beside_a_file = tmp_path / "a-file" / "agentq.sqlite3"
    assert _failed_command(["db", "init"], DATABASE_URL=f"sqlite:///{beside_a_file}") == (2, {
        "code": "invalid_configuration",
        "message": f"DATABASE_URL names the SQLite file {beside_a_file}, whose directory cannot be made: File exists."})
    # only `db init` makes the file, and says why it cannot; a worker is told to run it
    assert _failed_command(["worker", "--processes", "1"], DATABASE_URL=f"sqlite:///{beside_a_file}") == (1, {
        "code": "service_unavailable",
        "message": f"The SQLite file {beside_a_file} does not exist: run `agentq db init` to create it (a SQLite path "
                   "is relative to the directory a command runs in)."})
    assert _failed_command(["dlq", "list"], DATABASE_URL=f"sqlite:///{tmp_path / 'not-a-database'}") == (1, {
        "code": "database_error",
        "message": f"DatabaseError: file is not a database (the database at {tmp_path / 'not-a-database'})"})


@pytest.mark.usefixtures("database")
def test_a_redis_that_refuses_its_url_is_a_setting_of_redis_to_mend_and_no_worker_starts_on_it() -> None:
    """Redis's refusals (a database number it does not have, a password it does not take) were
    `database_error`s, without a word of Redis; then `redis_error`s, where the API and the background loops say
    the setting to mend; and a worker started on them fetched nothing, for ever."""
    refused_password = ("AuthenticationError: AUTH <password> called without any password configured for the "
                        "default user. Are you sure your configuration is correct?")
    step = ("Redis refuses the password or the database number REDIS_URL gives, or asks for a password it does not "
            "give: mend REDIS_URL.")
    assert _failed_command(["dlq", "retries"], REDIS_URL="redis://:a-password@127.0.0.1:6379/99") == (2, {
        "code": "invalid_configuration",
        "message": f"{refused_password} (Redis at redis://:***@127.0.0.1:6379/99): {step}"})
    assert _failed_command(["dlq", "retries"], REDIS_URL="redis://127.0.0.1:6379/99") == (2, {
        "code": "invalid_configuration",
        "message": f"ResponseError: DB index is out of range (Redis at redis://127.0.0.1:6379/99): {step}"})
    for url, shown in (("redis://:a-password@127.0.0.1:6379/0", "redis://:***@127.0.0.1:6379/0"),
                       ("redis://127.0.0.1:6379/99", "redis://127.0.0.1:6379/99")):
        assert _failed_command(["worker", "--processes", "1"], REDIS_URL=url) == (2, {
            "code": "invalid_configuration",
            "message": f"No worker starts on Redis at {shown}, from which it takes its turns: {step}"})


@pytest.mark.usefixtures("database")
def test_a_redis_out_of_reach_is_waited_out_named_as_redis() -> None:
    """Not a setting to mend: a command says `service_unavailable`, exit 1, naming Redis and where it is; a
    worker starts and waits for it, as for a database out of reach."""
    url = f"redis://127.0.0.1:{free_port()}/0"
    port = url.rsplit(":", 1)[1].split("/")[0]
    assert _failed_command(["dlq", "retries"], REDIS_URL=url) == (1, {
        "code": "service_unavailable",
        "message": f"ConnectionError: Error 111 connecting to 127.0.0.1:{port}. Connection refused. (Redis at {url})"})
    worker = Process("worker-redis-out-of-reach", agentq("worker", "--processes", "1", "--threads", "1"),
                     child_env(REDIS_URL=url), LOG_DIR).start()
    try:
        wait_for(lambda: "could not fetch (ConnectionError: Error 111" in worker.output(), timeout=30,
                 what="the worker's consumer to wait for Redis")
        assert worker.popen is not None and worker.popen.poll() is None
        assert "Redis is out of reach or refuses writes" in worker.output()
    finally:
        worker.stop()


def test_a_database_a_release_added_columns_to_is_told_to_run_db_init(tmp_path: Path) -> None:
    """A column of this release missing (a database `db init` did not upgrade) was the driver's error alone."""
    import sqlite3

    path = tmp_path / "older.sqlite3"
    subprocess.run([str(VENV_BIN / "agentq"), "db", "init"], env=child_env(DATABASE_URL=f"sqlite:///{path}"),
                   cwd=ROOT, check=True, capture_output=True, timeout=60)
    with sqlite3.connect(path) as older:
        older.execute("ALTER TABLE users DROP COLUMN is_admin")
    assert _failed_command(["users", "create", "x"], DATABASE_URL=f"sqlite:///{path}") == (1, {
        "code": "schema_incomplete",
        "message": f"OperationalError: table users has no column named is_admin (the database at {path}): the "
                   "database predates this release: run `agentq db init` against it to upgrade it."})


def test_a_debug_run_no_worker_takes_asks_for_one_and_an_interrupted_wait_is_one_line(tmp_path: Path) -> None:
    """A wait on a run that stays pending said only that it was pending; Ctrl-C during it was a traceback.
    The deployment is a SQLite file of its own, which no worker serves."""
    import json
    import sqlite3
    import uuid

    from tests.support import wait_for

    env = child_env(DATABASE_URL=f"sqlite:///{tmp_path / 'agentq.sqlite3'}",
                    AGENTQ_BROKER_NAMESPACE=f"unread-{uuid.uuid4().hex[:8]}")
    for setup in (["db", "init"], ["demo", "seed", "--key-file", str(tmp_path / "key")]):  # admin 1, agent 1
        subprocess.run([str(VENV_BIN / "agentq"), *setup], env=env, cwd=ROOT, check=True, capture_output=True,
                       timeout=60)
    command = [str(VENV_BIN / "agentq"), "debug", "execute", "1", "nobody takes this", "--admin-id", "1", "--wait"]
    result = subprocess.run([*command, "--timeout", "0.5"], env=env, cwd=ROOT, text=True, capture_output=True,
                            timeout=60)
    log = json.loads(result.stdout)
    assert (result.returncode, log["status"], json.loads(result.stderr)["error"]) == (1, "pending", {
        "code": "still_running",
        "message": f"test run {log['id']} is still pending after 0.5s (is a worker serving the `debug` queue "
                   "running?)"})

    def runs() -> int:
        with sqlite3.connect(tmp_path / "agentq.sqlite3") as database:
            return int(database.execute("SELECT count(*) FROM admin_debug_logs").fetchone()[0])

    # A shell starts a background job with SIGINT ignored, and Python leaves an ignored SIGINT ignored: the
    # command is given it as a terminal would, whatever started this suite.
    waiting = subprocess.Popen(command, env=env, cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        wait_for(lambda: runs() == 2, what="the second run to be written")
        waiting.send_signal(signal.SIGINT)
        _, stderr = waiting.communicate(timeout=30)
    finally:
        waiting.kill()
    assert (waiting.returncode, "Traceback" in stderr, json.loads(stderr)["error"]) == (130, False, {
        "code": "interrupted", "message": "Stopped by an interrupt (Ctrl-C) before the command finished."})


def test_a_ctrl_c_that_sqlalchemys_pool_logs_as_it_resets_a_connection_is_not_a_second_line(
        capsys: pytest.CaptureFixture[str]) -> None:
    """The interrupted wait above printed, one run in many, SQLAlchemy's "Exception during reset or similar
    (KeyboardInterrupt)" as a warning line before the command's own `interrupted`: the pool logs the interrupt
    that lands while it resets a connection, and re-raises it. Its record is not a warning of the command's; a
    record of another failure still is."""
    import json
    import logging

    from cli.output import WarningLines

    pool_log = logging.getLogger("sqlalchemy.pool.impl.QueuePool")
    handler = WarningLines()
    pool_log.addHandler(handler)
    try:
        for failure in (KeyboardInterrupt(), ConnectionResetError("the server closed the connection")):
            try:
                raise failure
            except BaseException:
                pool_log.error("Exception during reset or similar", exc_info=True)
    finally:
        pool_log.removeHandler(handler)
    assert [json.loads(line) for line in capsys.readouterr().err.splitlines()] == [{"warning": {
        "code": "error", "message": "Exception during reset or similar (ConnectionResetError: the server closed "
                                    "the connection)"}}]


def test_a_misspelt_setting_is_named_with_the_setting_it_is_nearest_to(tmp_path: Path) -> None:
    """Settings ignore variables they do not know: `AGENTQ_LEASE_SECOND=1` left leases at 30 s without a word.
    The command line's own variables (`AGENTQ_WEB_…`, `AGENTQ_WORKER_…`) are no settings, and not named."""
    import json

    result = subprocess.run([str(VENV_BIN / "agentq"), "db", "init"], cwd=ROOT, text=True, capture_output=True,
                            env=child_env(DATABASE_URL=f"sqlite:///{tmp_path / 'agentq.sqlite3'}",
                                          AGENTQ_LEASE_SECOND="1", AGENTQ_WEB_WORKERS="2", AGENTQ_NOTHING_LIKE_IT="1",
                                          AGENTQ_REDIS_URL="redis://127.0.0.1:6379/3",
                                          AGENTQ_MODERATION_API_KEY_ENV="AGENTQ_MODERATION_KEY",
                                          AGENTQ_MODERATION_KEY="a key the moderation setting names"),
                            timeout=60)
    assert (result.returncode, [json.loads(line)["warning"]["message"] for line in result.stderr.splitlines()]) == (0, [
        "AGENTQ_LEASE_SECOND is not a setting of agentq, and is ignored (is it AGENTQ_LEASE_SECONDS?)",
        "AGENTQ_NOTHING_LIKE_IT is not a setting of agentq, and is ignored",
        # the contract's two URLs take no prefix: this one left Redis at its default
        "AGENTQ_REDIS_URL is not a setting of agentq, and is ignored (is it REDIS_URL?)"])


@pytest.mark.parametrize(("url", "environment"), [
    ("postgresql://agentq@/agentq?host=/var/run/postgresql", {}), ("postgresql://agentq@db/?dbname=agentq", {}),
    ("postgresql://?service=agentq", {}), ("postgresql://agentq@db", {"PGDATABASE": "agentq"}),
    ("postgresql://agentq@db", {"PGSERVICE": "agentq"})])
def test_a_postgresql_url_may_leave_its_database_to_libpq_when_something_names_it(
        url: str, environment: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """A URL naming no database is refused (libpq would pick the user's), unless a service or PGDATABASE does."""
    from app.config import Settings

    for name in ("PGDATABASE", "PGSERVICE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    assert Settings(database_url=url).database_url == url.replace("postgresql://", "postgresql+psycopg://")


def test_the_api_on_a_sqlite_file_not_made_tells_callers_nothing_of_where_it_is_and_makes_nothing(
        tmp_path: Path) -> None:
    """The reason names a path of the server's: its log says it, a caller is told the operator must run `db init`.
    An API (or any command but `db init`) started where the relative path found no file made an empty database
    there, and its directories."""
    import httpx

    from tests.support import wait_for

    (tmp_path / "a-file").write_text("")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    for path in (tmp_path / "a-file" / "agentq.sqlite3", tmp_path / "var" / "agentq.sqlite3"):
        env = child_env(DATABASE_URL=f"sqlite:///{path}")
        web = Process("web-sqlite-not-made", agentq("web", "--port", str(port), "--workers", "1", "--threads", "2"),
                      env, LOG_DIR).start()
        try:
            wait_http(f"{base}/healthz")
            answer = httpx.get(f"{base}/api/me", headers={"Authorization": "Bearer aq_any"}, timeout=10)
            assert (answer.status_code, answer.json()) == (503, {"error": {
                "code": "service_unavailable",
                "message": "The service is not set up yet: its database has no schema. The operator must run "
                           "`agentq db init`."}})
            assert f"the service cannot serve: The SQLite file {path} does not exist: run `agentq db init`" \
                in web.output()
            assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]
            if path.parent.name == "var":  # the API serves once `db init` has made the file, without a restart
                subprocess.run(agentq("db", "init"), env=env, cwd=ROOT, check=True, capture_output=True, timeout=60)
                wait_for(lambda: httpx.get(f"{base}/readyz", timeout=10).status_code == 200, timeout=10,
                         what="the API to be ready once the file is made")
                assert httpx.get(f"{base}/api/me", headers={"Authorization": "Bearer aq_any"},
                                 timeout=10).status_code == 401
        finally:
            web.stop()


def test_db_init_says_when_a_column_dropped_by_hand_is_still_missing(tmp_path: Path) -> None:
    """It answered success while the column stayed missing, or (on PostgreSQL, where an index goes with its
    column and schema.sql makes it again) failed telling the operator to run `db init`; the worker then refused
    to start until `db init` ran, which it just had. On either database the error names each column."""
    import json
    import sqlite3
    import uuid
    from collections.abc import Callable

    import psycopg
    from sqlalchemy.engine import make_url

    from app.config import without_password
    from tests.conftest import PG_ADMIN_URL

    name = f"agentq_gap_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        postgres = make_url(PG_ADMIN_URL).set(database=name)
        sqlite = tmp_path / "agentq.sqlite3"
        cases: list[tuple[str, Callable[[], Any], str, str, str]] = [
            # turns.user_id has indexes of its own, which PostgreSQL drops with it
            (postgres.set(drivername="postgresql+psycopg").render_as_string(hide_password=False),
             lambda: psycopg.connect(postgres.render_as_string(hide_password=False)), "turns.user_id",
             "schema.sql adds it to an older table (ADD COLUMN IF NOT EXISTS, for the columns releases added since "
             "the first)", "schema.sql"),
            (f"sqlite:///{sqlite}", lambda: sqlite3.connect(sqlite), "llm_models.model",
             "it may be empty or has a default", "the models (app/models)")]
        for url, connect, column, where_it_can, definition in cases:
            init = [str(VENV_BIN / "agentq"), "db", "init"]
            subprocess.run(init, env=child_env(DATABASE_URL=url), cwd=ROOT, check=True, capture_output=True,
                           timeout=60)
            database = connect()
            table, _, field = column.partition(".")
            database.execute(f"ALTER TABLE {table} DROP COLUMN {field}")
            database.commit()
            database.close()
            again = subprocess.run(init, env=child_env(DATABASE_URL=url), cwd=ROOT, capture_output=True, text=True,
                                   timeout=60)
            location = str(sqlite) if url.startswith("sqlite") else without_password(url)
            assert (again.returncode, json.loads(again.stderr)["error"]) == (1, {
                "code": "schema_incomplete",
                "message": f"The database {location} still lacks {column} after `db init`: it adds a missing column "
                           f"only where {where_it_can}; restore it as {definition} defines it."})
    finally:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_a_dotenv_file_with_a_line_that_cannot_be_read_stops_the_command(tmp_path: Path) -> None:
    """python-dotenv skipped the line with a warning naming neither the file nor the variable; when that was
    DATABASE_URL, the command went on against the default database and said it had no schema."""
    import json

    (tmp_path / ".env").write_text('AGENTQ_LOG_LEVEL=INFO\nDATABASE_URL="sqlite:////nowhere/agentq.sqlite3\n')
    result = subprocess.run([str(VENV_BIN / "agentq"), "db", "init"], env=child_env(), cwd=tmp_path,
                            capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stdout, json.loads(result.stderr)["error"]) == (2, "", {
        "code": "invalid_configuration",
        "message": f"{tmp_path / '.env'}: line 2 cannot be read as NAME=value (an unclosed quote?); nothing of the "
                   "file was loaded"})


def test_a_dotenv_file_that_is_not_utf8_stops_the_command_naming_its_line(tmp_path: Path) -> None:
    """A byte that is not UTF-8 (a comment written in Latin-1) made every command fail with python-dotenv's
    UnicodeDecodeError traceback."""
    import json

    (tmp_path / ".env").write_bytes(b"AGENTQ_LOG_LEVEL=INFO\n# caf\xe9\n")
    result = subprocess.run([str(VENV_BIN / "agentq"), "db", "init"], env=child_env(), cwd=tmp_path,
                            capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stdout, json.loads(result.stderr)["error"]) == (2, "", {
        "code": "invalid_configuration",
        "message": f"{tmp_path / '.env'}: line 2 is not UTF-8 text; nothing of the file was loaded"})


def test_what_a_command_logs_as_it_goes_on_is_a_json_warning_line(clean: None) -> None:
    """`dlq list` with Redis out of reach lists the database's rows (none: the tables are emptied first, an
    earlier test's dead letters gone) and says so: Python's last-resort handler printed that as bare text among
    the command's JSON lines."""
    import json

    result = subprocess.run([str(VENV_BIN / "agentq"), "dlq", "list"], cwd=ROOT, text=True, capture_output=True,
                            timeout=60, env=child_env(REDIS_URL=f"redis://127.0.0.1:{free_port()}/0"))
    assert (result.returncode, json.loads(result.stdout)) == (0, {"items": []})
    warnings = [json.loads(line)["warning"] for line in result.stderr.splitlines()]
    assert [w["code"] for w in warnings] == ["warning"]
    assert warnings[0]["message"].startswith("Redis at redis://127.0.0.1:")
    assert " could not be read (ConnectionError: " in warnings[0]["message"]
    assert warnings[0]["message"].endswith("); dead letters are listed from the database alone")


def test_a_sqlite_url_with_driver_options_opens_the_file_db_init_made(tmp_path: Path) -> None:
    """The file was looked for under the URL's text after `///`, options and all: it was never found."""
    import json

    url = f"sqlite:///{tmp_path / 'agentq.sqlite3'}?timeout=10"
    for command, printed in ((["db", "init"], "database"), (["dlq", "list"], "items")):
        result = subprocess.run([str(VENV_BIN / "agentq"), *command], env=child_env(DATABASE_URL=url), cwd=ROOT,
                                text=True, capture_output=True, timeout=60)
        assert (result.returncode, printed in json.loads(result.stdout)) == (0, True), result.stderr
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(("-wal", "-shm"))) == ["agentq.sqlite3"]


def test_debug_execute_with_a_timeout_and_no_wait_writes_no_run(world: World) -> None:
    """The usage error comes before the run is written: the operator, told the command was wrong, would not
    look for a run it had started."""
    from sqlalchemy import func, select

    from app.db import transaction
    from app.models import DebugRun

    admin_id = world.api.get("/api/me", world.admin_key).json["id"]
    agent_id = world.agent(world.model())
    result = subprocess.run([str(VENV_BIN / "agentq"), "debug", "execute", str(agent_id), "hi", "--admin-id",
                             str(admin_id), "--timeout", "5"], env=child_env(), cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    assert (result.returncode, result.stderr.splitlines()[-1]) == (
        2, "agentq debug execute: error: --timeout is how long --wait waits: give --wait too")
    with transaction() as session:
        assert session.scalar(select(func.count()).select_from(DebugRun)) == 0


def test_the_default_metrics_directory_is_private_and_one_another_user_made_is_refused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Its name in the shared temporary directory can be worked out: it was taken as found, whoever made it,
    so another user could feed /metrics or plant links for prometheus_client to write through."""
    import stat
    import tempfile

    from cli.arguments import InvalidVariable
    from cli.metrics_dir import prepare_metrics_dir

    monkeypatch.setattr(tempfile, "gettempdir", lambda: str(tmp_path))

    def default_dir() -> None:
        monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", "")  # not set: the default is made
        prepare_metrics_dir(["web"])

    default_dir()
    made = Path(os.environ["PROMETHEUS_MULTIPROC_DIR"])
    assert (made.parent, stat.S_IMODE(made.stat().st_mode)) == (tmp_path, 0o700)
    made.chmod(0o755)  # as an earlier release made it
    default_dir()
    assert stat.S_IMODE(made.stat().st_mode) == 0o700
    made.rmdir()
    (tmp_path / "elsewhere").mkdir()
    for planted in (lambda: made.symlink_to(tmp_path / "elsewhere"), lambda: made.symlink_to(tmp_path / "nothing"),
                    lambda: made.write_text("")):
        planted()
        with pytest.raises(InvalidVariable, match="is not a directory of this user's own"):
            default_dir()
        made.unlink()
    if os.geteuid() == 0:  # only root can give a directory to another user
        made.mkdir()
        os.chown(made, 65534, 65534)
        with pytest.raises(InvalidVariable, match="is not a directory of this user's own"):
            default_dir()


def test_a_flag_wins_over_its_variable_and_the_variable_over_the_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    """`option_or_environment`: the flag when given, else its variable, else its fallback."""
    from cli.main import build_parser, worker_size

    monkeypatch.delenv("AGENTQ_WORKER_PROCESSES", raising=False)
    monkeypatch.setenv("AGENTQ_WORKER_THREADS", "5")
    assert worker_size(build_parser().parse_args(["worker", "--processes", "3", "--threads", "7"])) == (3, 7)
    assert worker_size(build_parser().parse_args(["worker"])) == (2, 5)


def test_a_variable_set_empty_is_refused_not_taken_for_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only a variable that is not set falls back; one set to nothing is the operator's typo, said as such."""
    from cli.arguments import WORKER_THREADS, InvalidVariable, option_or_environment, thread_count

    monkeypatch.setenv("AGENTQ_WORKER_THREADS", "")
    with pytest.raises(InvalidVariable, match="AGENTQ_WORKER_THREADS=''"):
        option_or_environment(None, WORKER_THREADS, thread_count)


def test_an_option_without_a_fallback_says_none_in_its_help(capsys: pytest.CaptureFixture[str]) -> None:
    """`OptionDefault.help` names an empty fallback as `none`."""
    from cli.main import main

    with pytest.raises(SystemExit):
        main(["worker", "--help"])
    assert "default: AGENTQ_WORKER_METRICS_PORT, else none" in " ".join(capsys.readouterr().out.split())


def _parsers_of(parser: argparse.ArgumentParser) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    """Every command's parser, by its usage's program name (`agentq dlq show`)."""
    yield parser.prog, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for command in action.choices.values():
                yield from _parsers_of(command)


def test_every_argument_of_every_command_says_what_it_is() -> None:
    """`users create`'s name and flags, `dlq show`'s id and `debug`'s agent and content had no help; an operator
    could not tell a dead letter's id from its run's."""
    from cli.main import build_parser

    unsaid = [f"{prog} {action.dest}" for prog, parser in _parsers_of(build_parser()) for action in parser._actions
              if action.help is None and not isinstance(action, argparse._SubParsersAction)]
    assert unsaid == []


@pytest.mark.parametrize(("args", "says"), [
    ([], "Every command reads its settings (DATABASE_URL, REDIS_URL, AGENTQ_*) from the environment or from a .env "
         "file in the working directory"),
    (["mock-llm"], "--host HOST the address it listens on (default: 127.0.0.1)"),
    (["mock-llm"], "--port PORT the port it listens on (default: 8765)"),
    (["demo", "seed"], "(default: http://127.0.0.1:8765/v1)"),
    (["demo", "seed"], "(default: var/demo-api-key)"),
    (["dlq", "requeue"], "the dead letter's id, as `dlq list` prints it (its `id`, not its `run_id`)"),
    (["users", "create"], "the credit the account opens with, a decimal amount (default: 0)"),
])
def test_a_commands_help_gives_its_defaults_and_where_settings_come_from(
        args: list[str], says: str, capsys: pytest.CaptureFixture[str]) -> None:
    from cli.main import main

    with pytest.raises(SystemExit):
        main([*args, "--help"])
    assert says in " ".join(capsys.readouterr().out.split())


def test_a_cursor_no_listing_printed_is_a_usage_error_in_the_shells_words() -> None:
    """It was `invalid_cursor` "cursor is not one this API returned.", exit 1: the API's words and a failure's
    status for what the operator typed."""
    result = subprocess.run([str(VENV_BIN / "agentq"), "dlq", "list", "--cursor", "zzz"], env=child_env(), cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stderr.splitlines()[-1]) == (
        2, "agentq dlq list: error: argument --cursor: 'zzz' is not a next_cursor that `dlq list` printed")
