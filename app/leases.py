"""Keeping the leases of the runs (turns and test runs) this process works on alive, from three threads.

A lease is renewed on a timer, not per chunk, so a model that takes minutes to send its first token
does not lose its turn; when the process dies the renewals stop and the lease runs out, which is
what lets recovery hand the turn to another worker. A renewal notices a lease another worker took (its
holder is told to stop) and a stop request from a user recorded in the database; a second thread renews
the Redis lock and slot of each turn, and a third looks for stop requests in Redis twice a second.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from app import conversation_locks
from app.claims import LeaseLost
from app.clock import lease_expiry, lease_now
from app.config import get_settings
from app.db import transaction
from app.failure_logs import log_failure
from app.run_kinds import DEBUG_RUN, KINDS, TURN, RunKind

log = logging.getLogger(__name__)

TICK_SECONDS = 0.5
"""How often the keeper looks for stop requests (a stop is honoured within this), and retries a renewal."""


def renewal_seconds() -> float:
    """How often a live holder renews its lease: a third of it, so two renewals may fail before it runs out.
    It also bounds how long a live holder takes to renew once the database is back after an outage, which
    the recovery sweep waits before it takes expired leases over (`app.recovery`)."""
    return get_settings().lease_seconds / 3


@dataclass
class Holding:
    ident: int
    token: str
    stop: threading.Event
    turn: conversation_locks.HeldTurn | None
    """Set for a user turn (it has a conversation lock and a user slot); None for an admin test run."""
    delivery: int
    """The run's delivery count as this delivery's claim wrote it: any later claim counts one more, so a lease
    taken back at the same count was claimed by no one meanwhile (`RunKind.take_back_lease`)."""
    ending: bool = False
    """Its model calls are over and its end is being written (`LeaseKeeper.ending`)."""
    lost: bool = False
    """Its lease was lost while it ran (`LeaseKeeper.running`): what it held is another delivery's now."""
    handed_back: bool = False
    """This process gave its lease up as it left (`LeaseKeeper.hand_back`), and did not take it back: a renewal
    that finds the lease gone does not report it taken over."""
    sent: bool = False
    """Handed back and sent to another worker (`LeaseKeeper.handed_back_to_send`): it can no longer take its lease
    back, or the worker the run was sent to could call the model again for an answer this one has."""
    deciding: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)
    """Held while a hand-back decides on this run and revokes its lease, and while the run marks itself `ending`:
    so a call that ends during that revocation is seen by neither as still going nor as ending, and its run
    takes the lease back only once the revocation committed."""

    @property
    def kind(self) -> RunKind:
        """Told by what the run holds: only a user's turn holds a conversation lock and a user's slot."""
        return TURN if self.turn is not None else DEBUG_RUN

    @property
    def key(self) -> tuple[str, int, str]:
        return _delivery_key(self.kind, self.ident, self.token)


@dataclass(frozen=True)
class HandBack:
    given_up: list[tuple[RunKind, int]]
    """The runs whose leases were given up, for another worker to take over."""
    ending: list[tuple[RunKind, int]]
    """The runs left to write their ends."""


def _delivery_key(kind: RunKind, ident: int, token: str) -> tuple[str, int, str]:
    """A delivery, not a run: a stale delivery of a turn (its lease taken over by another thread of the same
    process) and the live one are held apart, so the stale one leaving cannot end the live one's renewals."""
    return (kind.label, ident, token)


