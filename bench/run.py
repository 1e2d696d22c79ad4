"""`python -m bench.run` (`make bench`): start a throwaway deployment, measure, report.

Phases, in this order, on one deployment:
1. floor (a) no-op Dramatiq actor, (b) openai SDK stream against the instant upstream;
2. pipeline: full turns through the API against the instant upstream (closed loop, saturating),
   then POST latency at a steady 75 % of the throughput it measured (open loop);
3. streaming overhead: first SSE delta seen by a client vs the upstream's first token;
4. pickup on an idle deployment: a lone user's turn, POST sent to the upstream's request;
5. latency-bound: upstream waits 1 s before its first token, C = 200 (2 x 100 threads) -- the target;
6. the same C = 200 with a 10 s wait, where this 2-core machine's CPU is not the limit;
7. C = 1000 (2 x 500 threads), 20 s wait: the measured way to hold 1,000 turns in flight here.
`--profile` adds py-spy profiles of the web and worker processes during a second pipeline run and
of the workers during a second 1 s latency-bound run, and counts Redis commands per turn with
MONITOR (all of them slow the run down, so they never feed the table).
Everything started is stopped on exit, error or Ctrl-C.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench import floor, latency, pickup, pipeline, report, steady, streaming
from bench.deploy import Deployment
from bench.procs import ROOT, BenchError, stop_all


@dataclasses.dataclass(frozen=True)
class Plan:
    users: int = 100
    worker_processes: int = 2
    worker_threads: int = 16
    noop_messages: int = 3000
    sdk_completions: int = 1000
    sdk_threads: int = 4
    pipeline_turns: int = 1000
    pipeline_clients: int = 8
    steady_turns: int = 1000
    steady_share: float = 0.75
    stream_turns: int = 200
    stream_clients: int = 4
    stream_ttft: float = 0.25
    pickup_turns: int = 20
    pickup_pause: float = 1.0
    bound_turns: int = 1000
    bound_threads: int = 100
    slow_turns: int = 400
    hold_turns: int = 1000
    hold_threads: int = 500

    def scaled(self, factor: float) -> Plan:
        counts = ("noop_messages", "sdk_completions", "pipeline_turns", "steady_turns", "stream_turns", "pickup_turns",
                  "bound_turns", "slow_turns", "hold_turns")
        return dataclasses.replace(self, **{name: max(20, int(getattr(self, name) * factor)) for name in counts})


def _machine() -> dict[str, Any]:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "app", "web", "workers"], cwd=ROOT,
                           capture_output=True, text=True)
    return {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpus": os.cpu_count(),
        "load_before": " ".join(f"{v:.2f}" for v in os.getloadavg()),
        "python": sys.version.split()[0],
        "commit": (commit.stdout.strip() or "?") + ("+changes" if dirty.stdout.strip() else ""),
    }


def _phase(name: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {name}", flush=True)


def _public(obj: Any, drop: tuple[str, ...] = ()) -> dict[str, Any]:
    data = dataclasses.asdict(obj)
    for key in drop:
        data.pop(key, None)
    return data


def measure(dep: Deployment, plan: Plan, phases: set[str], profile: bool) -> tuple[dict[str, Any], dict[str, list]]:
    results: dict[str, Any] = {"machine": _machine(), "plan": dataclasses.asdict(plan),
                               "notes": {
                                   "cpu": "user+system CPU from /proc of the process trees; the mock upstream, "
                                          "PostgreSQL and Redis are excluded from the pipeline and floor figures",
                                   "postgres": "throwaway cluster with fsync=off and full_page_writes=off",
                                   "floor_b": "client side of the openai SDK only, not the mock upstream",
                               }}
    raw: dict[str, list] = {}
    dep.seed_world(plan.users)
    if "floor" in phases:
        _phase("floor (a): no-op Dramatiq actor")
        a = floor.measure_dramatiq(dep, plan.worker_processes, plan.worker_threads, plan.noop_messages)
        _phase("floor (b): openai SDK typed stream against the instant upstream")
        b = floor.measure_sdk(dep, plan.sdk_completions, plan.sdk_threads, call="typed")
        _phase("floor (b'): the same completion as agentq opens it through the SDK")
        b_agentq = floor.measure_sdk(dep, plan.sdk_completions, plan.sdk_threads, call="agentq")
        results["floor"] = {"dramatiq": _public(a), "sdk": _public(b), "sdk_as_agentq": _public(b_agentq),
                            "per_turn_cpu_ms": a.per_message_cpu_ms + b.per_completion_cpu_ms,
                            "per_turn_cpu_ms_as_agentq": a.per_message_cpu_ms + b_agentq.per_completion_cpu_ms}
    if "pipeline" in phases:
        _phase(f"pipeline: {plan.pipeline_turns} turns, {plan.pipeline_clients} clients")
        pipe = pipeline.run(dep, plan.pipeline_turns, plan.pipeline_clients, plan.worker_processes,
                            plan.worker_threads)
        results["pipeline"] = _public(pipe, drop=("post_latencies_ms",))
        raw["post_latencies_ms"] = pipe.post_latencies_ms
        if "floor" in results:
            results["cpu_ratio"] = pipe.cpu_ms / results["floor"]["per_turn_cpu_ms"]
            results["cpu_ratio_as_agentq"] = pipe.cpu_ms / results["floor"]["per_turn_cpu_ms_as_agentq"]
        _phase(f"steady load: {plan.steady_turns} turns at {plan.steady_share:.0%} of "
               f"{pipe.turns_per_second:.1f} turns/s, open loop")
        load = steady.run(dep, plan.steady_turns, pipe.turns_per_second, plan.steady_share)
        results["steady"] = _public(load, drop=("post_latencies_ms",))
        raw["steady_latencies_ms"] = load.post_latencies_ms
    if "streaming" in phases:
        _phase(f"streaming overhead: {plan.stream_turns} turns, {plan.stream_clients} SSE clients")
        dep.ensure_worker(plan.worker_processes, plan.worker_threads)
        stream = streaming.run(dep, plan.stream_turns, plan.stream_clients, plan.stream_ttft)
        results["streaming"] = _public(stream, drop=("overheads_ms",))
        raw["overheads_ms"] = stream.overheads_ms
    if "pickup" in phases:
        _phase(f"pickup on an idle deployment: {plan.pickup_turns} turns of one user, {plan.pickup_pause:g} s apart")
        dep.ensure_worker(plan.worker_processes, plan.worker_threads)
        idle = pickup.run(dep, plan.pickup_turns, plan.pickup_pause)
        results["pickup"] = _public(idle)
    if profile and "pipeline" in phases:
        from bench import profiling

        _phase("profile: py-spy on web and workers, Redis MONITOR, during a second pipeline run")
        results["profile"] = profiling.run(dep, plan)
    runs = []
    for phase, agent, wait, turns, threads in (("latency", "slow", 1.0, plan.bound_turns, plan.bound_threads),
                                               ("latency10", "slow10", 10.0, plan.slow_turns, plan.bound_threads),
                                               ("hold", "slow20", 20.0, plan.hold_turns, plan.hold_threads)):
        if phase in phases:
            _phase(f"latency-bound: {turns} turns, C={plan.worker_processes * threads}, upstream waits {wait:g} s")
            runs.append(latency.run(dep, agent, wait, turns, plan.worker_processes, threads))
            if profile and phase == "latency":
                _phase("profile: py-spy on the workers during a second latency-bound run")
                results.setdefault("profile", {})["latency_bound"] = latency.run(
                    dep, agent, wait, turns, plan.worker_processes, threads,
                    profile_dir=dep.base / "profile-latency").profile
    if runs:
        results["latency_bound"] = [_public(r, drop=("profile",)) for r in runs]
    results["targets"] = _targets(results)
    return results, raw


def _targets(results: dict[str, Any]) -> dict[str, bool | None]:
    pipe, stream = results.get("pipeline"), results.get("streaming")
    bound = [r for r in results.get("latency_bound", []) if r["concurrency"] >= 200 and r["upstream_wait_s"] == 1.0]
    return {
        "cpu_per_turn": results["cpu_ratio"] <= 2.0 if "cpu_ratio" in results else None,
        "cpu_per_turn_as_agentq": results["cpu_ratio_as_agentq"] <= 2.0 if "cpu_ratio_as_agentq" in results else None,
        "post_p99": pipe["post_p99_ms"] <= 25.0 if pipe else None,
        "post_p99_steady": results["steady"]["post_p99_ms"] <= 25.0 if "steady" in results else None,
        "efficiency": (bound[0]["efficiency"] >= 0.9 and bound[0]["peak_in_flight"] >= 200) if bound else None,
        "streaming_p50": stream["overhead_p50_ms"] <= 10.0 if stream else None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a fifth of the turns: a smoke test, not figures")
    parser.add_argument("--phases", default="floor,pipeline,streaming,pickup,latency,latency10,hold",
                        help="comma-separated subset of floor,pipeline,streaming,pickup,latency,latency10,hold")
    parser.add_argument("--profile", action="store_true",
                        help="also profile the pipeline (py-spy, MONITOR) and the 1 s latency-bound run")
    parser.add_argument("--keep", action="store_true", help="keep the temp directory (logs, data) afterwards")
    parser.add_argument("--no-write", action="store_true", help="print the table only; write no files")
    parser.add_argument("--json", type=Path, help="also write the results (with timelines) to this file")
    args = parser.parse_args(argv)
    plan = Plan().scaled(0.2) if args.quick else Plan()
    phases = {p.strip() for p in args.phases.split(",") if p.strip()}

    def on_signal(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)
    started = time.monotonic()
    dep = Deployment(keep=args.keep)
    print(f"[bench] deployment in {dep.base} (PostgreSQL port {dep.pg.port}, {dep.redis_url}, "
          f"namespace {dep.namespace})", flush=True)
    try:
        dep.start()
        results, raw = measure(dep, plan, phases, args.profile)
    except BenchError as exc:
        print(f"[bench] failed: {exc}\n[bench] logs: {dep.log_dir}"
              + ("" if args.keep else " (removed; rerun with --keep to keep them)"), file=sys.stderr)
        return 1
    finally:
        dep.close()
        stop_all()
    results["duration_s"] = round(time.monotonic() - started, 1)
    print()
    report.print_table(results)
    if "profile" in results:
        import json

        print("\n[bench] profile:\n" + json.dumps(results["profile"], indent=1, ensure_ascii=False))
    if args.json is not None:
        report.write_json(results, args.json)
    if not args.no_write:
        report.write_json(results)
        report.chart(results, raw)
        updated = report.update_readme(results)
        print(f"\n[bench] wrote bench/results.json, bench/results.png{', README.md table' if updated else ''} "
              f"in {results['duration_s']:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
