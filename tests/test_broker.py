"""The worker's Redis consumer: a place freed by a worker thread is refilled at once, not after a backoff.

The consumer here waits at most 10 s for a freed place (the worker's own waits at most `POLL_CAP_MS`),
so a consumer that slept instead of waking at the ack would show as a 10 s wait."""

from __future__ import annotations

import threading
import time
import uuid

import dramatiq

from workers.broker import RefillingConsumer, build_broker


def test_a_consumer_with_every_place_taken_fetches_as_soon_as_a_thread_acks(redis_client) -> None:  # type: ignore[no-untyped-def]
    broker = build_broker()
    queue = f"refill-{uuid.uuid4().hex[:8]}"
    for index in range(2):
        broker.enqueue(dramatiq.Message(queue_name=queue, actor_name="probe", args=(index,), kwargs={}, options={}))
    assert isinstance(broker.consume(queue, prefetch=1), RefillingConsumer)
    consumer = RefillingConsumer(broker, queue, prefetch=1, timeout=10_000)
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
