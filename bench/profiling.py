"""`python -m bench.run --profile`: where a turn's CPU goes, and how many round trips it makes.

- py-spy samples every web and worker process during a pipeline run (`--nonblocking`: the processes
  are not paused; `--gil`: only the thread running Python is sampled, CPU rather than waiting); the
  collapsed stacks are summed into the
  functions with the most self time and, for agentq's own code, the most inclusive time.
- Redis commands per turn: `MONITOR` (filtered to the bench's database) during turns run one at a
  time, less the commands of the same processes idling for the same time.
- SQL statements per turn: `pg_stat_statements` for the application's role during the same turns.
These slow the processes down, so their run never feeds the table's figures.
"""

from __future__ import annotations

import collections
import math
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from bench.deploy import Deployment
from bench.driver import TurnWatcher, drive
from bench.procs import ROOT, descendants

_STDLIB_GROUPS = {"threading.py": "threading", "socket.py": "socket", "selectors.py": "socket",
                  "logging/__init__.py": "logging", "json/encoder.py": "json", "json/decoder.py": "json"}

OWN_CODE = re.compile(r"\((app|web|workers)/")  # py-spy shortens paths to the import root


def _py_spy() -> str:
    found = shutil.which("py-spy") or str(Path(__import__("sys").executable).parent / "py-spy")
    return found


