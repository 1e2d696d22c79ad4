"""The actors: each loads its message's id and calls one service function."""

from __future__ import annotations

import dramatiq

from app import debug_runner, turn_runner
from app.deliveries import RunGivenUp
from app.queues import DEBUG_QUEUE, RUN_DEBUG, RUN_TURN, TURNS_QUEUE
from workers.broker import install_broker

install_broker()


@dramatiq.actor(actor_name=RUN_TURN, queue_name=TURNS_QUEUE, throws=(RunGivenUp,))
def run_turn(turn_id: int) -> None:
    turn_runner.run_turn(turn_id)


@dramatiq.actor(actor_name=RUN_DEBUG, queue_name=DEBUG_QUEUE, throws=(RunGivenUp,))
def run_debug_run(debug_log_id: int) -> None:
    debug_runner.run_debug_run(debug_log_id)
