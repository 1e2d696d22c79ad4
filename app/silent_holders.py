"""A lease whose holder is gone: the worker process its token names (`app.lease_tokens`) has left the workers' list
(`app.worker_presence`), and the lease has gone unrenewed for `holder_silence_seconds`. The recovery sweep ends
such a lease then, its token kept, and sends the run again (`app.recovery`): a killed worker's turns go on about
20 s after its last renewal with the default 30 s lease, not 30 s.

Both signs are needed, each read so that a live holder is not taken for gone. A holder still listed is alive,
its renewals held up (its database slow or away for it alone), and keeps its lease until it runs out; one that
renews while unlisted (Redis away for it alone) keeps it too, and the end is written only if the lease is still
unrenewed then. The list is believed only once Redis has held it for a presence's time to live: after a flush,
an empty restart or a failover, a live process may not have published into it yet. A holder that was frozen, or
cut off from both, and comes back renews its lease back unless a delivery took the run first, as after a lease
that ran out (the provider may then bill both calls; the user pays once).

Silence is judged from the lease's expiry and this process's `AGENTQ_LEASE_SECONDS`: every process of a
deployment is meant to share it (one with a longer setting than a holder's takes every such lease for silent,
and only the list then keeps it).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

import redis
from sqlalchemy import ColumnElement, DateTime, and_, bindparam, not_
from sqlalchemy.orm import Session

from app.claims import lease_not_held
from app.config import get_settings
from app.db import transaction
from app.lease_tokens import holder_of
from app.leases import renewal_seconds
from app.run_kinds import RunKind
from app.worker_presence import PRESENCE_TTL_SECONDS, absent_processes

log = logging.getLogger(__name__)


def holder_silence_seconds() -> float:
    """How long a lease may go unrenewed before the sweep asks whether its holder is alive: two renewal periods (a
    live holder renews every `renewal_seconds`; one late, or frozen for a few seconds, is not judged: with a period
    and a half, a worker frozen 8 s just before its renewal lost its turns), and no less than a presence's time to
    live (a process that died stays on the workers' list that long)."""
    return max(2 * renewal_seconds(), PRESENCE_TTL_SECONDS)


def renewed_by(now: datetime) -> datetime:
    """A lease that expires before this was last renewed (or taken) more than `holder_silence_seconds` before
    `now`: how the sweep's query finds silent leases."""
    return now + timedelta(seconds=get_settings().lease_seconds - holder_silence_seconds())


def silent_lease(lease_token: ColumnElement[str | None], lease_expires_at: ColumnElement[datetime | None],
                 now: ColumnElement[datetime]) -> ColumnElement[bool]:
    """A lease still held (`app.claims.lease_not_held`, negated) that expires before the `renewed_by` parameter
    (`renewed_by`): unrenewed for `holder_silence_seconds`. The recovery sweep's and the stop look's rule
    (`app.stop_bound`)."""
    return and_(not_(lease_not_held(lease_token, lease_expires_at, now)),
                lease_expires_at < bindparam("renewed_by", type_=DateTime(timezone=True)))


def runs_of_gone_holders(silent: Sequence[Any]) -> set[int]:
    """Of the `silent` rows (a run's id first, its `lease_token`), the runs whose holder has left the workers' list
    (one read of Redis for them all); none while Redis does not answer or the list is not yet whole, and none of
    the runs whose token names no process (an earlier release's)."""
    holders = {row[0]: holder for row in silent if (holder := holder_of(row.lease_token)) is not None}
    if not holders:
        return set()
    try:
        absent = absent_processes(set(holders.values()))
    except redis.RedisError:
        return set()
    return set() if absent is None else {ident for ident, holder in holders.items() if holder in absent}


def take_silent_lease(unit: Session, kind: RunKind, ident: int, token: str, now: datetime) -> bool:
    """In the caller's transaction: run out, at `now`, the lease `token` holds on the run if it is still unrenewed
    (`RunKind.end_lease_now`); False when its holder renewed it since it was judged silent, or another process
    ended it first."""
    return kind.end_lease_now(unit, ident, token, now, unrenewed_before=renewed_by(now))


def end_silent_lease(kind: RunKind, ident: int, token: str, now: datetime) -> bool:
    """`take_silent_lease` in a transaction of its own, for the recovery sweep, which then sends the run again."""
    with transaction() as session:
        ended = take_silent_lease(session, kind, ident, token, now)
    if ended:
        log.warning("%s %s: the worker process holding it left the workers' list and has not renewed its lease for "
                    "%g s or more; its lease is ended now and it is sent again", kind.label, ident,
                    holder_silence_seconds())
    return ended


__all__ = ["end_silent_lease", "holder_silence_seconds", "renewed_by", "runs_of_gone_holders", "silent_lease",
           "take_silent_lease"]