class LeaseKeeper:
    def __init__(self) -> None:
        self._held: dict[tuple[str, int, str], Holding] = {}
        self._lock = threading.Lock()
        self._released = threading.Condition(self._lock)
        # Held while the turns' Redis locks are renewed, and by a run leaving, so that a renewal never takes
        # again a lock a turn just freed; never by a run starting, and never taken under `_lock`.
        self._renewing_locks = threading.Lock()
        # The deliveries whose leases the last database renewal kept: the Redis locks renewed are theirs.
        self._kept: set[tuple[str, int, str]] = set()
        # Runs waiting for `_renewing_locks` to leave, which the locks' renewals let go first (`_lock_renewals`).
        self._leaving = 0
        self._locks_due = threading.Event()
        self._threads: dict[str, threading.Thread] = {}
        self._given_up: list[Holding] = []
        self.cancel_check: Callable[[list[int]], set[int]] | None = None

    @contextmanager
    def holding(self, holding: Holding) -> Iterator[Holding]:
        with self._lock:
            self._held[holding.key] = holding
            self._keep_running()
        try:
            yield holding
        finally:
            with self._lock:
                self._leaving += 1
            try:
                with self._renewing_locks, self._lock:
                    self._held.pop(holding.key, None)
            finally:
                with self._released:
                    self._leaving -= 1
                    self._released.notify_all()

    @contextmanager
    def running(self, holding: Holding) -> Iterator[Holding]:
        """A delivery's run, its lease kept alive while the body runs (`holding`). A run whose lease was lost (taken
        over by another worker, or handed back as this process stopped) ends quietly, `holding.lost` set: its
        end was written by no one here, and another delivery has it. Any other failure hands the run to a retry
        of its message at once (its lease given up) before it is raised."""
        try:
            with self.holding(holding):
                yield holding
        except LeaseLost:
            holding.lost = True
            log.warning("%s %s is no longer this run's (taken over by another worker, or handed back as this one "
                        "stopped); this run stops", holding.kind.label, holding.ident)
        except BaseException:
            holding.kind.hand_to_retry(holding.ident, holding.token)
            raise

    def ending(self, holding: Holding, *, stopped: bool) -> None:
        """The run's model calls are over (or it will make none), its end about to be written: a hand-back at
        shutdown leaves it to finish. Given up then, its settlement would be refused and the delivery that takes
        it over would call the model again for an answer already paid for (its user charged once, the provider
        twice), or moderate again an input refused (moderation fails open).

        A run the hand-back gave up while its calls were ending on their own (an answer, a failure, a refusal)
        takes its lease back for the same reason, unless another delivery claimed the run first (its end is then
        refused, as any taken-over run's is). One whose end is a stop (`stopped`, or a fallback not called because the
        run was found given up) does not: the stop may be the hand-back's own, whose run belongs to the next worker;
        a user's stop reaches that worker's claim too."""
        with holding.deciding:
            was_handed_back = holding.handed_back
            if holding.handed_back and not stopped and not holding.sent:
                holding.handed_back = not _take_back(holding)
            holding.ending = True
        if was_handed_back:  # `handed_back_to_send` waits for this decision
            with self._released:
                self._released.notify_all()

    def hand_back(self, *, sent_within: float = 0.0) -> HandBack:
        """The process is leaving with runs still in flight (the shutdown grace ran out): give up the leases of
        those still calling their models now, so that another worker can take them over at once rather than
        when the lease runs out, and tell them to stop calling (their stopped ends are refused). Those writing
        their end are left to it, and those whose calls end on their own as they are given up take their leases
        back (`ending`). The recovery sweep leaves the runs given up alone for `sent_within` seconds, the time
        this process takes to send them itself (`handed_back_to_send`): sent by a sweep meanwhile, one whose
        answer came back as it was stopped could be claimed elsewhere before it took its lease back."""
        given_up: list[tuple[RunKind, int]] = []
        ending: list[tuple[RunKind, int]] = []
        for h in self._snapshot():
            # Each looked at and revoked under its own `deciding` lock, committed at once: a call that ends while
            # others are revoked is left to write its end, one that ends on its own during or after its revocation
            # takes the lease back (`ending`).
            with h.deciding:
                if h.ending:
                    ending.append((h.kind, h.ident))
                    continue
                revoked = _revoke(h, sent_within)
                if revoked:  # committed: only now is it another worker's to take
                    given_up.append((h.kind, h.ident))
                    self._given_up.append(h)
                h.handed_back = revoked is not False
            h.stop.set()
            if revoked is None:  # those given up so far are still sent again; the rest keep their leases
                break
        return HandBack(given_up, ending)

    def handed_back_to_send(self, seconds: float) -> list[tuple[RunKind, int]]:
        """The runs the hand-back gave up that are to be sent to another worker: those that did not take their
        leases back. Each is waited for (up to `seconds` in all) until its calls have ended and it decided, or it
        left: sent before, the run whose answer came back as its call was stopped could take its lease back
        after another worker had claimed the run, and that worker called the model again. Each is marked `sent`,
        after which it takes nothing back (one slower than `seconds` to decide is sent all the same)."""
        given_up = list(self._given_up)

        def decided(h: Holding) -> bool:
            return h.ending or self._held.get(h.key) is not h

        with self._released:
            self._released.wait_for(lambda: all(decided(h) for h in given_up), timeout=seconds)
        to_send: list[tuple[RunKind, int]] = []
        for h in given_up:
            with h.deciding:
                if h.handed_back:
                    h.sent = True
                    to_send.append((h.kind, h.ident))
        return to_send

    def wait_until_released(self, seconds: float) -> bool:
        """Whether every run this process held was let go (its runner returned) within `seconds`."""
        with self._released:
            return self._released.wait_for(lambda: not self._held, timeout=seconds)

    def _keep_running(self) -> None:
        """Under the lock: the database renewals, the Redis locks' renewals and the looks for stop requests
        each on a thread of its own (started again in a forked child), so that a Redis that stopped answering
        (which holds a call for its socket timeout) never holds back a lease's renewal in the database, or
        healthy turns would lose their leases and run twice."""
        for name, target in (("lease-keeper", self._renewals), ("lock-keeper", self._lock_renewals),
                             ("stop-watch", self._stop_looks)):
            thread = self._threads.get(name)
            if thread is None or not thread.is_alive():
                self._threads[name] = threading.Thread(target=target, name=name, daemon=True)
                self._threads[name].start()

    def held_count(self) -> int:
        """The runs this process holds now (`app.worker_presence`)."""
        with self._lock:
            return len(self._held)

    def _snapshot(self) -> list[Holding]:
        with self._lock:
            return list(self._held.values())

    def _renewals(self) -> None:
        """Renew when a third of the lease has passed by the clock; a renewal that failed is tried again at
        the next tick."""
        settings = get_settings()
        renew_every = renewal_seconds()
        renewed_at = float("-inf")
        while True:
            time.sleep(min(TICK_SECONDS, renew_every))
            held = self._snapshot()
            if held and time.monotonic() - renewed_at >= renew_every:
                try:
                    self._renew(held, settings.lease_seconds)
                    renewed_at = time.monotonic()
                except Exception as error:
                    log_failure(log, error, "a lease renewal (tried again next tick)")

    def _lock_renewals(self) -> None:
        """The Redis locks and slots of the turns whose leases the last database renewal kept, after it."""
        while True:
            self._locks_due.wait()
            self._locks_due.clear()
            # A lock is not handed to the thread waiting for it, and this one takes it again at once: while a
            # hung Redis held each renewal for its timeout, the next was due by then, and a run leaving waited
            # for as long as Redis hung (a test's turn, for minutes).
            with self._released:
                self._released.wait_for(lambda: not self._leaving)
            try:
                with self._renewing_locks:
                    # A turn that ended since that renewal has freed its lock and slot, and renewing them now
                    # would take them again for a whole lease: it cannot leave between this look and the
                    # renewal. A Redis that hangs holds only the runs leaving meanwhile, whose turns wait on it
                    # to free their locks anyway.
                    with self._lock:
                        turns = [h.turn for key, h in self._held.items() if h.turn is not None and key in self._kept]
                    conversation_locks.renew(turns)
            except Exception as error:
                log_failure(log, error, "a renewal of the turns' Redis locks (tried again at the next renewal)")

    def _stop_looks(self) -> None:
        while True:
            time.sleep(TICK_SECONDS)
            held = self._snapshot()
            if not held:
                continue
            try:
                self._check_cancels(held)
            except Exception as error:
                log_failure(log, error, "a look for stop requests (looked again next tick)")

    def _check_cancels(self, held: list[Holding]) -> None:
        if self.cancel_check is None:
            return
        turns = [h.ident for h in held if h.turn is not None]
        if not turns:
            return
        for ident in self.cancel_check(turns):
            for h in held:
                if h.turn is not None and h.ident == ident:
                    h.stop.set()

    def _renew(self, held: list[Holding], lease_seconds: float) -> None:
        """One guarded UPDATE per kind of run (`RunKind.renew_leases`); a delivery whose token no longer matches was
        taken over. The same statement reads each turn's stop request from the database, so a stop is honoured
        even when Redis lost the flag the API set."""
        kept: set[tuple[str, int, str]] = set()
        stopped: set[tuple[RunKind, int]] = set()
        with transaction() as session:
            expires = lease_expiry(lease_now(session), lease_seconds)
            for kind in KINDS:
                pairs = [(h.ident, h.token) for h in held if h.kind is kind]
                if not pairs:
                    continue
                for renewed in kind.renew_leases(session, pairs, expires):
                    kept.add(_delivery_key(kind, renewed.ident, renewed.token))
                    if renewed.stop_asked:
                        stopped.add((kind, renewed.ident))
        with self._lock:
            current = [h for h in held if self._held.get(h.key) is h]
            self._kept = kept
        for h in current:
            if h.key not in kept:
                # A run writing its end gives its lease up with it, one handed back as this process leaves gave it
                # up: not kept, and not taken over. Lost to another worker, its settlement is refused and its
                # runner says so.
                if not (h.ending or h.handed_back):
                    log.warning("lease of %s %s was taken over; stopping", h.kind.label, h.ident)
                h.stop.set()
            elif (h.kind, h.ident) in stopped:
                h.stop.set()
        self._locks_due.set()


