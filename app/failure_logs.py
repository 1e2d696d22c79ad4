"""How a failure is said in the log: an outage in one line, said again sparingly while it lasts (every run and
every round of a loop meets it alike), a setup step as the step to take, a bug with its traceback.
"""

from __future__ import annotations

import logging
import threading
import time

from app.db import database_location
from app.outages import in_one_line, is_outage
from app.redis_client import redis_location
from app.setup_problems import setup_problem


def _said_in_one_line(error: BaseException) -> bool:
    """An outage, or a setup step to take: what the error says is all there is to say (a bug needs its traceback)."""
    return is_outage(error) or setup_problem(error) is not None


def backing_service(*, of_redis: bool) -> str:
    """The service a failure came from and where it is, as an operator's line names it."""
    return f"Redis at {redis_location()}" if of_redis else f"the database at {database_location()}"


def warn_of(logger: logging.Logger, error: BaseException, message: str, *args: object) -> None:
    """A warning about a step that failed and that something else makes good (the recovery sweep, a lease
    running out): a backing service out of reach, or a setting to mend, said in one line, which repeats for
    every run; anything else with its traceback, which a bug needs."""
    if _said_in_one_line(error):
        logger.warning(message + " (%s)", *args, in_one_line(error))
    else:
        logger.warning(message, *args, exc_info=error)


SETUP_PROBLEM_REPEAT_SECONDS = 60.0
"""How often a background loop says again the same setup problem, which fails each of its rounds alike."""

_setup_problem_said: dict[tuple[str, str], float] = {}

OUTAGE_REPEAT_SECONDS = 30.0
"""How often a background loop says again that a backing service is still out of reach: the lease keeper's
loops try twice a second, and said at each try a 40 s outage was 80 lines a process."""

_outage_said: dict[tuple[str, str], tuple[float, int]] = {}
"""For each logger and loop, when it last said an outage and how many failed rounds it has not said since."""
_outage_said_lock = threading.Lock()

_OUTAGE_SAID_KEPT = 256
"""Past this many, what was said longer than `OUTAGE_REPEAT_SECONDS` ago is forgotten (it would be said at its next
failure anyway; only its count of unsaid rounds goes): a few callers name a run in what they were doing, and an
outage met by thousands of runs kept an entry for each, for the process's life. Looked for again only once the
entries have doubled since, so that a look costs no more than the entries added before it."""
_outage_said_prune_at = _OUTAGE_SAID_KEPT


def _forget_what_was_said_long_ago(now: float) -> None:
    """Under `_outage_said_lock`."""
    global _outage_said_prune_at
    for stale in [key for key, (at, _) in _outage_said.items() if now - at >= OUTAGE_REPEAT_SECONDS]:
        del _outage_said[stale]
    _outage_said_prune_at = max(_OUTAGE_SAID_KEPT, 2 * len(_outage_said))


def said_again(source: str, doing: str, counted: str = "rounds") -> str | None:
    """None while `doing`'s failure was said by `source` (a logger's name) within `OUTAGE_REPEAT_SECONDS` (this
    one counted, unsaid); else the clause that counts the `counted` not said since it was (empty for none), and
    it is said now."""
    key, now = (source, doing), time.monotonic()
    with _outage_said_lock:  # an API process's threads meet an outage at once: one of them says it
        said_at, unsaid = _outage_said.get(key, (float("-inf"), 0))
        if now - said_at < OUTAGE_REPEAT_SECONDS:
            _outage_said[key] = (said_at, unsaid + 1)
            return None
        if len(_outage_said) >= _outage_said_prune_at:
            _forget_what_was_said_long_ago(now)
        _outage_said[key] = (now, 0)
    return f"; {unsaid} more {counted} failed alike since this was last said" if unsaid else ""


def warn_of_repeated(logger: logging.Logger, error: BaseException, doing: str, meanwhile: str) -> None:
    """A failure a busy loop meets at each round alike while it lasts (a Redis outage or failover, a full Redis),
    with what is made of it `meanwhile`: one warning line, said again at most every `OUTAGE_REPEAT_SECONDS` with
    the count of rounds not said. A process's stream publisher said every failed batch: 800 lines in 12 s of
    a Redis restart."""
    if (since := said_again(logger.name, doing)) is not None:
        logger.warning("%s failed (%s); %s, said at most every %g s%s", doing, in_one_line(error), meanwhile,
                       OUTAGE_REPEAT_SECONDS, since)


def warn_of_sparingly(logger: logging.Logger, error: BaseException, message: str, *args: object) -> None:
    """`warn_of` for a step that every run meets alike while a backing service is out of reach (a send while
    Redis is away: each request's, and each pending run's at every recovery sweep, a line each): the outage
    said in one line, naming the run that met it first, and again at most every `OUTAGE_REPEAT_SECONDS` with
    the count of runs not said (`message`, the template, tells one step from another), as is a setting to mend
    (a password Redis refuses); anything else said as `warn_of` says it, with its traceback."""
    if not _said_in_one_line(error):
        warn_of(logger, error, message, *args)
    elif (since := said_again(logger.name, message, "runs")) is not None:
        logger.warning(message + " (%s); every run that meets this is said at most every %g s%s", *args,
                       in_one_line(error), OUTAGE_REPEAT_SECONDS, since)


def log_failure(logger: logging.Logger, error: BaseException, doing: str) -> None:
    """A background loop's failed round (a sweep, a lease renewal), logged by what it means: a setup step not
    taken (no schema, a refused login) as one error line saying the step, at most once a minute for each
    logger, since every round until the step is taken fails alike and a traceback a second would bury it; a
    backing service out of reach as a warning, which the next round waits out, said again at most every
    `OUTAGE_REPEAT_SECONDS` with the count of rounds it did not say; anything else, which would
    repeat at every round (a bug), as an error with its traceback. The setup step is looked for first: a
    login the server refuses carries no SQLSTATE, which `is_outage` takes for a connection that failed."""
    if (problem := setup_problem(error)) is not None:
        key, now = (logger.name, problem.step), time.monotonic()
        if now - _setup_problem_said.get(key, float("-inf")) >= SETUP_PROBLEM_REPEAT_SECONDS:
            _setup_problem_said[key] = now
            logger.error("%s failed: %s. %s (%s); every round fails alike until then, said again at most once a "
                         "minute", doing, problem.step, in_one_line(error), backing_service(of_redis=problem.of_redis))
    elif is_outage(error):
        if (since := said_again(logger.name, doing)) is None:
            return
        logger.warning("%s failed, a backing service is out of reach (%s); trying again, said at most every %g s%s",
                       doing, in_one_line(error), OUTAGE_REPEAT_SECONDS, since)
    else:
        logger.error("%s failed, and not for an outage: it will fail again until this is fixed", doing,
                     exc_info=error)
