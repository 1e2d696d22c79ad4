"""The lease keeper against the real database: what it renews, and whom it tells to stop."""

from __future__ import annotations

import threading
import time
import uuid
from contextlib import ExitStack
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, cast

import pytest
from sqlalchemy import select, text, update

from app.auth import Principal
from app.conversation_locks import HeldTurn
from app.db import plain_transaction, transaction
from app.leases import Holding, LeaseKeeper
from app.models import ConversationMessage, DebugRun, ModelAttempt, Turn
from app.models.base import utc_now
from app.redis_client import SOCKET_TIMEOUT_SECONDS
from app.turn_intake import _insert_turn
from app.turn_status import TurnStatus
from tests.support import SilentServer, wait_for

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Sequence

    import redis

    from tests.conftest import UpstreamLog, Workers, World


def _processing_turn(world: World, token: str, model: str = "primary") -> HeldTurn:
    """A turn in flight under `token`, written in one transaction so no worker ever sees it pending."""
    user_id, key = world.user()
    conversation_id = world.conversation(key, world.agent(world.model(model)))
    now = utc_now()
    with plain_transaction() as connection:
        accepted = _insert_turn(connection, Principal(user_id, "alice", False), conversation_id, "hi", None)
        turn_id = accepted.assistant_message.id
        connection.execute(update(Turn).where(Turn.assistant_message_id == turn_id).values(
            lease_token=token, lease_expires_at=now + timedelta(seconds=10), deadline_at=now + timedelta(hours=1),
            deliveries=2))
        connection.execute(update(ConversationMessage).where(ConversationMessage.id.in_(
            [turn_id, accepted.user_message.id])).values(status="processing"))
    return HeldTurn(turn_id, user_id, conversation_id)


@pytest.fixture
def swept_once(world: World, redis_client: redis.Redis) -> None:
    """The session's workers sweep for lost work, and the first sweep after a test's Redis flush (`clean`) takes
    Redis for lost and sends every run processing under no lease (`app.recovery`): one a test has just handed
    back would be claimed by a session worker. The tests that hand runs back mark Redis as such a sweep does
    (the test's tables are empty: there is nothing to send again), and give their runs a revoked lease's expiry
    that keeps later sweeps off them (`sent_within`)."""
    from app.redis_epoch import epoch_key, epoch_value, server_run

    redis_client.set(epoch_key(), epoch_value(server_run(redis_client)))


def _lease_left(turn_id: int, seconds: float) -> None:
    """The turn's lease runs out `seconds` from now (by the database's clock, which judges it)."""
    with transaction() as session:
        session.execute(text("UPDATE turns SET lease_expires_at = now() + make_interval(secs => :left) "
                             "WHERE assistant_message_id = :turn"), {"left": seconds, "turn": turn_id})


def _lease_expiry(turn_id: int) -> datetime | None:
    with transaction() as session:
        return session.scalar(select(Turn.lease_expires_at).where(Turn.assistant_message_id == turn_id))


def test_a_stale_delivery_leaving_does_not_end_the_live_deliverys_renewals(world: World) -> None:
    """Two threads of one process hold the same turn: the first delivery's lease was taken over by the
    second. The stale one is told to stop at the next renewal, and its leaving keeps the live one renewed."""
    turn = _processing_turn(world, token="live")
    before = _lease_expiry(turn.turn_id)
    keeper = LeaseKeeper()
    stale = Holding(turn.turn_id, "stale", threading.Event(), turn, delivery=2)
    live = Holding(turn.turn_id, "live", threading.Event(), turn, delivery=2)
    with ExitStack() as live_stack:
        with keeper.holding(stale):
            live_stack.enter_context(keeper.holding(live))
            wait_for(stale.stop.is_set, timeout=5, what="the stale delivery to be told to stop")
        renewed = wait_for(lambda: (at := _lease_expiry(turn.turn_id)) != before and at, timeout=5,
                           what="the live delivery's lease to be renewed")
        # Renewed by the keeper (3 s leases in the tests), not left at the 10 s the turn was given.
        assert before is not None and renewed < before
        later = wait_for(lambda: (at := cast(datetime, _lease_expiry(turn.turn_id))) > renewed and at, timeout=5,
                         what="a renewal after the stale delivery left")
        assert later > renewed
        assert not live.stop.is_set()


def _processing_turn_expiring_soon(world: World) -> HeldTurn:
    """A processing turn whose lease runs out 2.5 s from now unless it is renewed."""
    turn = _processing_turn(world, token="live")
    with transaction() as session:
        session.execute(update(Turn).where(Turn.assistant_message_id == turn.turn_id)
                        .values(lease_expires_at=utc_now() + timedelta(seconds=2.5)))
    return turn


def _lease_alive_for_8_seconds(keeper: LeaseKeeper, turn: HeldTurn) -> tuple[list[bool], float]:
    """Whether `turn`'s lease was alive by the database's clock, sampled every 0.1 s for 8 s while `keeper` holds it;
    and how long the run took to leave the keeper."""
    alive = []
    with keeper.holding(Holding(turn.turn_id, "live", threading.Event(), turn, delivery=2)):
        ends = time.monotonic() + 8
        while time.monotonic() < ends:
            with transaction() as session:
                alive.append(session.scalar(text(
                    "SELECT lease_expires_at > clock_timestamp() FROM turns WHERE assistant_message_id = :id"),
                    {"id": turn.turn_id}))
            time.sleep(0.1)
        leaving = time.monotonic()
    return alive, time.monotonic() - leaving


def test_a_redis_that_stops_answering_holds_back_no_renewal_of_the_lease(
        world: World, settings_of: Callable[..., None], silent_redis: SilentServer) -> None:
    """The keeper looks for stop requests in Redis and renews the turns' Redis locks; a Redis that stops
    answering holds each of those for its socket timeout (5 s). The Redis locks were once renewed on the
    thread that renews the leases in the database, after each renewal, and a lease of under about 15 s ran
    out while its worker still streamed, another worker taking the turn over. Each has a thread of its own,
    and the lease's renewals are due by the clock: the lease (3 s in the tests, renewed every second) stays
    ahead of the database's clock while both wait on the hung Redis."""
    from app.stop_requests import stopped_turns

    turn = _processing_turn_expiring_soon(world)
    settings_of(REDIS_URL=f"redis://127.0.0.1:{silent_redis.port}/0")
    keeper = LeaseKeeper()
    keeper.cancel_check = stopped_turns
    alive, leaving = _lease_alive_for_8_seconds(keeper, turn)
    assert len(alive) > 40 and all(alive), f"the lease ran out in {alive.count(False)} of {len(alive)} samples"
    # The run leaves once the renewal of the Redis locks under way gives up (its socket timeout, 5 s), not
    # after every renewal that falls due meanwhile: each took the keeper's lock again at once, for minutes.
    assert leaving < SOCKET_TIMEOUT_SECONDS + 2, f"the run took {leaving:.1f} s to leave"
    # Both the look for stop requests and the locks' renewal waited, each on a new connection after every
    # timeout: how many depends on when each thread started, not on what is tested.
    assert len(silent_redis.connections) >= 2