def _record(pid: int, out: Path, seconds: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen([_py_spy(), "record", "--pid", str(pid), "--duration", str(seconds), "--rate", "250",
                             "--nonblocking", "--gil", "--format", "raw", "--output", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def summarise(files: list[Path], top: int = 25) -> dict[str, Any]:
    """Self time of any frame, inclusive time of agentq's own frames, as shares of all samples."""
    own: collections.Counter[str] = collections.Counter()
    packages: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for path in files:
        if not path.exists():
            continue
        for line in path.read_text(errors="replace").splitlines():
            stack, _, count_text = line.rpartition(" ")
            if not stack or not count_text.isdigit():
                continue
            count = int(count_text)
            frames = stack.split(";")
            total += count
            own[_short(frames[-1])] += count
            packages[_package(frames[-1])] += count
            for name in {_short(f) for f in frames if OWN_CODE.search(f)}:
                inclusive[name] += count
    share = (lambda n: round(100 * n / total, 1)) if total else (lambda n: 0.0)
    return {
        "samples": total,
        "self_by_package": [(name, share(n)) for name, n in packages.most_common(15)],
        "self_top": [(name, share(n)) for name, n in own.most_common(top)],
        "agentq_inclusive_top": [(name, share(n)) for name, n in inclusive.most_common(top)],
    }


def _package(frame: str) -> str:
    """The top-level package (or stdlib module group) a frame's code belongs to."""
    path = frame.partition(" (")[2].rsplit(":", 1)[0]
    for suffix, group in _STDLIB_GROUPS.items():
        if path.endswith(suffix):
            return group
    return path.split("/", 1)[0] if "/" in path else "stdlib:" + path


def _short(frame: str) -> str:
    """`func (/long/path/site-packages/pkg/mod.py:12)` -> `func (pkg/mod.py)`."""
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    path = where.rsplit(":", 1)[0]
    for marker in ("site-packages/", f"{ROOT}/", "lib/python3.11/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{name} ({path})"


def _monitor(dep: Deployment, out: Path) -> subprocess.Popen[bytes]:
    from urllib.parse import urlparse

    url = urlparse(dep.redis_url)
    with out.open("wb") as sink:
        return subprocess.Popen(["redis-cli", "-h", url.hostname or "127.0.0.1", "-p", str(url.port or 6379),
                                 "monitor"], stdout=sink, stderr=subprocess.DEVNULL)


def _commands(path: Path, db: int) -> collections.Counter[str]:
    counts: collections.Counter[str] = collections.Counter()
    marker = f"[{db} "
    for line in path.read_text(errors="replace").splitlines():
        if marker in line:
            parts = line.split('"')
            if len(parts) > 1:
                counts[parts[1].upper()] += 1
    return counts


def round_trips(dep: Deployment, turns: int) -> dict[str, Any]:
    """Redis commands and SQL statements per turn, turns run one at a time (idle traffic subtracted)."""
    db = int(dep.redis_url.rsplit("/", 1)[1] or 0)
    conversations = dep.conversations("instant", per_user=math.ceil(turns / len(dep.seed.users)) + 1)
    idle_log, busy_log = dep.base / "monitor-idle.txt", dep.base / "monitor-busy.txt"
    monitor = _monitor(dep, idle_log)
    time.sleep(0.5)
    idle_started = time.monotonic()
    time.sleep(5.0)
    idle_span = time.monotonic() - idle_started
    monitor.terminate()
    monitor.wait(10)
    watcher = TurnWatcher(dep)
    monitor = _monitor(dep, busy_log)
    time.sleep(0.5)
    dep.sql("SELECT pg_stat_statements_reset()")
    busy_started = time.monotonic()
    try:
        drive(dep, conversations, turns, 1, wait=watcher)
    finally:
        busy_span = time.monotonic() - busy_started
        monitor.terminate()
        monitor.wait(10)
        watcher.close()
    idle, busy = _commands(idle_log, db), _commands(busy_log, db)
    per_turn = {name: round((busy[name] - idle[name] * busy_span / idle_span) / turns, 2) for name in busy}
    statements = dep.sql(
        "SELECT query, calls FROM pg_stat_statements s JOIN pg_roles r ON r.oid = s.userid "
        "WHERE r.rolname = 'agentq' ORDER BY calls DESC")
    return {
        "turns": turns,
        "redis_commands_per_turn": dict(sorted(per_turn.items(), key=lambda kv: -kv[1])),
        "redis_total_per_turn": round(sum(per_turn.values()), 1),
        "redis_idle_commands_per_second": round(sum(idle.values()) / idle_span, 1),
        "sql_per_turn": [(round(calls / turns, 2), " ".join(q.split())[:200]) for q, calls in statements[:40]],
        "sql_total_per_turn": round(sum(c for _, c in statements) / turns, 1),
    }


class Recorder:
    """py-spy on a set of processes for a fixed time, summarised per kind ("web", "worker") when finished."""

    def __init__(self, out: Path, targets: dict[str, list[int]], seconds: int) -> None:
        out.mkdir(parents=True, exist_ok=True)
        self.seconds = seconds
        self._recorders = [(kind, out / f"{kind}-{pid}.txt", _record(pid, out / f"{kind}-{pid}.txt", seconds))
                           for kind, pids in targets.items() for pid in pids]

    def finish(self) -> dict[str, Any]:
        for _, _, recorder in self._recorders:
            try:
                recorder.wait(timeout=self.seconds + 30)
            except subprocess.TimeoutExpired:
                recorder.kill()
        kinds = {kind for kind, _, _ in self._recorders}
        return {kind: summarise([path for k, path, _ in self._recorders if k == kind]) for kind in sorted(kinds)}


def children(pid: int) -> list[int]:
    return [p for p in descendants(pid) if p != pid]


def run(dep: Deployment, plan: Any) -> dict[str, Any]:
    dep.ensure_worker(plan.worker_processes, plan.worker_threads)
    assert dep.web is not None and dep.worker is not None
    result: dict[str, Any] = {"round_trips": round_trips(dep, 50)}
    turns = plan.pipeline_turns
    conversations = dep.conversations("instant", per_user=math.ceil(turns / len(dep.seed.users)) + 1)
    out = dep.base / "profile"
    recorder = Recorder(out, {"web": children(dep.web.pid), "worker": children(dep.worker.pid)},
                        max(10, int(turns / 25)))
    time.sleep(1.0)
    watcher = TurnWatcher(dep)
    try:
        drive(dep, conversations, turns, plan.pipeline_clients, wait=watcher)
    finally:
        watcher.close()
        result.update(recorder.finish())
    result["stacks_dir"] = str(out)
    return result
