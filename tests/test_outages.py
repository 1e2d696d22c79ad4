"""Which errors count as a backing service out of reach: those are waited out (a delivery's retries, a
stream reader), so a real bug must not be among them."""

from __future__ import annotations

import sqlite3
import time
from typing import TYPE_CHECKING

import psycopg
import pytest
import redis
import sqlalchemy.exc

from app.config import get_settings
from app.deliveries import retry_failed
from app.outages import is_outage
from tests.support import free_port, refused_connection, wait_for

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from tests.conftest import World


def _wrapped(error: Exception) -> sqlalchemy.exc.OperationalError:
    return sqlalchemy.exc.OperationalError("SELECT 1", {}, error)


def test_a_refused_connection_is_an_outage_and_is_retried_longer() -> None:
    with pytest.raises(psycopg.OperationalError) as refused:
        psycopg.connect(f"host=127.0.0.1 port={free_port()} user=postgres connect_timeout=2")
    assert is_outage(refused.value) and is_outage(_wrapped(refused.value))
    assert is_outage(_wrapped(psycopg.errors.AdminShutdown())) and is_outage(redis.ConnectionError())
    assert is_outage(_wrapped(psycopg.errors.DiskFull())) and is_outage(_wrapped(psycopg.errors.OutOfMemory()))
    settings = get_settings()
    assert settings.outage_retries > settings.max_retries
    assert [retry_failed(n, _wrapped(refused.value)) for n in (settings.max_retries, settings.outage_retries - 1,
                                                                 settings.outage_retries)] == [True, True, False]


@pytest.mark.parametrize("error", [
    _wrapped(psycopg.errors.DeadlockDetected()), _wrapped(psycopg.errors.QueryCanceled()),
    _wrapped(psycopg.errors.LockNotAvailable()), _wrapped(sqlite3.OperationalError("no such table: turns")),
    redis.AuthenticationError(), ValueError("a bug"),
], ids=["deadlock", "statement timeout", "lock not available", "sqlite missing table", "redis auth", "bug"])
def test_a_statement_or_a_bug_that_fails_is_not_an_outage(error: Exception) -> None:
    assert not is_outage(error)
    retries = get_settings().max_retries
    assert [retry_failed(n, error) for n in (retries - 1, retries)] == [True, False]


def test_a_write_waiting_an_outage_out_lands_once_the_database_answers_and_a_bug_is_raised_at_once() -> None:
    """A refused connection (a real one, to a closed port) is tried again until the write goes through; a
    statement that is wrong is raised at its first failure; an outage that outlasts the wait is raised."""
    from app.outages import waiting_out_outages

    outage_left = [refused_connection(), refused_connection()]
    tries: list[str] = []

    def write() -> str:
        tries.append("write")
        if outage_left:
            raise _wrapped(outage_left.pop())
        return "written"

    assert waiting_out_outages(write, for_seconds=30, what="a test write") == "written"
    assert tries == ["write"] * 3

    def wrong() -> None:
        tries.append("wrong")
        raise _wrapped(sqlite3.OperationalError("no such column: nope"))

    with pytest.raises(sqlalchemy.exc.OperationalError):
        waiting_out_outages(wrong, for_seconds=30, what="a wrong statement")
    assert tries.count("wrong") == 1

    def down() -> None:
        tries.append("down")
        raise _wrapped(refused_connection())

    with pytest.raises(sqlalchemy.exc.OperationalError):
        waiting_out_outages(down, for_seconds=0.5, what="a long outage")
    assert 2 <= tries.count("down") <= 4


