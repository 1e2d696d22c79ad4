"""What a worker process runs besides its actors, and what happens when a message dies."""

from __future__ import annotations

import logging

from app import debug_runner, dispatch, llm_client, turn_runner
from app.db import dispose_engines, open_pool
from app.dispatch import RUN_TURN
from app.heap import freeze_after_boot
from app.leases import keeper
from app.recovery import RecoveryLoop
from app.redis_client import reset_redis
from app.stop_requests import stopped_turns

log = logging.getLogger(__name__)

_recovery: RecoveryLoop | None = None
_draining = False


def after_fork() -> None:
    dispose_engines()
    reset_redis()
    llm_client.reset_clients()


def start(threads: int) -> None:
    global _recovery
    llm_client.size_pools(threads)
    _warm_up()
    keeper.cancel_check = stopped_turns
    if _recovery is None:
        _recovery = RecoveryLoop()
        _recovery.start()
    freeze_after_boot()


def _warm_up() -> None:
    """Pay for the database pool and the HTTP stack's imports before the worker says it is ready,
    not in the first turns it runs (which would otherwise be slower than every later one)."""
    try:
        open_pool()
    except Exception:
        log.warning("could not open database connections at boot; they open on first use", exc_info=True)
    llm_client.warm_up()


def stop() -> None:
    """The worker is shutting down: no more sweeps, and no new run starts in this process."""
    global _draining
    _draining = True
    if _recovery is not None:
        _recovery.stop()


def draining() -> bool:
    return _draining


def hand_back(actor_name: str, ident: int) -> bool:
    """Send a run that reached this stopping process again, for another worker; False if it cannot be sent."""
    return dispatch.send_turn(ident) if actor_name == RUN_TURN else dispatch.send_debug_run(ident)


def message_died(actor_name: str, ident: int, reason: str) -> None:
    if actor_name == RUN_TURN:
        turn_runner.abandon_turn(ident, reason)
    else:
        debug_runner.abandon_run(ident, reason)
