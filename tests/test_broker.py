"""The worker's Redis consumer wakes when it has something to do, not after a backoff: when a worker
thread frees a place, and when a message is sent to its queue (the doorbell).

The consumers here wait up to 30 s between two looks at their queue (a worker's wait at most
`AGENTQ_BROKER_POLL_MS`, 1 s), so a consumer that slept instead of waking would show as a 30 s wait."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, cast

import dramatiq
import pytest
from dramatiq.brokers.redis import RedisBroker

from tests.support import SilentServer, free_port, wait_for
from workers.broker import DoorbellRedisBroker, build_broker
from workers.consumer import RefillingConsumer

if TYPE_CHECKING:
    import redis
    from dramatiq.broker import MessageProxy

LONG_WAIT_MS = 30_000


def always() -> bool:
    """A consumer's process that always takes new messages: neither stopping nor cut off from its database."""
    return True


@pytest.fixture
def slow_polling_broker(monkeypatch: pytest.MonkeyPatch) -> Iterator[DoorbellRedisBroker]:
    """The broker a worker builds when its idle consumers look at their queue every 30 s."""
    from app.config import get_settings

    monkeypatch.setenv("AGENTQ_BROKER_POLL_MS", str(LONG_WAIT_MS))
    monkeypatch.setenv("AGENTQ_BROKER_NAMESPACE", f"doorbell-{uuid.uuid4().hex[:8]}")
    get_settings.cache_clear()
    broker = build_broker()
    monkeypatch.undo()
    get_settings.cache_clear()
    assert isinstance(broker, DoorbellRedisBroker)
    yield broker
    broker.close()


def probe(queue: str, index: int) -> dramatiq.Message:
    return dramatiq.Message(queue_name=queue, actor_name="probe", args=(index,), kwargs={}, options={})


def taken_after_send(consumer: RefillingConsumer, send: Callable[[dramatiq.Message], object], index: int,
                     within: float = 5) -> float:
    """Send message `index` 0.2 s from now, while the consumer waits; seconds until it handed it out (acked)."""
    threading.Timer(0.2, send, args=(probe(consumer.queue_name, index),)).start()
    started = time.monotonic()
    message = wait_for(lambda: next(consumer), timeout=within, interval=0,
                       what="the consumer to hand out the message")
    waited = time.monotonic() - started
    assert message.args == (index,)
    consumer.ack(message)
    return waited


def test_a_consumer_with_every_place_taken_fetches_as_soon_as_a_thread_acks(redis_client: redis.Redis) -> None:
    broker = build_broker()
    queue = f"refill-{uuid.uuid4().hex[:8]}"
    for index in range(2):
        broker.enqueue(probe(queue, index))
    consumer = RefillingConsumer(broker, queue, prefetch=1, timeout=LONG_WAIT_MS, takes_new=always)
    first = next(consumer)
    assert first is not None and first.args == (0,)

    acked_at: list[float] = []

    def ack_later() -> None:
        time.sleep(0.3)
        acked_at.append(time.monotonic())
        consumer.ack(first)

    threading.Thread(target=ack_later).start()
    started = time.monotonic()
    assert next(consumer) is None, "with its one place taken the consumer hands out nothing"
    woke = time.monotonic()
    second = next(consumer)
    assert second is not None and second.args == (1,)
    assert acked_at and woke >= acked_at[0]
    assert woke - started < 5, f"the consumer slept {woke - started:.1f}s instead of waking at the ack"
    consumer.ack(second)
    consumer.close()


def test_an_idle_consumer_wakes_when_a_message_is_sent_to_its_queue(slow_polling_broker: DoorbellRedisBroker) -> None:
    broker = slow_polling_broker
    queue = f"ring-{uuid.uuid4().hex[:8]}"
    consumer = broker.consume(queue, prefetch=4, timeout=LONG_WAIT_MS)
    assert isinstance(consumer, RefillingConsumer)
    try:
        assert next(consumer) is None, "the queue is empty"
        for index in range(3):
            waited = taken_after_send(consumer, broker.enqueue, index)
            assert waited < 5, f"the consumer took {waited:.1f}s to notice a message sent 0.2s in"
    finally:
        consumer.close()


def test_a_message_sent_without_a_ring_is_found_at_the_next_look(redis_client: redis.Redis) -> None:
    """The ring is only a hint: a message it missed waits for the consumer's next look, no longer."""
    broker = build_broker()
    assert isinstance(broker, DoorbellRedisBroker)
    queue = f"quiet-{uuid.uuid4().hex[:8]}"
    consumer = RefillingConsumer(broker, queue, prefetch=1, timeout=500, takes_new=always,
                                 doorbell=broker.doorbell)
    try:
        assert next(consumer) is None
        waited = taken_after_send(consumer, lambda message: RedisBroker.enqueue(broker, message), 0)
        assert waited < 2, f"found after {waited:.2f}s with looks every 0.5s"
    finally:
        consumer.close()
        broker.close()