def test_a_sqlite_file_another_process_holds_locked_is_waited_out_until_it_is_let_go(tmp_path: Path) -> None:
    """The embedded database has one writer at a time. A write lock held past the busy timeout (an
    operator's `sqlite3` shell left in a transaction) failed a finished turn's settlement at once, as a
    bug: the retry called the model again and the turn ended `error`. It is an outage: the write lands as
    soon as the lock is let go."""
    import threading

    from sqlalchemy import create_engine, text

    from app.outages import waiting_out_outages

    path = tmp_path / "locked.sqlite3"
    engine = create_engine(f"sqlite:///{path}", connect_args={"timeout": 0.1})
    with engine.begin() as connection:
        connection.execute(text("CREATE TABLE answers (id INTEGER)"))
    holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN IMMEDIATE")
    tries: list[BaseException | None] = []

    def write() -> str:
        try:
            with engine.begin() as connection:
                connection.execute(text("INSERT INTO answers VALUES (1)"))
        except sqlalchemy.exc.OperationalError as error:
            tries.append(error)
            raise
        tries.append(None)
        return "written"

    let_go = threading.Timer(1.0, holder.execute, ("ROLLBACK",))
    let_go.start()
    try:
        assert waiting_out_outages(write, for_seconds=30, what="a write to a locked file") == "written"
    finally:
        let_go.join()
        holder.close()
    assert len(tries) >= 2 and tries[-1] is None
    assert all(error is not None and is_outage(error) and "database is locked" in str(error)
               for error in tries[:-1])
    with engine.connect() as connection:
        assert connection.execute(text("SELECT count(*) FROM answers")).scalar() == 1
    engine.dispose()


def test_a_background_round_that_fails_for_a_bug_is_an_error_not_an_outages_warning(
        caplog: pytest.LogCaptureFixture) -> None:
    """A sweep or a lease renewal that fails for a bug fails at every round (a broken renewal lets every lease
    run out): logged as an error with its traceback, not as the warning an outage gets."""
    import logging

    from app.failure_logs import log_failure

    log = logging.getLogger("agentq.test.background")
    with caplog.at_level(logging.WARNING, logger=log.name):
        log_failure(log, redis.ConnectionError("refused"), "a lease renewal")
        try:
            raise KeyError("a bug")
        except KeyError as bug:
            log_failure(log, bug, "a lease renewal")
    assert [(r.levelname, r.exc_info is not None) for r in caplog.records] == [("WARNING", False), ("ERROR", True)]
    assert "not for an outage" in caplog.records[1].getMessage()


