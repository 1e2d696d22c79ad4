"""The counters' files of processes that have ended, folded into one file a kind.

prometheus_client's multiprocess mode gives every process that counts files of its own in
PROMETHEUS_MULTIPROC_DIR (`counter_<pid>.db`, `histogram_<pid>.db`), and a scrape reads and adds up every
file there. A process that ended leaves its files, since its counts must go on being counted; a deployment
whose API and workers restart for months (deploys, a worker group started again, gunicorn replacing a
worker) leaves thousands, every one of them read by every scrape. So the serving commands fold them: each
ended process's counts are added into `<kind>_ended.db` and its files removed (`fold_ended_processes`), when
`agentq web` starts and as gunicorn replaces a worker, and each time the worker group starts.

A scrape reads the directory under a shared lock and a fold writes it under an exclusive one
(`scrape_lock`, on `.fold.lock` there), so no scrape sees a process's counts twice or not at all. A fold is
journaled: a fold cut short (its process killed) is finished or undone by the next, and read meanwhile as if it
had been finished or undone.
A process counts as ended when no process of that id is alive here; the directory is this host's and its
user's (`cli.metrics_dir`), and must not be shared with processes of another PID namespace (containers on
a shared volume), whose live processes would look ended.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from prometheus_client.mmap_dict import MmapedDict
from prometheus_client.multiprocess import MultiProcessCollector

log = logging.getLogger(__name__)

FOLDED_KINDS = ("counter", "histogram", "summary")
"""The kinds whose values add up across processes; a gauge's do not (each has its own rule)."""
ENDED = "ended"
LOCK_FILE = ".fold.lock"


@contextmanager
def scrape_lock(directory: str, *, exclusive: bool = False) -> Iterator[None]:
    """Held by a scrape (shared) while it reads the directory's files, and by a fold (exclusive) while it
    rewrites them."""
    descriptor = os.open(os.path.join(directory, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        os.close(descriptor)


class FoldSafeCollector(MultiProcessCollector):
    """prometheus_client's collector of the directory, reading it while no fold rewrites it, and leaving out
    the files a fold that was cut short had already added into its kind's file (the next fold removes them)."""

    def collect(self) -> list[Any]:
        with scrape_lock(self._path):
            folded: set[str] = set()
            for kind in FOLDED_KINDS:
                folded.update(_folded_already(*_fold_files(self._path, kind)) or [])
            files = [path for path in glob.glob(os.path.join(self._path, "*.db"))
                     if path not in folded and not _unsized(path)]
            return list(self.merge(files, accumulate=True))


def fold_ended_processes(directory: str | None = None) -> int:
    """Fold the files of every process that has ended into one file a kind; the number of files folded. Best
    effort: a failure is logged, and what the fold had begun is finished or undone by the next one (a scrape
    meanwhile reads the directory as the one or the other: `FoldSafeCollector`)."""
    directory = directory or os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not directory or not os.path.isdir(directory):
        return 0
    try:
        with scrape_lock(directory, exclusive=True):
            return sum(_fold_kind(directory, kind) for kind in FOLDED_KINDS)
    except Exception:
        log.exception("could not fold the counter files of ended processes in %s", directory)
        return 0


def _fold_files(directory: str, kind: str) -> tuple[str, str]:
    """A kind's journal and its archive, the file its ended processes' counts are folded into."""
    return os.path.join(directory, f".fold-{kind}.json"), os.path.join(directory, f"{kind}_{ENDED}.db")


def _fold_kind(directory: str, kind: str) -> int:
    journal, archive = _fold_files(directory, kind)
    _finish_cut_short(journal, archive)
    sources = _ended_files(directory, kind)
    if not sources:
        return 0
    totals: dict[str, float] = {}
    readable = [path for path in sources if not _unsized(path)]
    for path in ([archive] if os.path.exists(archive) else []) + readable:
        for key, value, _timestamp, _position in MmapedDict.read_all_values_from_file(path):
            totals[key] = totals.get(key, 0.0) + value
    with contextlib.suppress(FileNotFoundError):
        os.remove(archive + ".next")  # a fold's killed before its journal: it had changed nothing yet
    written = MmapedDict(archive + ".next")
    try:
        for key, value in totals.items():
            written.write_value(key, value, 0.0)
    finally:
        written.close()
    _write_atomically(journal, json.dumps(sources))
    os.replace(archive + ".next", archive)
    for path in sources:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)
    os.remove(journal)
    return len(sources)


def _finish_cut_short(journal: str, archive: str) -> None:
    """A fold cut short before its archive replaced the old one is undone (its sources still count); one cut
    short after is finished (its sources, already in the archive, are removed)."""
    sources = _folded_already(journal, archive)
    if sources is None:
        return
    leftovers = sources if sources else [archive + ".next"]  # finished: its sources; undone: its new archive
    for path in leftovers:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)
    os.remove(journal)


def _folded_already(journal: str, archive: str) -> list[str] | None:
    """What a fold cut short has left, by its journal: None when there is none; else the files its archive
    already holds, which must not be read again (none when its archive never replaced the last).

    Its new archive is written before its journal, and replaces the last after: a journal beside a `.next`
    file is a fold that changed nothing yet, and one alone a fold whose archive is in place."""
    try:
        with open(journal) as listed:
            sources: list[str] = json.load(listed)
    except FileNotFoundError:
        return None
    return [] if os.path.exists(archive + ".next") else sources


def _ended_files(directory: str, kind: str) -> list[str]:
    """The files of `kind` written by processes no longer alive; the archive, and any file not named by a
    process id, are left alone."""
    ended = []
    for path in sorted(glob.glob(os.path.join(directory, f"{kind}_*.db"))):
        pid = os.path.basename(path)[len(kind) + 1:-len(".db")]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            ended.append(path)
    return ended


def _unsized(path: str) -> bool:
    """prometheus_client creates a process's file before it sizes it, so a scrape or a fold may meet an empty
    one: a process that has recorded nothing yet, or was killed before it could (its file then stays empty).
    prometheus_client cannot read such a file, and one would fail every scrape and fold; it holds no count."""
    try:
        return os.path.getsize(path) == 0
    except FileNotFoundError:
        return True


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, and another user's
        pass
    return True


def _write_atomically(path: str, text: str) -> None:
    with open(path + ".tmp", "w") as written:
        written.write(text)
    os.replace(path + ".tmp", path)