def test_the_doorbell_listens_again_after_its_connection_is_killed(
        slow_polling_broker: DoorbellRedisBroker, redis_client: redis.Redis) -> None:
    """Redis drops every subscriber's connection (a restart, a failover): the next send still wakes the consumer."""
    broker = slow_polling_broker
    queue = f"again-{uuid.uuid4().hex[:8]}"
    consumer = cast(RefillingConsumer, broker.consume(queue, prefetch=4))
    try:
        taken_after_send(consumer, broker.enqueue, 0)

        def listeners() -> int:
            return int(cast(list[tuple[bytes, int]], redis_client.pubsub_numsub(broker.doorbell.channel))[0][1])

        def subscriber_ids() -> set[str]:
            """This session's subscribers: those of its database. Killing every subscriber of the server cut the
            doorbells of the suite's other sessions, and of anything else served by that Redis, from their rings."""
            database = redis_client.connection_pool.connection_kwargs["db"]
            clients = cast(list[dict[str, str]], redis_client.client_list(_type="pubsub"))
            return {str(client["id"]) for client in clients if int(client["db"]) == database}

        assert listeners() == 1
        before = subscriber_ids()
        killed = sum(cast(int, redis_client.client_kill_filter(_id=ident)) for ident in before)
        assert killed >= 1
        # It may subscribe again between two looks, so what is awaited is a new connection, not a count of 0.
        wait_for(lambda: listeners() == 1 and subscriber_ids() - before, timeout=10,
                 what="the listener to subscribe again on a new connection")
        assert not subscriber_ids() & before
        # Within the listener's own reconnection, not the consumers' 30 s poll: redis-py (6) also reconnects a
        # pub/sub connection itself, with a backoff of up to seconds, before the listener sees the loss and
        # subscribes again, waking every consumer once subscribed (a ring sent meanwhile is not heard).
        waited = taken_after_send(consumer, broker.enqueue, 1, within=15)
        assert waited < 15, f"the consumer took {waited:.1f}s after the listener came back"
    finally:
        consumer.close()


def test_a_sends_name_is_the_same_whichever_database_hands_its_mark_back() -> None:
    """The sweep names the receipt it looks for from the outbox mark it reads: PostgreSQL hands it back in
    its session's zone, SQLite without one (its stored times are UTC)."""
    from datetime import UTC, datetime, timedelta, timezone

    from app.dispatch import message_id

    written = datetime(2026, 12, 2, 9, 30, 1, 123456, tzinfo=UTC)
    read_back = (written.astimezone(timezone(timedelta(hours=8))), written.replace(tzinfo=None))
    assert {message_id("run_turn", 7, moment) for moment in (written, *read_back)} == {
        "run_turn-7-1796203801123456"}
    assert message_id("run_turn", 7, written + timedelta(microseconds=1)) != message_id("run_turn", 7, written)


