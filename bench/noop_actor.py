"""The floor's Dramatiq actor: it does nothing, on Dramatiq's own Redis broker set up as agentq's.

The broker is Dramatiq's `RedisBroker` with agentq's options (`workers.broker.broker_options`: the
same Redis pool, namespace, heartbeat and middleware) less `WorkerServices`, whose lease keeper and
recovery sweep are agentq's own work. agentq's broker subclass (the doorbell, the consumer that
waits for a wake-up) is left out too: what it costs belongs to the pipeline figure, not to the
floor. Run by `python -m dramatiq bench.noop_actor`.
"""

from __future__ import annotations

import dramatiq
from dramatiq import Message
from dramatiq.brokers.redis import RedisBroker

from workers.broker import broker_options
from workers.middleware import WorkerServices

QUEUE = "bench_noop"
ACTOR = "bench_noop"

options = broker_options()
options["middleware"] = [m for m in options["middleware"] if not isinstance(m, WorkerServices)]
broker = RedisBroker(**options)
dramatiq.set_broker(broker)


@dramatiq.actor(actor_name=ACTOR, queue_name=QUEUE)
def noop(ident: int) -> None:
    """Nothing: the cost of a message is all Dramatiq's and Redis's."""


def enqueue(ident: int) -> None:
    """Exactly what `app.dispatch` does for a turn: a Message built by hand, sent through the broker."""
    broker.enqueue(Message(queue_name=QUEUE, actor_name=ACTOR, args=(ident,), kwargs={}, options={}))