def _revoke(h: Holding, sent_within: float) -> bool | None:
    """Give up a run's lease for `LeaseKeeper.hand_back`, in a transaction of its own: whether it was still this
    delivery's, or None when the database failed, the revocation perhaps committed before the error (the run
    is stopped either way: a lease it kept runs out, and the recovery sweep sends it again)."""
    try:
        with transaction() as session:
            swept_after = lease_expiry(lease_now(session), sent_within) if sent_within else None
            return h.kind.revoke_lease(session, h.ident, h.token, swept_after=swept_after, handed_back=True)
    except Exception as error:
        log_failure(log, error, "giving up the leases of the runs still in flight (the rest run out by themselves)")
        return None


def _take_back(h: Holding) -> bool:
    """`RunKind.take_back_lease` for `LeaseKeeper.ending`, in a transaction of its own. A database failure here
    is no reason to fail the run: its settlement is then refused if the revocation had committed (the run is
    another delivery's), and lands if it had not."""
    try:
        with transaction() as session:
            taken = h.kind.take_back_lease(session, h.ident, h.token, h.delivery)
    except Exception as error:
        log_failure(log, error, f"taking back the lease of {h.kind.label} {h.ident} to write its end")
        return False
    if taken:
        log.info("%s %s ended its model calls as it was handed back; it took its lease back to write its end",
                 h.kind.label, h.ident)
    else:
        log.info("%s %s ended its model calls as it was handed back, and is no longer this delivery's (another took "
                 "it over, or it was ended); its end is not written", h.kind.label, h.ident)
    return taken


keeper = LeaseKeeper()