def test_a_background_loop_says_an_outage_once_and_again_with_what_it_did_not_say(
        caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """The lease keeper's loops try twice a second: through a 40 s PostgreSQL outage each process logged a
    warning at every try, 80 lines that said the same. It is said once, then again after
    `OUTAGE_REPEAT_SECONDS` with the count of the tries between; another loop says its own."""
    import logging

    import app.failure_logs
    from app.failure_logs import log_failure

    log = logging.getLogger("agentq.test.outage-repeat")
    with caplog.at_level(logging.WARNING, logger=log.name):
        for _ in range(4):
            log_failure(log, redis.ConnectionError("refused"), "a look for stop requests")
        log_failure(log, redis.ConnectionError("refused"), "a lease renewal")
        monkeypatch.setattr(app.failure_logs, "OUTAGE_REPEAT_SECONDS", 0.0)  # the interval gone by
        log_failure(log, redis.ConnectionError("refused"), "a look for stop requests")
    assert [r.getMessage() for r in caplog.records] == [
        "a look for stop requests failed, a backing service is out of reach (ConnectionError: refused); trying "
        "again, said at most every 30 s",
        "a lease renewal failed, a backing service is out of reach (ConnectionError: refused); trying again, said "
        "at most every 30 s",
        "a look for stop requests failed, a backing service is out of reach (ConnectionError: refused); trying "
        "again, said at most every 0 s; 3 more rounds failed alike since this was last said"]


def test_what_was_said_of_outages_long_ago_is_forgotten_once_many_loops_said_one(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Two callers name a run in what they were doing: an outage met by thousands of runs kept an entry for each
    for the process's life. Past `_OUTAGE_SAID_KEPT` entries, those said longer than the repeat interval ago go."""
    import app.failure_logs
    from app.failure_logs import _OUTAGE_SAID_KEPT, OUTAGE_REPEAT_SECONDS, said_again

    long_ago, lately = time.monotonic() - OUTAGE_REPEAT_SECONDS - 1, time.monotonic()
    said = {("agentq.test", f"ending turn {run}"): (long_ago, 2) for run in range(_OUTAGE_SAID_KEPT - 1)}
    monkeypatch.setattr(app.failure_logs, "_outage_said", {**said, ("agentq.test", "a sweep"): (lately, 0)})
    monkeypatch.setattr(app.failure_logs, "_outage_said_prune_at", _OUTAGE_SAID_KEPT)
    assert said_again("agentq.test", "ending turn -1") == ""
    assert set(app.failure_logs._outage_said) == {("agentq.test", "a sweep"), ("agentq.test", "ending turn -1")}


def test_a_consumers_lost_redis_connection_is_a_warning_not_a_critical_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """Dramatiq says a consumer's lost Redis connection at CRITICAL, one line a consumer at every Redis restart,
    though the consumer starts again by itself: an operator paged on CRITICAL was paged for an outage the
    deployment rides out. The line is the outage warning the rest are, said once for the process's consumers
    and again at most every 30 s (each consumer's try, every 3 s, was two lines: 88 lines in 30 s of an
    outage), without the line about each next try."""
    import logging

    import redis as redis_lib

    import app.failure_logs
    from app.logging_setup import OutageFailureFilter

    monkeypatch.setattr(app.failure_logs, "_outage_said", {})
    outage = OutageFailureFilter()

    def consumer_says(queue: str, thread: int, level: int, message: str, *args: object) -> logging.LogRecord | None:
        """A line as Dramatiq's consumer thread of `queue` writes it, if the filter lets it through."""
        record = logging.LogRecord(f"dramatiq.worker.ConsumerThread({queue})", level, __file__, 1, message, args,
                                   None)
        record.thread = thread
        return record if outage.filter(record) else None

    def lost_and_restarts(queue: str, thread: int) -> list[logging.LogRecord | None]:
        return [consumer_says(queue, thread, logging.CRITICAL, "Consumer encountered a connection error: %s",
                              redis_lib.ConnectionError("Connection closed by server.")),
                consumer_says(queue, thread, logging.INFO, "Restarting consumer in %0.2f seconds.", 3.0)]

    first, first_restart = lost_and_restarts("turns", 1)
    assert first is not None and first_restart is None
    assert (first.levelname, first.getMessage()) == (
        "WARNING", "Consumer encountered a connection error: Connection closed by server. (Redis is out of reach; "
                   "each of this process's consumers tries again every 3 s, said at most every 30 s)")
    assert lost_and_restarts("debug", 2) + lost_and_restarts("turns", 1) == [None] * 4  # the same outage's tries
    monkeypatch.setattr(app.failure_logs, "OUTAGE_REPEAT_SECONDS", 0.0)  # the interval gone by
    again, _ = lost_and_restarts("debug", 2)
    assert again is not None and again.getMessage().endswith("said at most every 30 s; 2 more tries failed alike "
                                                             "since this was last said)")
    other = consumer_says("turns", 1, logging.CRITICAL, "Consumer encountered an unexpected error.")
    restart_after_other = consumer_says("turns", 1, logging.INFO, "Restarting consumer in %0.2f seconds.", 3.0)
    assert other is not None and other.levelname == "CRITICAL" and restart_after_other is not None


def test_a_database_connection_gives_up_on_a_server_gone_within_half_a_lease(database: str) -> None:
    """The kernel retransmits unacknowledged data for about fifteen minutes: a lease renewal sent to a server
    that a failover moved away hung the lease keeper that long, and every lease of the process ran out
    while its turns still streamed. What is not acknowledged within half a lease fails, and idle
    connections are probed."""
    from app.config import get_settings
    from app.db import get_engine

    with get_engine().connect() as connection:
        parameters = connection.connection.dbapi_connection.info.get_parameters()  # type: ignore[union-attr]
    half_lease_ms = max(int(get_settings().lease_seconds * 500), 1000)
    assert (parameters["keepalives"], parameters["tcp_user_timeout"]) == ("1", str(half_lease_ms))
    idle, interval, count = (int(parameters[k]) for k in ("keepalives_idle", "keepalives_interval", "keepalives_count"))
    assert (idle + interval * count) * 1000 <= half_lease_ms + 3000


def test_a_session_its_process_left_gives_its_locks_up_within_a_lease_and_its_connection_soon_after(
        database: str) -> None:
    """A worker cut off mid-transaction by a partition that drops its packets left its session idle in that
    transaction, its row locks held, until the server's keepalives noticed (two hours by default): every
    request of that user, on every process, waited. The server ends such a session after a lease; the process
    that comes back to it finds its connection gone, an outage (waited out, retried), not a bug. The server
    notices a client gone as the client notices a server gone (`dead_peer_detection`)."""
    import time

    from app.config import get_settings
    from app.connection_bounds import dead_peer_detection
    from app.db import get_engine
    from app.outages import is_outage
    from tests.conftest import TEST_ENV

    with get_engine().connect() as held:
        limit = held.exec_driver_sql(
            "SELECT setting FROM pg_settings WHERE name = 'idle_in_transaction_session_timeout'").scalar()
        assert limit == str(int(get_settings().lease_seconds * 1000))
        # The server's own dead-peer detection, as the client's: a session whose client a partition took away
        # held one of `max_connections` for the server's two hours of keepalives.
        server_side: dict[str, str] = dict(held.exec_driver_sql(
            "SELECT name, setting FROM pg_settings WHERE name IN ('tcp_keepalives_idle', 'tcp_keepalives_interval', "
            "'tcp_keepalives_count', 'tcp_user_timeout')").all())
        client_side = dead_peer_detection()
        assert server_side == {"tcp_keepalives_idle": str(client_side["keepalives_idle"]),
                               "tcp_keepalives_interval": str(client_side["keepalives_interval"]),
                               "tcp_keepalives_count": str(client_side["keepalives_count"]),
                               "tcp_user_timeout": str(client_side["tcp_user_timeout"])}
        held.exec_driver_sql("SELECT pg_advisory_xact_lock(424242)")
        started = time.monotonic()
        with psycopg.connect(TEST_ENV["DATABASE_URL"].replace("+psycopg", ""), autocommit=True) as other:
            wait_for(lambda: other.execute("SELECT pg_try_advisory_xact_lock(424242)").fetchone()[0],  # type: ignore[index]
                     timeout=get_settings().lease_seconds + 10, what="the idle transaction's lock to be given up")
        assert time.monotonic() - started >= get_settings().lease_seconds - 0.5
        with pytest.raises(sqlalchemy.exc.DBAPIError) as ended:
            held.exec_driver_sql("SELECT 1")
        assert is_outage(ended.value)


def test_a_server_answer_that_does_not_come_in_time_is_an_outage_and_the_server_ends_the_statement(
        database: str) -> None:
    """A server that stops answering while its kernel still acknowledges raises nothing at the TCP level: each wait
    for its answer is bounded (`AnswerBoundConnection`), its connection closed and counted lost, an outage; the
    server, told by its client check that the client left, ends the statement rather than running it on. Waits
    `answers_within(None)` (a schema change) are not cut. A lone statement and a pipelined batch alike."""
    import time

    from sqlalchemy import text

    from app.connection_bounds import CLIENT_CHECK_MS, answers_within
    from app.db import get_engine, plain_transaction
    from app.prepared import Batch, Prepared

    slow = Prepared(text("SELECT pg_sleep(5), 'agentq-slow-statement'"))
    for batched in (False, True):
        started = time.monotonic()
        with pytest.raises(sqlalchemy.exc.DBAPIError) as cut, answers_within(0.3), plain_transaction() as connection:
            if batched:
                with Batch(connection) as batch:
                    slow(batch)
                    slow(batch)
            else:
                slow(connection)
        assert time.monotonic() - started < 1.5
        assert is_outage(cut.value) and cut.value.connection_invalidated
        assert "did not answer within 0.3 s" in str(cut.value)
        # The pool serves on, and the server let the statement go long before its five seconds were up.
        wait_for(lambda: _still_running("agentq-slow-statement") == 0, timeout=CLIENT_CHECK_MS / 1000 + 0.5,
                 interval=0.05, what="the server to end the abandoned statement")
    with answers_within(None), get_engine().connect() as connection:
        assert connection.exec_driver_sql("SELECT pg_sleep(0.5), 1").one()[1] == 1
    with answers_within(5), get_engine().connect() as connection:
        assert connection.exec_driver_sql("SELECT pg_sleep(0.5), 2").one()[1] == 2


def _still_running(marker: str) -> int:
    """Statements of other sessions whose text holds `marker`, as the server sees them now."""
    from app.db import get_engine

    with get_engine().connect() as connection:
        return int(connection.exec_driver_sql(
            "SELECT count(*) FROM pg_stat_activity WHERE query LIKE %(marker)s AND pid <> pg_backend_pid()",
            {"marker": f"%{marker}%"}).scalar_one())


def test_a_session_setting_the_server_refuses_leaves_the_others_set_and_the_connection_in_use(database: str) -> None:
    """A server before PostgreSQL 12 has no `tcp_user_timeout`, and a pooler may filter `SET`s: one refused setting
    made every connection fail, taking the whole service down for a bound on dead sessions. The others are set
    one by one, the refused named, and the connection used."""
    from app.connection_bounds import apply_session_settings
    from app.db import get_engine

    raw = get_engine().raw_connection()
    connection = raw.dbapi_connection
    assert connection is not None
    try:
        refused = apply_session_settings(connection, ["SET idle_in_transaction_session_timeout = 4321",
                                                      "SET no_such_setting = 1", "SET tcp_keepalives_count = 7"])
        assert refused == ["SET no_such_setting = 1"]
        cursor = connection.cursor()
        shown = []
        for name in ("idle_in_transaction_session_timeout", "tcp_keepalives_count"):
            cursor.execute(f"SHOW {name}")
            shown.append(cursor.fetchone())
        assert shown == [("4321ms",), ("7",)]
    finally:
        raw.invalidate()  # not back to the pool with the test's settings


def test_a_background_round_that_fails_for_a_setup_step_says_the_step_once_a_minute(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """An API process on a database never initialised fails every round of its bounds loop alike: it said so
    with two tracebacks a second, which buried what to do. The step is said in one line, again a minute on."""
    import logging

    import app.failure_logs
    from app.failure_logs import log_failure

    engine = sqlalchemy.create_engine(f"sqlite:///{tmp_path}/empty.sqlite3")
    try:
        with engine.connect() as connection:
            connection.execute(sqlalchemy.text("SELECT id FROM turns"))
    except sqlalchemy.exc.OperationalError as error:
        no_schema = error
    engine.dispose()
    log = logging.getLogger("agentq.test.setup")
    with caplog.at_level(logging.WARNING, logger=log.name):
        for _ in range(3):
            log_failure(log, no_schema, "looking for runs pending too long")
        monkeypatch.setattr(app.failure_logs, "SETUP_PROBLEM_REPEAT_SECONDS", 0.0)  # the minute gone by
        log_failure(log, no_schema, "looking for runs pending too long")
    assert [(r.levelname, r.exc_info) for r in caplog.records] == [("ERROR", None), ("ERROR", None)]
    assert caplog.records[0].getMessage().startswith(
        "looking for runs pending too long failed: the database has no agentq schema: run `agentq db init` against "
        "it (a SQLite path is relative to the directory a command runs in). OperationalError: no such table: turns "
        "(the database at ")


def test_a_background_round_against_a_database_that_refuses_its_login_says_to_mend_the_url(
        caplog: pytest.LogCaptureFixture) -> None:
    """A refusal carries no SQLSTATE, which `is_outage` reads as a connection that failed: it was logged as a
    backing service out of reach, to be waited out, every round."""
    import logging

    from app.failure_logs import log_failure

    engine = sqlalchemy.create_engine("postgresql+psycopg://postgres@127.0.0.1:5432/agentq_no_such_database")
    try:
        with engine.connect():
            pass
    except sqlalchemy.exc.OperationalError as error:
        refused = error
    engine.dispose()
    log = logging.getLogger("agentq.test.refused")
    with caplog.at_level(logging.WARNING, logger=log.name):
        log_failure(log, refused, "a lease renewal")
        log_failure(log, refused, "a recovery sweep")  # another loop of the same logger: the same minute
    assert [(r.levelname, r.exc_info) for r in caplog.records] == [("ERROR", None)]
    assert caplog.records[0].getMessage().startswith(
        "a lease renewal failed: the database refuses the database, role or password DATABASE_URL names: mend "
        'DATABASE_URL. OperationalError: connection failed: connection to server at "127.0.0.1", port 5432 failed: '
        'FATAL:  database "agentq_no_such_database" does not exist (the database at ')


def test_a_send_while_redis_is_out_of_reach_is_an_outage_of_redis_said_in_one_line(
        unreachable_broker: None, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """Dramatiq's broker raises its own `ConnectionClosed` from the Redis client's error: it was no outage,
    so every send during a Redis restart logged its chained tracebacks (hundreds in a chaos hunt), and it must
    not count as the database's outage either, which would stop a worker taking runs. Said in one line, and not
    a line a run: every request's send and every pending run's at each recovery sweep wrote one (21 lines in
    30 s for three pending turns in one process)."""
    import logging

    import dramatiq
    import dramatiq.errors

    from app.outages import is_database_outage
    from app.run_kinds import TURN

    with pytest.raises(dramatiq.errors.BrokerConnectionError) as failed:
        dramatiq.get_broker().enqueue(dramatiq.Message(queue_name=TURN.queue, actor_name=TURN.actor, args=(1,),
                                                       kwargs={}, options={}))
    assert is_outage(failed.value) and not is_database_outage(failed.value)

    import app.failure_logs

    monkeypatch.setattr(app.failure_logs, "_outage_said", {})
    with caplog.at_level(logging.WARNING, logger="app.dispatch"):
        assert [TURN.send(ident, None) for ident in (1, 2, 3)] == [False, False, False]
        monkeypatch.setattr(app.failure_logs, "OUTAGE_REPEAT_SECONDS", 0.0)  # the interval gone by
        assert TURN.send(4, None) is False
    said = [record for record in caplog.records if record.name == "app.dispatch"]
    assert [(record.levelno, record.exc_info) for record in said] == [(logging.WARNING, None)] * 2
    first, again = (record.getMessage() for record in said)
    assert first.startswith(f"could not enqueue {TURN.actor}(1); recovery will send it (ConnectionError: ")
    assert first.endswith("); every run that meets this is said at most every 30 s")
    assert again.startswith(f"could not enqueue {TURN.actor}(4); recovery will send it (ConnectionError: ")
    assert again.endswith("); every run that meets this is said at most every 0 s; 2 more runs failed alike since "
                          "this was last said")


def test_a_stream_publisher_cut_off_from_redis_says_so_once_not_at_every_batch(
        settings_of: Callable[..., None], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Every batch a worker's publisher sends fails alike while Redis is away; each said it in a line of its
    own (800 lines in 12 s of a Redis restart in a chaos hunt). Here Redis is a closed port."""
    import logging
    from functools import partial

    import app.failure_logs
    from app.live_stream_writer import _Publisher

    said_of: dict[tuple[str, str], tuple[float, int]] = {}
    monkeypatch.setattr(app.failure_logs, "_outage_said", said_of)
    settings_of(REDIS_URL=f"redis://127.0.0.1:{free_port()}/0")
    publisher = _Publisher()

    def failed_unsaid() -> int:
        """How many failed batches went unsaid since the one that was said; -1 before any failed."""
        return said_of.get(("app.live_stream_writer", "publishing stream entries"), (0.0, -1))[1]

    with caplog.at_level(logging.WARNING, logger="app.live_stream_writer"):
        for batch in range(6):  # each sent alone: the next is queued once the last has failed
            publisher.add("agentq-test:stream", {"type": "delta", "a": 100, "o": batch, "data": "x"}, False)
            wait_for(partial(lambda failed: failed_unsaid() == failed, batch), what=f"batch {batch} to fail")
    said = [record.getMessage() for record in caplog.records if record.name == "app.live_stream_writer"]
    assert len(said) == 1, said
    assert said[0].startswith("publishing stream entries failed (ConnectionError: ")
    assert said[0].endswith("; readers fall back to the database, said at most every 30 s")


def test_a_send_that_fails_for_a_bug_is_logged_with_its_traceback_every_time(
        caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """Only an outage, or a setting to mend, is said sparingly in one line (`warn_of_sparingly`): here a Redis that
    refuses the broker's login, said once with the error that names it; a send that fails for anything else (a
    script Redis runs and fails: a bug) keeps its traceback, for each run it fails."""
    import logging

    import dramatiq

    import app.failure_logs
    from app.run_kinds import TURN
    from tests.conftest import REDIS_DB
    from workers.broker import install_broker

    broker = install_broker()
    assert dramatiq.get_broker() is broker

    def said_on_sending_two() -> list[tuple[str, bool]]:
        monkeypatch.setattr(app.failure_logs, "_outage_said", {})
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="app.dispatch"):
            assert [TURN.send(ident, None) for ident in (1, 2)] == [False, False]
        return [(r.getMessage(), r.exc_info is not None) for r in caplog.records if r.name == "app.dispatch"]

    with monkeypatch.context() as patch:
        refused = type(broker.client).from_url(f"redis://:wrong@127.0.0.1:6379/{REDIS_DB}", socket_connect_timeout=0.5)
        patch.setattr(broker, "client", refused)
        patch.setattr(broker, "scripts", {n: refused.register_script(s.script) for n, s in broker.scripts.items()})
        assert said_on_sending_two() == [(
            f"could not enqueue {TURN.actor}(1); recovery will send it (AuthenticationError: AUTH <password> called "
            "without any password configured for the default user. Are you sure your configuration is correct?); "
            "every run that meets this is said at most every 30 s", False)]
    failing = broker.client.register_script("return redis.call('NOSUCHCOMMAND')")
    monkeypatch.setattr(broker, "scripts", dict.fromkeys(broker.scripts, failing))
    assert said_on_sending_two() == [(f"could not enqueue {TURN.actor}({ident}); recovery will send it", True)
                                     for ident in (1, 2)]


def test_an_api_statement_that_fails_for_itself_is_a_500_not_an_outages_503(
        world: World, caplog: pytest.LogCaptureFixture) -> None:
    """The API answers 503 "retry shortly" only for an outage (`is_outage`, the rule the workers' waits use); a
    statement cancelled by a timeout, or a deadlock, is a slow query or a bug to look at: logged with its
    traceback and answered 500. (A real error PostgreSQL raises for one message's insert, by a trigger.)"""
    import logging

    from sqlalchemy import text

    from app.db import transaction

    _, key = world.user()
    conversation_id = world.conversation(key, world.agent(world.model()))
    with transaction() as session:
        session.execute(text(
            "CREATE FUNCTION cancel_probe() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            "IF NEW.content = 'cancel me' THEN RAISE EXCEPTION 'canceling statement due to statement timeout' "
            "USING ERRCODE = 'query_canceled'; END IF; RETURN NEW; END $$"))
        session.execute(text("CREATE TRIGGER cancel_probe BEFORE INSERT ON conversation_messages FOR EACH ROW "
                             "EXECUTE FUNCTION cancel_probe()"))
    try:
        with caplog.at_level(logging.WARNING):
            refused = world.send(key, conversation_id, "cancel me")
    finally:
        with transaction() as session:
            session.execute(text("DROP TRIGGER cancel_probe ON conversation_messages"))
            session.execute(text("DROP FUNCTION cancel_probe()"))
    assert (refused.status_code, refused.json["error"]["code"], refused.headers.get("Retry-After")) \
        == (500, "internal_error", None)
    logged = [r for r in caplog.records if r.getMessage().startswith("unhandled error on POST")]
    assert len(logged) == 1 and logged[0].exc_info is not None
    assert isinstance(logged[0].exc_info[1], sqlalchemy.exc.OperationalError)
    assert not [r for r in caplog.records if r.getMessage().startswith("dependency unavailable")]
    accepted = world.send(key, conversation_id, "hello")
    assert accepted.status_code == 202