def test_a_renewal_waiting_on_redis_does_not_hold_back_turns_starting(
        world: World, settings_of: Callable[..., None], silent_redis: SilentServer,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A renewal ends with one pipeline to Redis (the turns' locks and slots), which a Redis that stopped
    answering holds for its socket timeout; that wait was under the lock every turn of the process takes to
    start, so none could for 5 s at each renewal. (A turn ending waits for it: it must not free its lock
    in Redis while the renewal may take it again, and its own freeing waits on the same Redis.)"""
    from app import conversation_locks

    first, second = _processing_turn(world, "first", "one"), _processing_turn(world, "second", "two")
    settings_of(REDIS_URL=f"redis://127.0.0.1:{silent_redis.port}/0")
    renew, renewing = conversation_locks.renew, threading.Event()

    def noted_renewal(turns: Iterable[HeldTurn]) -> None:
        renewing.set()
        renew(turns)

    monkeypatch.setattr(conversation_locks, "renew", noted_renewal)
    keeper = LeaseKeeper()
    try:
        with keeper.holding(Holding(first.turn_id, "first", threading.Event(), first, delivery=2)):
            wait_for(lambda: renewing.is_set() and silent_redis.connections, timeout=5,
                     what="a renewal to wait on Redis")
            started = time.monotonic()
            with keeper.holding(Holding(second.turn_id, "second", threading.Event(), second, delivery=2)):
                took = time.monotonic() - started
                silent_redis.hang_up()
    finally:
        silent_redis.hang_up()
    assert took < 1, f"a turn took {took:.1f} s to start behind a renewal"


def test_a_dying_duplicate_message_leaves_a_turn_another_delivery_runs(world: World) -> None:
    """Retries of a duplicate message ran out while another delivery holds the turn's live lease: the turn is
    that delivery's to settle. Once no live lease is left, the same dead message ends it as `error`."""
    from app.unheld_ends import abandon_turn

    turn = _processing_turn(world, token="running")
    assert abandon_turn(turn.turn_id, "retries exhausted after 3 attempts: boom") is None
    with transaction() as session:
        status = session.scalar(select(ConversationMessage.status).where(ConversationMessage.id == turn.turn_id))
        token = session.scalar(select(Turn.lease_token).where(Turn.assistant_message_id == turn.turn_id))
    assert (status, token) == ("processing", "running")

    with transaction() as session:
        session.execute(update(Turn).where(Turn.assistant_message_id == turn.turn_id)
                        .values(lease_expires_at=utc_now() - timedelta(seconds=1)))
    assert abandon_turn(turn.turn_id, "retries exhausted after 3 attempts: boom") is TurnStatus.ERROR
    with transaction() as session:
        status = session.scalar(select(ConversationMessage.status).where(ConversationMessage.id == turn.turn_id))
    assert status == "error"


def test_a_dying_duplicate_message_leaves_a_test_run_another_delivery_runs(world: World) -> None:
    """The same rule for an admin test run: ended by its dead message only once no live lease is left."""
    from app.models import DebugRun
    from app.unheld_ends import abandon_debug_run

    admin_id = world.api.get("/api/me", world.admin_key).json["id"]
    agent_id = world.agent(world.model())
    with transaction() as session:
        run = DebugRun(agent_id=agent_id, admin_id=admin_id, input="hi", status="processing", lease_token="running",
                       lease_expires_at=utc_now() + timedelta(seconds=30))
        session.add(run)
        session.flush()
        run_id = run.id

    def status() -> str:
        with transaction() as session:
            return session.get_one(DebugRun, run_id).status

    assert abandon_debug_run(run_id, "retries exhausted after 3 attempts: boom") is None
    assert status() == "processing"
    with transaction() as session:
        session.get_one(DebugRun, run_id).lease_expires_at = utc_now() - timedelta(seconds=1)
    assert abandon_debug_run(run_id, "retries exhausted after 3 attempts: boom") is TurnStatus.ERROR
    assert status() == "error"


def test_a_run_ended_without_its_worker_is_logged_with_the_status_it_got(
        world: World, caplog: pytest.LogCaptureFixture) -> None:
    """A turn its user had asked to stop, whose worker died, ends `cancelled` when a look ends it: the log said
    "ended as error" all the same, and an operator reading it looked for a failure that was a stop."""
    import logging

    from app.run_kinds import TURN
    from app.unheld_ends import end_unheld

    stopped, failed = _processing_turn(world, "dead", "stopped"), _processing_turn(world, "dead", "failed")
    with transaction() as session:
        session.execute(update(Turn).where(Turn.assistant_message_id.in_([stopped.turn_id, failed.turn_id]))
                        .values(lease_expires_at=utc_now() - timedelta(seconds=1)))
        session.execute(update(Turn).where(Turn.assistant_message_id == stopped.turn_id)
                        .values(cancel_requested_at=utc_now()))
    with caplog.at_level(logging.WARNING, logger="app.unheld_ends"):
        ended = end_unheld(TURN, [stopped.turn_id, failed.turn_id], "gave up", "past its deadline")
    assert ended == [stopped.turn_id, failed.turn_id]
    assert [r.getMessage() for r in caplog.records if r.name == "app.unheld_ends"] == [
        f"turn {stopped.turn_id} ended as cancelled: gave up", f"turn {failed.turn_id} ended as error: gave up"]


def test_leases_are_judged_by_the_databases_clock_not_by_a_worker_clock_running_ahead(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker machine whose clock runs a minute ahead (no NTP) neither takes a live turn over when a
    duplicate message reaches it nor re-sends the turn from its recovery sweep: leases are written and
    judged by the database's clock, so only one clock matters (the worker's clock is faked wherever a lease rule
    could read it)."""
    import app.clock
    import app.recovery
    import app.turn_state
    from app.claims import Claim
    from app.debug_run_state import claim_debug_run
    from app.recovery import recover_once
    from app.turn_state import claim_turn

    turn = _processing_turn(world, token="live")
    run_id = world.api.post(f"/api/admin/agents/{world.agent(world.model('tester'))}/debug/execute", world.admin_key,
                            {"content": "hi"}).json["debug_log_id"]
    with transaction() as session:
        session.execute(update(DebugRun).where(DebugRun.id == run_id).values(
            status="processing", lease_token="live", lease_expires_at=utc_now() + timedelta(seconds=10),
            deadline_at=utc_now() + timedelta(hours=1)))
    for module in (app.turn_state, app.recovery, app.clock):
        monkeypatch.setattr(module, "utc_now", lambda: utc_now() + timedelta(minutes=1))
    with plain_transaction() as connection:
        claim = claim_turn(connection, turn.turn_id, lease_seconds=30)
    with transaction() as session:
        run_claim = claim_debug_run(session, run_id, lease_seconds=30)
    assert (claim.outcome, run_claim.outcome) == (Claim.OWNED_ELSEWHERE, Claim.OWNED_ELSEWHERE)
    swept = recover_once()
    assert turn.turn_id not in swept.sent and run_id not in swept.debug_sent
    with transaction() as session:
        assert session.scalar(select(Turn.lease_token).where(Turn.assistant_message_id == turn.turn_id)) == "live"
        assert session.scalar(select(DebugRun.lease_token).where(DebugRun.id == run_id)) == "live"


def test_a_sweep_takes_no_lease_over_until_the_database_has_answered_it_for_a_renewal_period(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """After an outage longer than a lease every lease has run out, and the workers still streaming renew theirs
    within a renewal period of the database being back: the recovery loop's sweeps leave leases alone until the
    database has answered them for that long, at a process's start and again after an outage. (Its effect on
    real workers: tests/test_chaos.py, a database outage makes no turn call its model twice.)"""
    import psycopg

    import app.recovery
    from app.leases import renewal_seconds
    from app.recovery import RecoveryLoop, RecoveryReport
    from app.takeover_gate import TakeoverGate

    sweeps: list[tuple[float, bool]] = []
    """When each sweep the database answered ran, and whether it could take leases over."""
    failed = threading.Event()
    away = threading.Event()

    def sweep(*, first_sweep: bool, gate: TakeoverGate) -> RecoveryReport:
        if away.is_set():
            failed.set()
            raise psycopg.OperationalError("connection refused")
        gate.answered(gate.clock())
        sweeps.append((time.monotonic(), gate.open))
        return RecoveryReport()

    def waited_a_renewal_period(since: int) -> bool:
        """The sweeps from `since` on: the first could not take over, the first that could came a period later."""
        answered = sweeps[since:]
        took_over = wait_for(lambda: next((at for at, take_over in sweeps[since:] if take_over), None), timeout=15,
                             what="a sweep that takes leases over")
        return not answered[0][1] and took_over - answered[0][0] >= renewal_seconds()

    monkeypatch.setattr(app.recovery, "recover_once", sweep)
    loop = RecoveryLoop()
    loop.start()
    try:
        wait_for(lambda: sweeps, what="the first sweep")
        assert waited_a_renewal_period(0)
        away.set()
        wait_for(failed.is_set, what="a sweep the database did not answer")
        back = len(sweeps)
        away.clear()
        wait_for(lambda: len(sweeps) > back, what="a sweep after the outage")
        assert waited_a_renewal_period(back)
    finally:
        loop.stop()


def test_a_settlement_whose_commits_reply_was_lost_is_not_taken_for_a_lost_lease(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """The connection drops after the server committed a settlement and before its reply came back: the
    settlement, trying again through the outage, finds its lease given up (by itself) and was refused as
    a lost lease, as after a takeover. The worker then skipped what follows the commit: the stream's
    `done` (readers waited for the database), the count of ended turns, the conversation's lock and the
    user's slot (held until their lease ran out). The settlement's stamp tells the two apart."""
    from collections.abc import Iterator
    from contextlib import contextmanager
    from decimal import Decimal

    import psycopg
    import sqlalchemy.exc

    from app import turn_runner
    from app.agent_setup import AgentParams, AgentSetup
    from app.live_stream import stream_key
    from app.live_stream_writer import TurnStream
    from app.model_target import ModelTarget
    from app.models import CreditTransaction, User
    from app.redis_client import StreamEntry, get_redis
    from app.turn_status import TurnStatus

    turn = _processing_turn(world, token="this-delivery")
    with transaction() as session:
        question_id = session.get_one(Turn, turn.turn_id).user_message_id
    real_transaction = turn_runner.plain_transaction
    dropped: list[Any] = []

    @contextmanager
    def committed_then_dropped() -> Iterator[Any]:
        with real_transaction() as connection:
            yield connection
        if not dropped:
            dropped.append(True)
            raise sqlalchemy.exc.OperationalError("COMMIT", {}, psycopg.OperationalError(
                "server closed the connection unexpectedly"))

    monkeypatch.setattr(turn_runner, "plain_transaction", committed_then_dropped)
    target = ModelTarget(1, "primary", "echo", None, None, Decimal("1"), Decimal("2"), None)
    context = turn_runner.TurnContext(
        turn_id=turn.turn_id, question_id=question_id, token="this-delivery", user_id=turn.user_id,
        conversation_id=turn.conversation_id, content="hi", history=[],
        agent=AgentSetup("", AgentParams(120, None, None), target, None), reserved=Decimal(0), delivery=2,
        fell_back=False, gives_up=None, ends_by=None)
    turn_runner._settle(context, TurnStatus.SUCCESS, TurnStream(turn.turn_id, 2),
                        turn_runner._Answer("the answer", prompt_tokens=3, completion_tokens=4, latency_ms=5),
                        model=target.name, cost=Decimal("0.5"), success_tokens=7)
    assert dropped == [True]
    with transaction() as session:
        answer = session.get_one(ConversationMessage, turn.turn_id)
        assert (answer.status, answer.content) == ("success", "the answer")
        assert [t.amount for t in session.query(CreditTransaction).filter_by(message_id=turn.turn_id)] == [
            Decimal("-0.5")]
        assert session.get_one(User, turn.user_id).balance == Decimal("9.5")
    wait_for(lambda: [fields[b"type"] for _, fields in cast(list[StreamEntry], get_redis().xrange(
        stream_key(turn.turn_id)))][-1:] == [b"done"],
             what="the stream's done")


def test_a_look_whose_first_answer_took_longer_than_a_renewal_period_shuts_the_takeover_gate() -> None:
    """A connection that hung through a network partition raises no error: the sweep's gate stayed open, and
    its first answer after the partition took over the leases the live holders, cut off as long, had not
    renewed yet. Such a look shuts the gate for a renewal period, as an outage does."""
    from app.leases import renewal_seconds
    from app.takeover_gate import TakeoverGate

    now = [1000.0]
    gate, renewal = TakeoverGate(lambda: now[0]), renewal_seconds()
    gate.answered(now[0])
    assert not gate.open  # a process's start: shut for a renewal period
    for _ in range(3):
        now[0] += renewal / 2
        gate.answered(now[0])
    assert gate.open
    asked_at = now[0]
    now[0] += renewal + 0.1  # the look hung this long before its first answer
    gate.answered(asked_at)
    assert not gate.open
    now[0] += renewal
    gate.answered(now[0])
    assert gate.open


def test_a_turn_is_ended_past_its_deadline_only_once_its_lease_is_gone_and_its_deadline_passed(world: World) -> None:
    """The deadline bound's end (`deadline_before`), on the database: a live lease or a deadline still ahead
    leaves the turn; neither, and it ends `error`. Its look joined the turn and its message without a join
    condition (a cartesian product SQLAlchemy warned of, a bare line in the API's JSON log)."""
    from app.turn_state import end_turn_unowned
    from app.turn_status import TurnStatus

    turn = _processing_turn(world, token="running")

    def end(deadline_before: datetime) -> object:
        with transaction() as session:
            return end_turn_unowned(session, turn.turn_id, TurnStatus.ERROR, "past its deadline",
                                    deadline_before=deadline_before)

    assert end(utc_now() + timedelta(hours=2)) is None  # its lease is live
    with transaction() as session:
        session.execute(update(Turn).where(Turn.assistant_message_id == turn.turn_id)
                        .values(lease_expires_at=utc_now() - timedelta(seconds=1)))
    assert end(utc_now()) is None  # its deadline is an hour ahead
    assert end(utc_now() + timedelta(hours=2)) is not None
    with transaction() as session:
        status = session.scalar(select(ConversationMessage.status).where(ConversationMessage.id == turn.turn_id))
    assert status == "error"


def test_a_stop_recorded_only_in_the_database_reaches_the_turn_at_a_renewal(world: World) -> None:
    """A stop is recorded on the turn's row as well as in Redis; a Redis that lost its flag must not leave the
    turn running. The keeper here has no Redis look (`cancel_check`), so only the renewal can tell it. An admin
    test run held beside it, renewed by the same pass, is not told to stop."""
    turn = _processing_turn(world, token="live")
    admin_id = world.api.get("/api/me", world.admin_key).json["id"]
    with transaction() as session:
        run = DebugRun(agent_id=world.agent(world.model("run")), admin_id=admin_id, input="hi", status="processing",
                       lease_token="run", lease_expires_at=utc_now() + timedelta(seconds=10))
        session.add(run)
        session.flush()
        run_id = run.id
    before = _lease_expiry(turn.turn_id)
    keeper = LeaseKeeper()
    held_turn = Holding(turn.turn_id, "live", threading.Event(), turn, delivery=2)
    held_run = Holding(run_id, "run", threading.Event(), None, delivery=1)
    with keeper.holding(held_turn), keeper.holding(held_run):
        wait_for(lambda: _lease_expiry(turn.turn_id) != before, timeout=5, what="a first renewal")
        assert not held_turn.stop.is_set()
        with transaction() as session:
            session.execute(update(Turn).where(Turn.assistant_message_id == turn.turn_id)
                            .values(cancel_requested_at=utc_now()))
        wait_for(held_turn.stop.is_set, timeout=5, what="the turn to be told to stop by a renewal")
        assert not held_run.stop.is_set()
        with transaction() as session:
            run_lease = session.get_one(DebugRun, run_id).lease_expires_at
        assert run_lease is not None and run_lease < utc_now() + timedelta(seconds=5)  # renewed: 3 s leases here


def test_a_run_whose_end_gave_its_lease_up_is_not_logged_as_taken_over(
        world: World, swept_once: None, caplog: pytest.LogCaptureFixture) -> None:
    """A renewal between a settlement's commit (which gives the lease up) and its runner leaving the keeper
    warned that the run's lease "was taken over", on a turn that had just ended fine. A run writing its end
    (`LeaseKeeper.ending`) is told nothing; one whose lease another delivery took is still warned of."""
    import logging

    ended, taken = _processing_turn(world, "ending", "ended"), _processing_turn(world, "mine", "taken")
    keeper = LeaseKeeper()
    held_ended = Holding(ended.turn_id, "ending", threading.Event(), ended, delivery=2)
    held_taken = Holding(taken.turn_id, "mine", threading.Event(), taken, delivery=2)
    with caplog.at_level(logging.WARNING, logger="app.leases"), keeper.holding(held_ended), \
            keeper.holding(held_taken):
        keeper.ending(held_ended, stopped=False)
        with transaction() as session:
            session.execute(update(Turn).where(Turn.assistant_message_id == ended.turn_id).values(lease_token=None))
            session.execute(update(Turn).where(Turn.assistant_message_id == taken.turn_id)
                            .values(lease_token="another"))
        wait_for(lambda: held_ended.stop.is_set() and held_taken.stop.is_set(), timeout=5,
                 what="a renewal to find both leases gone")
    warned = [r.getMessage() for r in caplog.records if "was taken over" in r.getMessage()]
    assert warned == [f"lease of turn {taken.turn_id} was taken over; stopping"]


def test_a_run_handed_back_as_its_worker_leaves_is_not_logged_as_taken_over(
        world: World, swept_once: None, caplog: pytest.LogCaptureFixture) -> None:
    """A worker leaving gives up the leases of the runs still calling (`LeaseKeeper.hand_back`); a renewal
    before such a run let go warned that its lease "was taken over", which no other worker had done. One whose
    lease another delivery took before the hand-back is still warned of."""
    import logging

    from app.run_kinds import TURN

    handed, taken = _processing_turn(world, "mine", "handed"), _processing_turn(world, "mine", "taken")
    probe = _processing_turn(world, "probe", "probe")  # writing its end: not handed back, its lease renewed
    keeper = LeaseKeeper()
    held_handed = Holding(handed.turn_id, "mine", threading.Event(), handed, delivery=2)
    held_taken = Holding(taken.turn_id, "mine", threading.Event(), taken, delivery=2)
    held_probe = Holding(probe.turn_id, "probe", threading.Event(), probe, delivery=2)
    with caplog.at_level(logging.WARNING, logger="app.leases"), keeper.holding(held_handed), \
            keeper.holding(held_taken), keeper.holding(held_probe):
        keeper.ending(held_probe, stopped=False)
        with transaction() as session:
            session.execute(update(Turn).where(Turn.assistant_message_id == taken.turn_id)
                            .values(lease_token="another"))
        handed_back = keeper.hand_back(sent_within=30)
        assert (handed_back.given_up, handed_back.ending) == ([(TURN, handed.turn_id)], [(TURN, probe.turn_id)])
        assert held_handed.stop.is_set() and held_taken.stop.is_set() and not held_probe.stop.is_set()
        # Two renewals: the first may have read the leases before the hand-back, and a renewal logs its warnings
        # after its commit, when the probe's new expiry is already seen; the second starts after the first's logging.
        before = _lease_expiry(probe.turn_id)
        first = wait_for(lambda: (at := _lease_expiry(probe.turn_id)) != before and at, timeout=5,
                         what="a renewal after the hand-back")
        wait_for(lambda: _lease_expiry(probe.turn_id) not in (before, first), timeout=5, what="a second renewal")
    warned = {r.getMessage() for r in caplog.records if "was taken over" in r.getMessage()}
    assert warned == {f"lease of turn {taken.turn_id} was taken over; stopping"}


def test_a_hand_back_whose_database_fails_part_way_stops_every_run_it_could_not_tell_about(
        world: World, swept_once: None) -> None:
    """Each revocation is its own transaction; one that fails (here a real error PostgreSQL raises for that row)
    ends the hand-back, those given up before it still reported for sending again. The failed one is stopped
    too, since its revocation may have committed before the error; the runs after it keep their leases and run
    on until the process leaves (those leases then run out)."""
    from sqlalchemy import text

    from app.run_kinds import TURN

    first, failing, after = (_processing_turn(world, token, token) for token in ("first", "explode", "after"))
    keeper = LeaseKeeper()
    held = [Holding(t.turn_id, token, threading.Event(), t, delivery=2)
            for t, token in ((first, "first"), (failing, "explode"), (after, "after"))]
    with transaction() as session:
        session.execute(text(
            "CREATE FUNCTION refuse_revocation() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            "IF OLD.lease_token = 'explode' AND NEW.lease_token IS NULL THEN "
            "RAISE EXCEPTION 'revocation refused for the test'; END IF; RETURN NEW; END $$"))
        session.execute(text("CREATE TRIGGER refuse_revocation BEFORE UPDATE ON turns FOR EACH ROW "
                             "EXECUTE FUNCTION refuse_revocation()"))
    try:
        with keeper.holding(held[0]), keeper.holding(held[1]), keeper.holding(held[2]):
            handed_back = keeper.hand_back(sent_within=30)
            assert (handed_back.given_up, handed_back.ending) == ([(TURN, first.turn_id)], [])
            assert [h.stop.is_set() for h in held] == [True, True, False]
            with transaction() as session:
                leases = session.execute(select(Turn.lease_token, Turn.handed_back).where(
                    Turn.assistant_message_id.in_([t.turn_id for t in (first, failing, after)]))
                    .order_by(Turn.assistant_message_id)).all()
            assert [tuple(row) for row in leases] == [(None, 1), ("explode", 0), ("after", 0)]
    finally:
        with transaction() as session:
            session.execute(text("DROP TRIGGER refuse_revocation ON turns"))
            session.execute(text("DROP FUNCTION refuse_revocation()"))


def test_a_takeover_records_the_calls_of_every_earlier_delivery_left_in_no_record(
        world: World, workers: Workers, redis_client: redis.Redis) -> None:
    """Delivery 1 streamed part of an answer and its worker died; delivery 2 took the turn over, streamed some
    more and died before it recorded delivery 1's call. The delivery that takes the turn over from 2 records
    both dead deliveries' calls, once each; it recorded delivery 2's only, and delivery 1's call, which the
    provider bills, was in no record."""
    import json

    from app.live_stream import stream_key
    from app.outbox import send
    from app.run_kinds import TURN

    user_id, key = world.user()
    conversation_id = world.conversation(key, world.agent(world.model("billed")))
    now = utc_now()
    with plain_transaction() as connection:
        accepted = _insert_turn(connection, Principal(user_id, "alice", False), conversation_id, "hi", None)
        turn_id = accepted.assistant_message.id
        connection.execute(update(Turn).where(Turn.assistant_message_id == turn_id).values(
            lease_token="dead", lease_expires_at=now - timedelta(seconds=1), deadline_at=now + timedelta(hours=1),
            deliveries=2))
        connection.execute(update(ConversationMessage).where(ConversationMessage.id.in_(
            [turn_id, accepted.user_message.id])).values(status="processing"))
    for attempt, text_streamed in ((100, "the first try"), (200, "the second")):
        redis_client.xadd(stream_key(turn_id), {"type": "status", "a": attempt,
                                                "data": json.dumps({"status": "processing", "model": "billed"})})
        redis_client.xadd(stream_key(turn_id), {"type": "delta", "a": attempt, "o": 0, "data": text_streamed})
    assert send(TURN, turn_id, None)

    assert world.wait_terminal(key, turn_id)["status"] == "success"
    with transaction() as session:
        rows = session.execute(select(ModelAttempt.delivery, ModelAttempt.model_name, ModelAttempt.outcome,
                                      ModelAttempt.completion_tokens)
                               .where(ModelAttempt.message_id == turn_id).order_by(ModelAttempt.delivery)).all()
    assert [tuple(row) for row in rows] == [(1, "billed", "interrupted", 4), (2, "billed", "interrupted", 3),
                                            (3, "billed", "success", 2)]


def test_deliveries_a_graceful_stop_handed_back_do_not_count_toward_giving_up(settings_of: Callable[..., None]) -> None:
    """`AGENTQ_MAX_DELIVERIES` counts the deliveries that died or stalled, not those a worker's stop handed back;
    the reason names both, and the deadline's reason the delivery's own number."""
    from app.config import get_settings
    from app.deliveries import give_up_reason

    limit = get_settings().max_deliveries
    assert give_up_reason(limit + 1, None) == f"gave up after {limit} deliveries"
    assert give_up_reason(limit + 1, None, handed_back=1) is None
    assert give_up_reason(limit + 3, None, handed_back=2) == (
        f"gave up after {limit} deliveries, not counting 2 handed back at a worker's stop")
    assert give_up_reason(limit + 1, 0.0, handed_back=1).startswith(f"gave up at delivery {limit + 1}: ")  # type: ignore[union-attr]
    settings_of(AGENTQ_MAX_DELIVERIES="1")
    assert give_up_reason(2, None) == "gave up after 1 delivery"


def _settle_as_success(turn: HeldTurn, token: str) -> None:
    """The end a turn's settlement writes (`finish_turn` under its lease), for a run whose answer came back."""
    from app.turn_state import finish_turn

    with plain_transaction() as connection:
        question = connection.execute(select(Turn.user_message_id)
                                      .where(Turn.assistant_message_id == turn.turn_id)).scalar_one()
        finish_turn(connection, turn.turn_id, question, token, TurnStatus.SUCCESS, content="the answer")


def _turn_lease(turn_id: int) -> tuple[str | None, int, str]:
    with transaction() as session:
        row = session.execute(select(Turn.lease_token, Turn.handed_back, ConversationMessage.status)
                              .join(ConversationMessage, ConversationMessage.id == Turn.assistant_message_id)
                              .where(Turn.assistant_message_id == turn_id)).one()
    return row[0], row[1], row[2]


def test_a_run_whose_calls_end_just_after_it_was_handed_back_takes_its_lease_back_and_writes_its_end(
        world: World, swept_once: None) -> None:
    """A hand-back gave up a turn whose answer came back right after the look: its settlement was refused, and the
    delivery taking it over called the model again for an answer already paid for. Until another delivery claims
    the run, the run whose calls ended takes its lease back (`LeaseKeeper.ending`) and its end lands."""
    from app.run_kinds import TURN

    turn = _processing_turn(world, "mine")
    keeper = LeaseKeeper()
    holding = Holding(turn.turn_id, "mine", threading.Event(), turn, delivery=2)
    with keeper.holding(holding):
        assert keeper.hand_back(sent_within=30).given_up == [(TURN, turn.turn_id)]
        assert _turn_lease(turn.turn_id) == (None, 1, "processing")
        keeper.ending(holding, stopped=False)
        assert not holding.handed_back
        assert _turn_lease(turn.turn_id) == ("mine", 0, "processing")  # the hand-back undone is not counted
        assert (expiry := _lease_expiry(turn.turn_id)) is not None and expiry > utc_now()
        _settle_as_success(turn, "mine")
    assert _turn_lease(turn.turn_id) == (None, 0, "success")


def test_a_run_stopped_by_its_hand_back_does_not_take_its_lease_back(world: World, swept_once: None) -> None:
    """The hand-back stops the calls it gives up: a run whose end is that stop (`stopped`) leaves its lease given
    up, for the worker the run was sent to; taking it back, it ended its turn `cancelled` in the leaving worker."""
    from app.claims import LeaseLost

    turn = _processing_turn(world, "mine")
    keeper = LeaseKeeper()
    holding = Holding(turn.turn_id, "mine", threading.Event(), turn, delivery=2)
    with keeper.holding(holding):
        keeper.hand_back(sent_within=30)
        assert holding.stop.is_set()
        keeper.ending(holding, stopped=True)
        assert holding.handed_back
        with pytest.raises(LeaseLost):
            _settle_as_success(turn, "mine")
    assert _turn_lease(turn.turn_id) == (None, 1, "processing")


def test_a_test_run_whose_calls_end_just_after_it_was_handed_back_takes_its_lease_back(
        world: World, swept_once: None) -> None:
    """The same for an admin test run, whose status is on its own row; one already ended is not taken back."""
    from app.run_kinds import DEBUG_RUN

    admin_id = world.api.get("/api/me", world.admin_key).json["id"]
    with transaction() as session:
        runs = [DebugRun(agent_id=world.agent(world.model(f"run{n}")), admin_id=admin_id, input="hi",
                         status="processing", lease_token="mine", lease_expires_at=utc_now() + timedelta(seconds=30),
                         deliveries=1)
                for n in range(2)]
        session.add_all(runs)
        session.flush()
        running, ended = (run.id for run in runs)
    keeper = LeaseKeeper()
    held = [Holding(run_id, "mine", threading.Event(), None, delivery=1) for run_id in (running, ended)]
    with keeper.holding(held[0]), keeper.holding(held[1]):
        assert keeper.hand_back(sent_within=30).given_up == [(DEBUG_RUN, running), (DEBUG_RUN, ended)]
        with transaction() as session:
            session.get_one(DebugRun, ended).status = "error"
        for holding in held:
            keeper.ending(holding, stopped=False)
        assert [h.handed_back for h in held] == [False, True]
    with transaction() as session:
        leases = [session.get_one(DebugRun, run_id).lease_token for run_id in (running, ended)]
    assert leases == ["mine", None]


@pytest.mark.parametrize("claimer_then", ["runs", "hands_to_retry"])
def test_a_run_claimed_by_another_delivery_after_its_hand_back_is_left_to_that_delivery(
        world: World, swept_once: None, claimer_then: str) -> None:
    """Once the re-sent message's delivery claimed the run, the one whose calls ended late takes nothing back: its
    end is refused, and the claiming delivery runs the turn. Also when that delivery has given the lease up again
    (it failed, and handed the run to its retry): the lease is as free as after the hand-back, but the run's
    delivery count has moved on."""
    from app.claims import LeaseLost
    from app.run_kinds import TURN
    from app.turn_state import claim_turn

    turn = _processing_turn(world, "mine")
    keeper = LeaseKeeper()
    holding = Holding(turn.turn_id, "mine", threading.Event(), turn, delivery=2)
    with keeper.holding(holding):
        keeper.hand_back(sent_within=30)
        with plain_transaction() as connection:
            claim = claim_turn(connection, turn.turn_id, 30)
        assert claim.acquired and claim.token is not None and claim.deliveries == 3
        if claimer_then == "hands_to_retry":
            TURN.hand_to_retry(turn.turn_id, claim.token)
        keeper.ending(holding, stopped=False)
        assert holding.handed_back
        with pytest.raises(LeaseLost):
            _settle_as_success(turn, "mine")
    kept = claim.token if claimer_then == "runs" else None
    assert _turn_lease(turn.turn_id) == (kept, 1, "processing")


def test_a_run_whose_calls_end_during_its_revocation_waits_for_it_then_takes_its_lease_back(
        world: World, swept_once: None) -> None:
    """The call ends while the hand-back's revocation is on its way to the database (held there by a real lock a
    trigger waits for): marking the run `ending` waits for that revocation to commit, then takes the lease
    back. Marked `ending` at once instead, the run was left to the revocation, and its end was refused."""
    turn = _processing_turn(world, "slow")
    keeper = LeaseKeeper()
    holding = Holding(turn.turn_id, "slow", threading.Event(), turn, delivery=2)
    with transaction() as session:
        session.execute(text(
            "CREATE FUNCTION hold_revocation() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            "IF OLD.lease_token = 'slow' AND NEW.lease_token IS NULL THEN PERFORM pg_advisory_xact_lock(4242); "
            "END IF; RETURN NEW; END $$"))
        session.execute(text("CREATE TRIGGER hold_revocation BEFORE UPDATE ON turns FOR EACH ROW "
                             "EXECUTE FUNCTION hold_revocation()"))
    try:
        with ExitStack() as stack, keeper.holding(holding):
            gate = stack.enter_context(transaction())
            gate.execute(text("SELECT pg_advisory_xact_lock(4242)"))
            handing = threading.Thread(target=lambda: keeper.hand_back(sent_within=30))
            handing.start()

            def revocation_waiting() -> bool:
                with transaction() as session:
                    return bool(session.scalar(text(
                        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objid = 4242 AND NOT granted")))

            wait_for(revocation_waiting, timeout=10, what="the revocation to wait at the lock")
            ending = threading.Thread(target=keeper.ending, args=(holding,), kwargs={"stopped": False})
            ending.start()
            ending.join(timeout=0.3)  # long enough for a run not made to wait to have marked itself
            stack.close()  # the revocation commits
            handing.join(timeout=10)
            ending.join(timeout=10)
            assert not handing.is_alive() and not ending.is_alive()
            assert (holding.ending, holding.handed_back) == (True, False)
            _settle_as_success(turn, "slow")
        assert _turn_lease(turn.turn_id) == (None, 0, "success")
    finally:
        with transaction() as session:
            session.execute(text("DROP TRIGGER hold_revocation ON turns"))
            session.execute(text("DROP FUNCTION hold_revocation()"))


def test_a_run_handed_back_is_sent_only_once_its_stopped_call_has_ended(world: World, swept_once: None) -> None:
    """A call stopped by the hand-back may still bring its whole answer back (the model had finished, its
    usage not yet sent): the run then takes its lease back. Sent to another worker before that, the run was
    claimed there first (a worker woken at once by the send's doorbell) and its model called again, a second
    paid call for an answer already had. The runs are sent once each has decided, or left."""
    from app.run_kinds import TURN, RunKind

    answered, left = _processing_turn(world, "mine", "answered"), _processing_turn(world, "mine", "left")
    keeper = LeaseKeeper()
    held_answered = Holding(answered.turn_id, "mine", threading.Event(), answered, delivery=2)
    held_left = Holding(left.turn_id, "mine", threading.Event(), left, delivery=2)
    sent: list[list[tuple[RunKind, int]]] = []
    with keeper.holding(held_answered):
        with keeper.holding(held_left):
            assert len(keeper.hand_back(sent_within=30).given_up) == 2
        # Left to this process to send meanwhile: the recovery sweep waits (`lease_over`) as long.
        assert (expiry := _lease_expiry(answered.turn_id)) is not None and expiry > utc_now() + timedelta(seconds=20)
        sending = threading.Thread(target=lambda: sent.append(keeper.handed_back_to_send(30)))
        sending.start()
        sending.join(timeout=0.3)  # long enough for a send not made to wait to have gone
        assert sending.is_alive() and not sent
        keeper.ending(held_answered, stopped=False)
        sending.join(timeout=10)
        assert sent == [[(TURN, left.turn_id)]]  # the one that left with its lease given up is sent
        _settle_as_success(answered, "mine")
    assert _turn_lease(answered.turn_id) == (None, 0, "success")


def test_a_run_sent_to_another_worker_takes_nothing_back(world: World, swept_once: None) -> None:
    """One that had not decided when the wait ran out is sent all the same, and can no longer take its lease
    back: the worker it was sent to has it."""
    from app.claims import LeaseLost
    from app.run_kinds import TURN

    turn = _processing_turn(world, "mine")
    keeper = LeaseKeeper()
    holding = Holding(turn.turn_id, "mine", threading.Event(), turn, delivery=2)
    with keeper.holding(holding):
        keeper.hand_back(sent_within=30)
        assert keeper.handed_back_to_send(0) == [(TURN, turn.turn_id)]
        keeper.ending(holding, stopped=False)
        assert holding.handed_back
        with pytest.raises(LeaseLost):
            _settle_as_success(turn, "mine")
    assert _turn_lease(turn.turn_id) == (None, 1, "processing")


def test_a_stop_of_a_pending_turn_cancels_it_at_once_and_frees_its_conversation(
        world: World, settings_of: Callable[..., None]) -> None:
    """No worker has a pending turn, so a stop ends it `cancelled` itself, at once: the answer does not
    depend on a worker (here none is waited for at all) and the conversation takes the next message."""
    settings_of(AGENTQ_CANCEL_WAIT_SECONDS="0")
    user_id, key = world.user()
    conversation_id = world.conversation(key, world.agent(world.model()))
    with plain_transaction() as connection:  # accepted, not sent: no worker may claim it before the stop
        accepted = _insert_turn(connection, Principal(user_id, "alice", False), conversation_id, "hi", None)
    turn_id = accepted.assistant_message.id
    stopped = world.api.post(f"/api/messages/{turn_id}/cancel", key)
    assert (stopped.status_code, stopped.json["status"]) == (202, "cancelled")
    assert world.send(key, conversation_id, "next").status_code == 202


def test_a_stop_of_an_ended_turn_leaves_it_as_it_is_and_flags_nothing(
        world: World, workers: Workers, redis_client: redis.Redis) -> None:
    """A stop that finds its turn ended (`request_stop` returns None) records no stop and publishes none: a
    flag left in Redis stopped at once a later turn of the same id (a database made again), and the answer
    waited for a worker that would never come."""
    from app.stop_requests import stop_key

    _, key = world.user()
    conversation_id = world.conversation(key, world.agent(world.model()))
    turn_id = world.send(key, conversation_id, "hi").json["assistant_message"]["id"]
    assert world.wait_terminal(key, turn_id)["status"] == "success"
    started = time.monotonic()
    stopped = world.api.post(f"/api/messages/{turn_id}/cancel", key)
    assert (stopped.status_code, stopped.json["status"]) == (202, "success")
    assert time.monotonic() - started < 1.0  # not `AGENTQ_CANCEL_WAIT_SECONDS` waiting for a worker
    assert redis_client.exists(stop_key(turn_id)) == 0
    with transaction() as session:
        assert session.scalar(select(Turn.cancel_requested_at).where(Turn.assistant_message_id == turn_id)) is None


def _answer_status(turn_id: int) -> str:
    with transaction() as session:
        return session.scalars(select(ConversationMessage.status).where(ConversationMessage.id == turn_id)).one()


def test_only_a_takeover_of_a_lease_never_given_up_has_a_predecessor_whose_calls_to_record(
        world: World, swept_once: None) -> None:
    """`ClaimResult.predecessor` names the delivery whose worker died holding its lease; a lease given up
    (handed to a retry, handed back) leaves no calls to no one, and the takeover has no predecessor."""
    from app.claims import Claim
    from app.turn_state import claim_turn

    died, gave_up = _processing_turn(world, "died", "died"), _processing_turn(world, "gave-up", "gave-up")
    with plain_transaction() as connection:  # one transaction: no sweep sees either run claimable meanwhile
        connection.execute(update(Turn).where(Turn.assistant_message_id == died.turn_id)
                           .values(lease_expires_at=utc_now() - timedelta(seconds=1)))
        connection.execute(update(Turn).where(Turn.assistant_message_id == gave_up.turn_id)
                           .values(lease_token=None, lease_expires_at=utc_now() + timedelta(seconds=60)))
        claims = [claim_turn(connection, turn.turn_id, lease_seconds=30) for turn in (died, gave_up)]
    assert [(c.outcome, c.predecessor) for c in claims] == [(Claim.TAKEN_OVER, 2), (Claim.TAKEN_OVER, None)]


def test_a_sweep_ends_the_unrenewed_lease_of_a_process_gone_from_the_workers_list_and_no_other(
        world: World, workers: Workers, swept_once: None, redis_client: redis.Redis,
        settings_of: Callable[..., None]) -> None:
    """With a 30 s lease, four turns: three whose leases went unrenewed for 25 s, one renewed just now. While Redis
    has held the workers' list for less than a presence's time to live (it was just flushed: a live process may
    not have published into it yet), no lease is ended. Once it has, the sweep ends, and sends again, only the
    unrenewed lease whose token names a process gone from the list; a listed process (its database cut off) keeps
    its lease, as does a token naming no process (an earlier release's) and a process gone but renewing (the list
    is Redis's view, the lease the database's). The lease is ended with its token kept, so the delivery that takes
    the turn over has a predecessor (and runs it)."""
    from app.recovery import recover_once
    from app.worker_presence import WorkerPresence, WorkerState, listed_since_key, publish

    settings_of(AGENTQ_LEASE_SECONDS="30")
    listed, gone = uuid.uuid4().hex, uuid.uuid4().hex
    now = utc_now()
    publish(WorkerPresence(listed, "elsewhere", 1, 4, 1, WorkerState.DATABASE_CUT_OFF, now, now))
    tokens = {"listed": f"{listed}.a1", "gone": f"{gone}.b2", "unnamed": "c3", "renewing": f"{gone}.d4"}
    turns = {name: _processing_turn(world, token, model=name).turn_id for name, token in tokens.items()}
    for name, left in (("listed", 5), ("gone", 5), ("unnamed", 5), ("renewing", 29)):
        _lease_left(turns[name], left)

    def leases() -> dict[str, tuple[str | None, datetime | None]]:
        with transaction() as session:
            rows = session.execute(select(Turn.assistant_message_id, Turn.lease_token, Turn.lease_expires_at)
                                   .where(Turn.assistant_message_id.in_(turns.values()))).all()
        by_id = {turn_id: (token, expires) for turn_id, token, expires in rows}
        return {name: by_id[turn_id] for name, turn_id in turns.items()}

    before = leases()
    assert {name: token for name, (token, _) in before.items()} == tokens
    assert (recover_once().sent, leases()) == ([], before)  # the list is younger than a presence's time to live

    redis_client.set(listed_since_key(), cast(tuple[int, int], redis_client.time())[0] - 60)
    swept = recover_once()
    assert (swept.sent, swept.debug_sent) == ([turns["gone"]], [])
    after = leases()
    assert {name: after[name] for name in ("listed", "unnamed", "renewing")} == {
        name: before[name] for name in ("listed", "unnamed", "renewing")}
    wait_for(lambda: _answer_status(turns["gone"]) == "success", timeout=15, what="the turn taken over and run")
    with transaction() as session:
        assert session.scalar(select(Turn.deliveries).where(Turn.assistant_message_id == turns["gone"])) == 3
        assert session.scalars(select(ModelAttempt.outcome).where(ModelAttempt.message_id == turns["gone"])).all() == [
            "success"]


def test_a_silent_lease_renewed_after_the_sweeps_look_is_not_ended(world: World) -> None:
    """The sweep reads which leases are silent, then ends each: a holder that renewed in between keeps its lease
    (the end is written only if the lease still expires before the silence's bound), where the token alone let the
    end run out a lease just renewed."""
    from app.run_kinds import TURN

    token = f"{uuid.uuid4().hex}.e5"
    turn = _processing_turn(world, token=token)  # its lease expires 10 s from now
    renewed_expiry, now = _lease_expiry(turn.turn_id), utc_now()
    with transaction() as session:
        assert not TURN.end_lease_now(session, turn.turn_id, token, now, unrenewed_before=now + timedelta(seconds=5))
    assert _lease_expiry(turn.turn_id) == renewed_expiry
    with transaction() as session:
        assert TURN.end_lease_now(session, turn.turn_id, token, now, unrenewed_before=now + timedelta(seconds=15))
    assert _lease_expiry(turn.turn_id) == now


def test_a_stop_of_a_turn_whose_worker_went_silent_and_left_the_list_ends_it_at_once(
        world: World, swept_once: None, redis_client: redis.Redis, settings_of: Callable[..., None]) -> None:
    """With a 30 s lease, two stopped turns whose leases went unrenewed for 25 s: the one whose worker left the
    workers' list is ended `cancelled` by the stop itself, its lease revoked, where it stayed `processing` until
    another worker took it over (with none running, a lease after its lease ran out); the one whose worker is still
    listed (alive, its database cut off) is left to it."""
    from app.cancellation import cancel_turn
    from app.worker_presence import WorkerPresence, WorkerState, listed_since_key, publish

    settings_of(AGENTQ_LEASE_SECONDS="30", AGENTQ_CANCEL_WAIT_SECONDS="0.2")
    listed, gone = uuid.uuid4().hex, uuid.uuid4().hex
    now = utc_now()
    publish(WorkerPresence(listed, "elsewhere", 1, 4, 1, WorkerState.DATABASE_CUT_OFF, now, now))
    redis_client.set(listed_since_key(), cast(tuple[int, int], redis_client.time())[0] - 60)
    dead = _processing_turn(world, f"{gone}.f6", model="dead-worker")
    alive = _processing_turn(world, f"{listed}.g7", model="cut-off-worker")
    for turn in (dead, alive):
        _lease_left(turn.turn_id, 5)

    stops = {turn.turn_id: cancel_turn(Principal(turn.user_id, "alice", False), turn.turn_id).status
             for turn in (dead, alive)}
    assert stops == {dead.turn_id: "cancelled", alive.turn_id: "processing"}
    assert (_turn_lease(dead.turn_id)[0], _turn_lease(alive.turn_id)[0]) == (None, f"{listed}.g7")


def test_an_api_processs_look_leaves_a_stopped_turn_to_a_worker_process_that_takes_runs(world: World) -> None:
    """A stopped turn whose lease ran out is the API's to end only while no worker takes runs: a worker's sweep
    sends it again, and the delivery that takes it over ends it, paid for what it generated."""
    import app.stop_bound
    from app.clock import lease_now
    from app.config import get_settings
    from app.worker_presence import WorkerPresence, WorkerState, publish, withdraw

    turn = _processing_turn(world, "gone-holder.p1")
    with transaction() as session:  # stopped, its lease out a minute ago, its message just sent (no sweep sends it)
        session.execute(text("UPDATE turns SET lease_expires_at = now() - interval '60 seconds', enqueued_at = now(), "
                             "cancel_requested_at = now() WHERE assistant_message_id = :turn"), {"turn": turn.turn_id})
        now = lease_now(session)
        expired_before = now - timedelta(seconds=get_settings().lease_seconds)
        found = list(app.stop_bound._stopped_turns()(session, {"expired_before": expired_before}).scalars())
    assert turn.turn_id in found  # the look finds it: only a worker that takes runs keeps it from ending it
    publish(WorkerPresence(id="taking-runs", host="elsewhere", pid=1, threads=1, running=0,
                           state=WorkerState.TAKING_RUNS, started_at=now, seen_at=now))
    try:
        assert app.stop_bound.end_stops_no_delivery_carries_out(now) == []
    finally:
        withdraw("taking-runs")
    with transaction() as session:
        assert session.get_one(ConversationMessage, turn.turn_id).status == "processing"


def test_an_api_processs_look_ends_a_gone_workers_stopped_turn_with_the_text_it_streamed_unpaid(
        world: World, swept_once: None, redis_client: redis.Redis, settings_of: Callable[..., None]) -> None:
    """A stop that came while the worker was still listed was answered `processing`; once the worker has left the
    list and gone silent, an API process's look ends the turn `cancelled` with the text the dead worker had
    streamed, unpaid, and records that call as `interrupted` (the provider bills it), where it waited for a
    takeover (with no worker running, a lease after its lease ran out)."""
    import json

    from app.live_stream import stream_key
    from app.models import CreditTransaction
    from app.stop_bound import end_stops_of_gone_holders
    from app.worker_presence import listed_since_key

    settings_of(AGENTQ_LEASE_SECONDS="30")
    redis_client.set(listed_since_key(), cast(tuple[int, int], redis_client.time())[0] - 60)
    turn = _processing_turn(world, f"{uuid.uuid4().hex}.h8", model="streamed-then-gone")  # its delivery 2
    _lease_left(turn.turn_id, 5)
    with transaction() as session:
        session.execute(update(Turn).where(Turn.assistant_message_id == turn.turn_id)
                        .values(cancel_requested_at=utc_now()))
    redis_client.xadd(stream_key(turn.turn_id), {
        "type": "status", "a": 200, "data": json.dumps({"status": "processing", "model": "streamed-then-gone"})})
    redis_client.xadd(stream_key(turn.turn_id), {"type": "delta", "a": 200, "o": 0, "data": "half an answer"})

    assert end_stops_of_gone_holders() == [turn.turn_id]
    with transaction() as session:
        answer = session.get_one(ConversationMessage, turn.turn_id)
        assert (answer.status, answer.content, answer.model) == ("cancelled", "half an answer", "streamed-then-gone")
        charges = session.scalars(select(CreditTransaction.id).where(CreditTransaction.message_id == turn.turn_id))
        assert charges.all() == []
        attempts = session.execute(select(ModelAttempt.delivery, ModelAttempt.model_name, ModelAttempt.outcome)
                                   .where(ModelAttempt.message_id == turn.turn_id)).all()
    assert [tuple(attempt) for attempt in attempts] == [(2, "streamed-then-gone", "interrupted")]


def test_a_stopped_turns_lease_renewed_after_the_look_for_gone_workers_is_left_to_its_holder(
        world: World, swept_once: None, redis_client: redis.Redis, settings_of: Callable[..., None],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The look reads the silent stopped turns, then asks Redis for their holders, then ends each: a holder that
    came back and renewed in between (frozen, or cut off from both) kept its token, and a revoke by the token alone
    took its turn, ended unpaid, though it was alive to end it and be paid. The end runs the lease out only if it
    is still unrenewed."""
    import app.stop_bound
    from app.worker_presence import listed_since_key

    settings_of(AGENTQ_LEASE_SECONDS="30")
    redis_client.set(listed_since_key(), cast(tuple[int, int], redis_client.time())[0] - 60)
    token = f"{uuid.uuid4().hex}.r1"
    turn = _processing_turn(world, token)
    _lease_left(turn.turn_id, 5)
    with transaction() as session:
        session.execute(update(Turn).where(Turn.assistant_message_id == turn.turn_id)
                        .values(cancel_requested_at=utc_now()))
    asked = app.stop_bound.runs_of_gone_holders

    def renewed_meanwhile(silent: Sequence[Any]) -> set[int]:
        _lease_left(turn.turn_id, 30)  # the holder's renewal, between the look's read and its end
        return asked(silent)

    monkeypatch.setattr(app.stop_bound, "runs_of_gone_holders", renewed_meanwhile)
    assert (app.stop_bound.end_stops_of_gone_holders(only=turn.turn_id), _turn_lease(turn.turn_id)) == (
        [], (token, 0, "processing"))


def test_a_processing_run_whose_lease_was_revoked_with_no_expiry_is_sent_again(
        world: World, workers: Workers, swept_once: None) -> None:
    """A lease revoked with no expiry (`RunKind.revoke_lease` without `swept_after`: an overdue run's, a
    hand-back's that sends nothing itself) is over (`lease_over`): the sweep sends the run again, and it runs."""
    turn = _processing_turn(world, token="revoked")
    with transaction() as session:
        session.execute(update(Turn).where(Turn.assistant_message_id == turn.turn_id).values(
            lease_token=None, lease_expires_at=None, enqueued_at=utc_now() - timedelta(minutes=5)))
    wait_for(lambda: _answer_status(turn.turn_id) == "success", timeout=15, what="the run sent again and run")


def test_a_run_handed_to_a_retry_past_its_deadline_is_ended_without_waiting_for_the_hand_over(
        world: World, workers: Workers, swept_once: None) -> None:
    """A lease without a token is held by no one (`lease_not_held`), whatever its expiry: a run handed to its
    retry (a revoked token, an expiry a minute ahead) past its deadline is ended by the deadline bound at once."""
    turn = _processing_turn(world, token="failed")
    with transaction() as session:
        session.execute(update(Turn).where(Turn.assistant_message_id == turn.turn_id).values(
            lease_token=None, lease_expires_at=utc_now() + timedelta(seconds=60),
            deadline_at=utc_now() - timedelta(hours=1)))
    wait_for(lambda: _answer_status(turn.turn_id) == "error", timeout=15, what="the deadline bound's end")


def test_a_test_run_is_ended_past_its_deadline_only_once_its_deadline_passed(world: World, swept_once: None) -> None:
    """The deadline bound's end of an admin test run (`finish_debug_run(deadline_before=...)`) is judged on
    the locked row: a run under no lease whose deadline is still ahead (a requeue gave it a new one) is left.
    Redis is marked as swept (`swept_once`): the session workers' first sweep after the test's flush sent the run
    to a worker, which ran it between the two looks (seen once in a full suite)."""
    from app.debug_run_state import finish_debug_run
    from app.turn_status import TurnStatus

    admin_id = world.api.get("/api/me", world.admin_key).json["id"]
    with transaction() as session:  # handed to a retry: no lease, and no sweep sends it meanwhile
        run = DebugRun(agent_id=world.agent(world.model()), admin_id=admin_id, input="hi", status="processing",
                       lease_token=None, lease_expires_at=utc_now() + timedelta(seconds=60),
                       deadline_at=utc_now() + timedelta(hours=1), deliveries=1)
        session.add(run)
        session.flush()
        run_id = run.id

    def end(deadline_before: datetime) -> bool:
        with transaction() as session:
            return finish_debug_run(session, run_id, None, TurnStatus.ERROR, deadline_before=deadline_before,
                                    error_message="past its deadline")

    assert end(utc_now()) is False  # its deadline is an hour ahead
    with transaction() as session:
        assert session.get_one(DebugRun, run_id).status == "processing"
    assert end(utc_now() + timedelta(hours=2)) is True
    with transaction() as session:
        assert session.get_one(DebugRun, run_id).status == "error"


def test_a_test_run_taken_over_spends_on_its_model_only_the_time_its_deadline_leaves(
        world: World, swept_once: None, upstream: UpstreamLog) -> None:
    """A delivery that takes a test run over keeps its first delivery's deadline (`Deadline.time_left`), and
    its model calls end by it (`attempts_end_by`), not by the agent's timeout alone."""
    from app.debug_runner import run_debug_run

    admin_id = world.api.get("/api/me", world.admin_key).json["id"]
    agent_id = world.agent(world.model("slow", upstream="echo;ttft=6"), timeout_seconds=30)
    with transaction() as session:  # its first delivery failed and handed it to its retry, 2 s of model time left
        run = DebugRun(agent_id=agent_id, admin_id=admin_id, input="hi", status="processing", lease_token=None,
                       lease_expires_at=utc_now() + timedelta(seconds=60),
                       deadline_at=utc_now() + timedelta(seconds=7), deliveries=1)
        session.add(run)
        session.flush()
        run_id = run.id
    started = time.monotonic()
    run_debug_run(run_id)
    with transaction() as session:
        ended = session.get_one(DebugRun, run_id)
        assert ended.status == "llm_error", (ended.status, ended.error_message)
    assert time.monotonic() - started < 5, ended.error_message


def test_a_test_run_stopped_by_its_hand_back_leaves_its_lease_to_the_next_worker(
        world: World, upstream: UpstreamLog, swept_once: None) -> None:
    """A test run whose model call the hand-back stopped ends as that stop (`keeper.ending(stopped=True)`):
    it does not take its lease back and write a cut-short end; it stays `processing` for the next worker."""
    from app.debug_runner import run_debug_run
    from app.leases import keeper
    from app.run_kinds import DEBUG_RUN

    admin_id = world.api.get("/api/me", world.admin_key).json["id"]
    agent_id = world.agent(world.model("slow", upstream="echo;ttft=5"))
    with transaction() as session:
        run = DebugRun(agent_id=agent_id, admin_id=admin_id, input="hi", status="pending", enqueued_at=utc_now())
        session.add(run)
        session.flush()
        run_id = run.id
    failures: list[BaseException] = []

    def deliver() -> None:
        try:
            run_debug_run(run_id)
        except BaseException as exc:
            failures.append(exc)

    delivery = threading.Thread(target=deliver)
    delivery.start()
    wait_for(lambda: (DEBUG_RUN, run_id) in [(h.kind, h.ident) for h in keeper._snapshot()], what="the run held")
    wait_for(lambda: len(upstream.requests()) == 1, what="its model call")
    assert (DEBUG_RUN, run_id) in keeper.hand_back(sent_within=30).given_up
    delivery.join(timeout=30)
    assert (delivery.is_alive(), failures) == (False, [])  # the delivery ends quietly, writing nothing
    with transaction() as session:
        left = session.get_one(DebugRun, run_id)
        assert (left.status, left.lease_token, left.handed_back) == ("processing", None, 1)
