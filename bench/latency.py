"""Latency-bound concurrency: the upstream waits before its first token; how close to C turns per
wait do C worker threads get, and what does a turn in flight cost in memory?

The turns are POSTed through the API first (that intake rate is reported, and measured without
workers competing for the CPU), their Dramatiq messages held aside in Redis (the queue's list is
renamed) while `agentq worker` boots, then released at once, with the workers' doorbell rung as a
send does. The measured time runs from the release to the last terminal status in the database, so
worker boot and HTTP intake, which a real deployment does not repeat per wave, are not in it:

    efficiency = (turns / C x upstream wait) / measured time

Resident memory is sampled with the number of turns `processing`; per turn in flight is the
worker tree's RSS at the busiest sample divided by the turns in flight then, and the marginal
figure subtracts the idle RSS of the same processes measured before the release.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from app.queues import TURNS_QUEUE
from bench.deploy import Deployment
from bench.driver import drive, ends, wait_all_terminal
from bench.procs import BenchError, cpu_seconds, percentile, rss_mb, wait_for
from workers.doorbell import Doorbell, channel_name


@dataclass
class LatencyBound:
    upstream_wait_s: float
    turns: int
    processes: int
    threads: int
    concurrency: int
    statuses: dict[str, int]
    measured_s: float
    ideal_s: float
    efficiency: float
    efficiency_from_first_start: float
    peak_in_flight: int
    rss_idle_mb: float
    rss_peak_mb: float
    rss_per_turn_mb: float
    rss_marginal_per_turn_kb: float
    worker_cpu_ms_per_turn: float
    upstream_cpu_ms_per_turn: float
    """The mock upstream's CPU (its HTTP and each stream's chunks): on the same cores, it competes; not counted."""
    intake_posts_per_second: float
    intake_post_p50_ms: float
    intake_post_p99_ms: float
    timeline: list[tuple[float, int, float]] = field(default_factory=list)
    """(seconds since release, turns processing, worker RSS MB) samples."""
    profile: dict[str, Any] | None = None
    """With `--profile`: py-spy of the worker processes from the release on (slows them: a separate run)."""


class _Sampler:
    def __init__(self, dep: Deployment, ids: list[int], root: int, started: float) -> None:
        self.samples: list[tuple[float, int, float]] = []
        self._dep, self._ids, self._root, self._started = dep, ids, root, started
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            processing = self._dep.sql("SELECT count(*) FROM conversation_messages WHERE id = ANY(%s) "
                                       "AND status = 'processing'", (self._ids,))[0][0]
            elapsed = round(time.time() - self._started, 3)
            self.samples.append((elapsed, int(processing), round(rss_mb([self._root]), 1)))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def run(dep: Deployment, agent: str, upstream_wait: float, turns: int, processes: int, threads: int,
        clients: int = 16, profile_dir: Path | None = None) -> LatencyBound:
    dep.stop_worker()
    client = dep.redis()
    queue = f"{dep.namespace}:{TURNS_QUEUE}"
    hold = f"{dep.namespace}:bench-hold"
    if client.llen(queue):
        raise BenchError(f"{client.llen(queue)} messages were left in {queue} before the latency-bound run")
    conversations = dep.conversations(agent, per_user=math.ceil(turns / len(dep.seed.users)) + 1)
    intake = drive(dep, conversations, turns, clients, wait=None)
    wait_for(lambda: cast(int, client.llen(queue)) >= turns, 30, "the turns' messages in the queue")
    client.rename(queue, hold)
    worker = dep.start_worker(processes, threads)
    time.sleep(2.0)
    rss_idle = rss_mb([worker.pid])
    assert dep.mock is not None
    cpu_before, mock_before = cpu_seconds([worker.pid]), cpu_seconds([dep.mock.pid])
    recorder = None
    if profile_dir is not None:
        from bench import profiling

        ideal_seconds = turns / (processes * threads) * upstream_wait
        recorder = profiling.Recorder(profile_dir, {"worker": profiling.children(worker.pid)},
                                      max(5, int(ideal_seconds * 1.5)))
    released = time.time()
    client.rename(hold, queue)
    Doorbell(client, channel_name(dep.namespace)).ring_in(client, TURNS_QUEUE)  # as a send rings once it has queued
    sampler = _Sampler(dep, intake.ids, worker.pid, released)
    try:
        wait_all_terminal(dep, intake.ids, timeout=max(120.0, turns / threads * upstream_wait * 4))
    finally:
        sampler.close()
        profile = recorder.finish() if recorder is not None else None
    worker_cpu = cpu_seconds([worker.pid]) - cpu_before
    mock_cpu = cpu_seconds([dep.mock.pid]) - mock_before
    end = ends(dep, intake.ids)
    concurrency = processes * threads
    measured = float(end["last_end"]) - released  # type: ignore[arg-type]
    from_start = float(end["last_end"]) - float(end["first_start"])  # type: ignore[arg-type]
    ideal = turns / concurrency * upstream_wait
    busiest = max(sampler.samples, key=lambda s: (s[1], s[2]), default=(0.0, 0, rss_idle))
    peak_in_flight, rss_peak = busiest[1], busiest[2]
    return LatencyBound(
        upstream_wait_s=upstream_wait, turns=turns, processes=processes, threads=threads, concurrency=concurrency,
        statuses=end["statuses"],  # type: ignore[arg-type]
        measured_s=measured, ideal_s=ideal, efficiency=ideal / measured, efficiency_from_first_start=ideal / from_start,
        peak_in_flight=peak_in_flight, rss_idle_mb=rss_idle, rss_peak_mb=rss_peak,
        rss_per_turn_mb=rss_peak / peak_in_flight if peak_in_flight else float("nan"),
        rss_marginal_per_turn_kb=(rss_peak - rss_idle) * 1024 / peak_in_flight if peak_in_flight else float("nan"),
        worker_cpu_ms_per_turn=worker_cpu * 1000 / turns, upstream_cpu_ms_per_turn=mock_cpu * 1000 / turns,
        intake_posts_per_second=intake.rate, intake_post_p50_ms=percentile(intake.latencies, 50),
        intake_post_p99_ms=percentile(intake.latencies, 99), timeline=sampler.samples, profile=profile,
    )