def test_a_fetch_redis_refuses_for_its_password_names_the_setting_to_mend(
        caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """A password changed under a running worker: its consumers were told "Redis is out of reach or refuses
    writes", which no wait mends."""
    import logging

    import redis

    import app.failure_logs

    client = redis.Redis.from_url("redis://:not-the-password@127.0.0.1:6379/0")
    broker = DoorbellRedisBroker(poll_ms=100, client=client, namespace=f"refused-{uuid.uuid4().hex[:8]}",
                                 middleware=[])
    consumer = RefillingConsumer(broker, "turns", prefetch=1, timeout=100, takes_new=always)
    monkeypatch.setattr(app.failure_logs, "_outage_said", {})  # said at most every 30 s by any test's consumer
    with caplog.at_level(logging.WARNING, logger="workers.consumer"):
        assert next(consumer) is None
    assert [r.getMessage().split("): ", 1)[1].split(";")[0] for r in caplog.records] == [
        "Redis refuses the password or the database number REDIS_URL gives, or asks for a password it does not "
        "give: mend REDIS_URL"]


def test_a_redis_that_hangs_is_a_closed_connection_to_dramatiq_or_a_fetch_looked_at_again(
        silent_redis: SilentServer, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """Dramatiq's consumer thread survives `ConnectionClosed` (it restarts the consumer a second later), but
    a timeout was an unexpected error: its clean-up, requeueing the retries it held, raised it again, and the
    thread ended, so the process took no retry of that queue until it stopped. Every ack, nack and requeue
    that Redis does not answer in time is `ConnectionClosed`, and so is a send that is not a retry's; a look
    at the queue finds nothing, after its wait, and the consumer looks again (`RefillingConsumer._ride_out`)."""
    import logging

    import redis
    from dramatiq.broker import MessageProxy
    from dramatiq.errors import ConnectionClosed
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    import app.failure_logs

    # No retries of its own, as the worker's pool (`from_url`) has none: each step fails at its first timeout.
    client = redis.Redis(host="127.0.0.1", port=silent_redis.port, socket_timeout=0.2, socket_connect_timeout=1,
                         retry=Retry(NoBackoff(), 0))
    broker = DoorbellRedisBroker(poll_ms=100, client=client, namespace=f"hung-{uuid.uuid4().hex[:8]}", middleware=[])
    consumer = RefillingConsumer(broker, "turns.DQ", prefetch=1, timeout=100, takes_new=always)
    held = MessageProxy(dramatiq.Message(queue_name="turns", actor_name="probe", args=(1,), kwargs={},
                                         options={"redis_message_id": "m-1"}))
    due: dramatiq.Message[Any] = dramatiq.Message(queue_name="turns", actor_name="probe", args=(1,), kwargs={},
                                                  options={})
    monkeypatch.setattr(app.failure_logs, "_outage_said", {})  # said at most every 30 s by any test's consumer
    with caplog.at_level(logging.WARNING, logger="workers.consumer"):
        assert next(consumer) is None
    assert [r.getMessage().split(" (")[0] for r in caplog.records] == ["the consumer of turns.DQ could not fetch"]
    for step in (lambda: consumer.ack(held), lambda: consumer.nack(held), lambda: consumer.requeue([held]),
                 lambda: broker.enqueue(due)):
        with pytest.raises(ConnectionClosed) as closed:
            step()
        assert isinstance(closed.value.__cause__, redis.TimeoutError)


def test_the_consumers_of_a_processs_queues_fetch_no_more_than_its_free_places(
        slow_polling_broker: DoorbellRedisBroker) -> None:
    """Each queue's consumer had a prefetch of its own (the process's threads) while one pool of threads ran
    what both fetched: a run of one queue was taken while every thread ran the other's, and waited for one
    of them, however many other workers idled. Two places here, both taken by the first queue's runs: the
    second queue's consumer fetches nothing until an ack frees one, and is woken by that ack."""
    suffix = uuid.uuid4().hex[:8]
    first_queue, second_queue = f"places-a-{suffix}", f"places-b-{suffix}"
    for index in range(2):
        slow_polling_broker.enqueue(probe(first_queue, index))
    slow_polling_broker.enqueue(probe(second_queue, 9))
    first = slow_polling_broker.consume(first_queue, prefetch=2)
    second = slow_polling_broker.consume(second_queue, prefetch=2)
    try:
        running = cast("list[MessageProxy]", [next(first), next(first)])
        assert [m.args for m in running] == [(0,), (1,)]
        threading.Timer(0.3, first.ack, args=(running[0],)).start()
        started = time.monotonic()
        assert next(second) is None, "with every place taken the second queue's consumer fetched"
        woke = time.monotonic() - started
        assert 0.2 < woke < 5, f"the consumer waited {woke:.1f}s for the freed place"
        taken = next(second)
        assert taken is not None and taken.args == (9,)
        first.ack(running[1])
        second.ack(taken)
    finally:
        first.close()
        second.close()


def test_the_brokers_redis_connections_are_made_as_agentqs_own() -> None:
    """The broker's pool had a connect timeout of its own (5 s against 2 s) and no check of a connection left
    idle: an outage met the two clients differently. Both pools make their connections alike."""
    from app.redis_client import get_redis

    ours = get_redis().connection_pool
    brokers = build_broker().client.connection_pool
    compared = ("socket_timeout", "socket_connect_timeout", "health_check_interval")
    assert ({name: brokers.connection_kwargs.get(name) for name in compared}
            == {name: ours.connection_kwargs.get(name) for name in compared}
            == {"socket_timeout": 5.0, "socket_connect_timeout": 2, "health_check_interval": 30})
    assert (brokers.max_connections, ours.max_connections) == (1000, 1000)


def test_after_a_failover_behind_the_same_address_the_doorbell_subscribes_on_the_new_primary(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The listener's connection stayed on the old primary after a failover behind an address that moved: a
    replica takes SUBSCRIBE and PING, so nothing made it reconnect, and one that does not replicate the new
    primary relays none of its rings; every wake-up waited for the poll until the worker restarted. A quiet
    subscription is made again once it is `RESUBSCRIBE_SECONDS` old (1 s here), through the moved address."""
    import redis

    import workers.doorbell
    from app.redis_client import leaving_replicas
    from tests.stack import RedisServer
    from tests.support import TcpRelay
    from workers.doorbell import Doorbell

    monkeypatch.setattr(workers.doorbell, "RESUBSCRIBE_SECONDS", 1.0)
    monkeypatch.setattr(workers.doorbell, "QUIET_SECONDS", 0.5)
    old, new = RedisServer("doorbell-old").start(), RedisServer("doorbell-new").start()
    address = TcpRelay(old.port)
    doorbell = Doorbell(redis.Redis(connection_pool=leaving_replicas(
        redis.ConnectionPool.from_url(f"redis://127.0.0.1:{address.port}/0"))), "failover:doorbell")
    bell = threading.Event()
    try:
        doorbell.listen("turns", bell)
        wait_for(bell.is_set, what="the listener's subscription")
        new.client().execute_command("REPLICAOF", "NO", "ONE")
        old.client().execute_command("REPLICAOF", "127.0.0.1", str(free_port()))  # a replica of nothing
        address.point_at(new.port)
        bell.clear()
        wait_for(lambda: new.client().publish("failover:doorbell", "turns") == 1, timeout=10,
                 what="the listener on the new primary")
        wait_for(bell.is_set, what="the ring heard")
    finally:
        doorbell.close()
        address.cut()
        old.kill()
        new.kill()
