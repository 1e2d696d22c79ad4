"""The bench's outputs: the table (terminal and README), bench/results.json and bench/results.png."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
README = BENCH_DIR.parent / "README.md"
TABLE_START, TABLE_END = "<!-- bench:table -->", "<!-- /bench:table -->"


def _fmt(value: float, digits: int = 2) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("met" if ok else "**not met**")


def rows(results: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(figure, value, target, verdict) for the table."""
    out: list[tuple[str, str, str, str]] = []
    floor = results.get("floor", {})
    pipe = results.get("pipeline")
    targets = results.get("targets", {})
    if floor:
        out.append(("floor (a): no-op Dramatiq message, enqueue + worker CPU",
                    f"{_fmt(floor['dramatiq']['per_message_cpu_ms'])} ms", "", ""))
        out.append(("floor (b): openai SDK typed streamed completion, client CPU",
                    f"{_fmt(floor['sdk']['per_completion_cpu_ms'])} ms", "", ""))
        out.append(("floor = (a) + (b)", f"{_fmt(floor['per_turn_cpu_ms'])} ms", "", ""))
        if "sdk_as_agentq" in floor:
            out.append(("floor (b'): the same completion as agentq opens it (SDK client.post, JSON chunks)",
                        f"{_fmt(floor['sdk_as_agentq']['per_completion_cpu_ms'])} ms", "", ""))
            out.append(("floor' = (a) + (b')", f"{_fmt(floor['per_turn_cpu_ms_as_agentq'])} ms", "", ""))
    if pipe:
        out.append(("pipeline: CPU per turn, web + workers",
                    f"{_fmt(pipe['cpu_ms'])} ms (web {_fmt(pipe['web_cpu_ms'])}, "
                    f"workers {_fmt(pipe['worker_cpu_ms'])})",
                    "<= 2x floor", _verdict(targets.get("cpu_per_turn"))))
        out.append(("pipeline: CPU per turn / floor", f"{_fmt(results.get('cpu_ratio', float('nan')))}x", "<= 2",
                     _verdict(targets.get("cpu_per_turn"))))
        if "cpu_ratio_as_agentq" in results:
            out.append(("pipeline: CPU per turn / floor'", f"{_fmt(results['cpu_ratio_as_agentq'])}x", "(<= 2)",
                        _verdict(targets.get("cpu_per_turn_as_agentq"))))
        out.append(("pipeline: turns per second", _fmt(pipe["turns_per_second"], 1), "", ""))
        out.append(("pipeline: POST latency p50 / p99 (saturated: 100 % CPU)",
                    f"{_fmt(pipe['post_p50_ms'], 1)} / {_fmt(pipe['post_p99_ms'], 1)} ms", "p99 <= 25 ms",
                    _verdict(targets.get("post_p99"))))
        load = results.get("steady")
        if load:
            out.append((f"pipeline: POST latency p50 / p99 at {load['share_of_capacity']:.0%} of that throughput "
                        f"({_fmt(load['rate_per_second'], 1)} turns/s, open loop)",
                        f"{_fmt(load['post_p50_ms'], 1)} / {_fmt(load['post_p99_ms'], 1)} ms", "p99 <= 25 ms",
                        _verdict(targets.get("post_p99_steady"))))
        out.append(("pipeline: SQL statements / transactions / new DB connections per turn",
                    f"{_fmt(pipe['statements_per_turn'], 1)} / {_fmt(pipe['transactions_per_turn'], 1)} / "
                    f"{_fmt(pipe['db_connections_per_turn'])}", "", ""))
    for run in results.get("latency_bound", []):
        label = (f"latency-bound, {run['upstream_wait_s']:g} s wait, C={run['concurrency']} "
                 f"({run['processes']}x{run['threads']}), {run['turns']} turns")
        target = ">= 0.9" if run["concurrency"] >= 200 and run["upstream_wait_s"] == 1.0 else ""
        verdict = _verdict(targets.get("efficiency")) if target else ""
        value = f"{_fmt(run['efficiency'])} (from first start {_fmt(run['efficiency_from_first_start'])})"
        out.append((f"{label}: efficiency", value, target, verdict))
        out.append((f"{label}: CPU per turn, workers / mock upstream",
                    f"{_fmt(run['worker_cpu_ms_per_turn'])} / {_fmt(run['upstream_cpu_ms_per_turn'])} ms", "", ""))
        out.append((f"{label}: peak in flight, RSS per turn in flight",
                    f"{run['peak_in_flight']}, {_fmt(run['rss_per_turn_mb'])} MB "
                    f"(marginal {_fmt(run['rss_marginal_per_turn_kb'], 0)} KB)", "", ""))
    stream = results.get("streaming")
    if stream:
        out.append(("streaming overhead p50 / p99",
                    f"{_fmt(stream['overhead_p50_ms'], 1)} / {_fmt(stream['overhead_p99_ms'], 1)} ms", "p50 <= 10 ms",
                    _verdict(targets.get("streaming_p50"))))
    idle = results.get("pickup")
    if idle:
        out.append((f"pickup on an idle deployment, one user, turns {idle['pause_s']:g} s apart: "
                    "POST sent to upstream request p50 / p90",
                    f"{_fmt(idle['p50_ms'], 1)} / {_fmt(idle['p90_ms'], 1)} ms", "", ""))
    return out


def markdown_table(results: dict[str, Any]) -> str:
    lines = ["| figure | value | target | |", "| --- | --- | --- | --- |"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows(results)]
    machine = results.get("machine", {})
    lines.append("")
    lines.append(f"Measured {machine.get('date', '?')} on {machine.get('cpus', '?')} CPUs (load average before "
                 f"the run {machine.get('load_before', '?')}), commit {machine.get('commit', '?')}.")
    return "\n".join(lines)


def print_table(results: dict[str, Any]) -> None:
    table = rows(results)
    width = max(len(r[0]) for r in table) if table else 10
    vwidth = max(len(r[1]) for r in table) if table else 10
    for figure, value, target, verdict in table:
        print(f"  {figure:<{width}}  {value:<{vwidth}}  {target:<13} {verdict.replace('**', '')}")


def write_json(results: dict[str, Any], path: Path = BENCH_DIR / "results.json") -> None:
    path.write_text(json.dumps(results, indent=2, sort_keys=False, default=str) + "\n")


def update_readme(results: dict[str, Any]) -> bool:
    """Replace the table between the bench markers in README.md; nothing else is touched."""
    if not README.exists():
        return False
    text = README.read_text()
    if TABLE_START not in text or TABLE_END not in text:
        return False
    block = f"{TABLE_START}\n{markdown_table(results)}\n{TABLE_END}"
    README.write_text(re.sub(re.escape(TABLE_START) + r".*?" + re.escape(TABLE_END), lambda _: block, text,
                             flags=re.S))
    return True


def chart(results: dict[str, Any], raw: dict[str, list[float]], path: Path = BENCH_DIR / "results.png") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    floor, pipe = results.get("floor"), results.get("pipeline")

    ax = axes[0][0]
    if floor and pipe:
        a, b = floor["dramatiq"]["per_message_cpu_ms"], floor["sdk"]["per_completion_cpu_ms"]
        ax.bar(["floor"], [a], color="#8da0cb", label="(a) Dramatiq no-op")
        ax.bar(["floor"], [b], bottom=[a], color="#66c2a5", label="(b) openai SDK typed stream")
        if "sdk_as_agentq" in floor:
            ax.bar(["floor'"], [a], color="#8da0cb")
            ax.bar(["floor'"], [floor["sdk_as_agentq"]["per_completion_cpu_ms"]], bottom=[a], color="#a6d854",
                   label="(b') the SDK call agentq makes")
        ax.bar(["pipeline"], [pipe["worker_cpu_ms"]], color="#fc8d62", label="workers")
        ax.bar(["pipeline"], [pipe["web_cpu_ms"]], bottom=[pipe["worker_cpu_ms"]], color="#e78ac3", label="web")
        ax.axhline(2 * (a + b), color="black", linestyle="--", linewidth=1, label="target: 2x floor")
        ax.legend(fontsize=8)
    ax.set_title("CPU per turn (ms)", fontsize=10)

    ax = axes[0][1]
    for name, label, color in (("post_latencies_ms", "saturated", "#fc8d62"),
                               ("steady_latencies_ms", "steady load", "#66c2a5")):
        latencies = sorted(raw.get(name, []))
        if latencies:
            ax.plot(latencies, [(i + 1) / len(latencies) for i in range(len(latencies))], color=color, label=label)
    if raw.get("post_latencies_ms"):
        ax.axvline(25, color="black", linestyle="--", linewidth=1, label="target p99: 25 ms")
        ax.axhline(0.99, color="grey", linestyle=":", linewidth=1)
        ax.set_xscale("log")
        ax.legend(fontsize=8)
    ax.set_title("POST latency in the pipeline run (CDF)", fontsize=10)
    ax.set_xlabel("ms")

    ax = axes[1][0]
    for run in results.get("latency_bound", []):
        timeline = run.get("timeline") or []
        if timeline:
            ax.plot([t for t, _, _ in timeline], [n for _, n, _ in timeline],
                    label=f"C={run['concurrency']}, {run['upstream_wait_s']:g} s: efficiency {run['efficiency']:.2f}")
            ax.axhline(run["concurrency"], linestyle=":", linewidth=1, color="grey")
    ax.set_title("latency-bound: turns processing", fontsize=10)
    ax.set_xlabel("seconds since the turns were released")
    ax.legend(fontsize=8)

    ax = axes[1][1]
    overheads = raw.get("overheads_ms", [])
    if overheads:
        ax.hist(overheads, bins=40, color="#66c2a5")
        ax.axvline(10, color="black", linestyle="--", linewidth=1, label="target p50: 10 ms")
        ax.legend(fontsize=8)
    ax.set_title("streaming overhead (client 1st delta - upstream 1st token)", fontsize=10)
    ax.set_xlabel("ms")

    fig.tight_layout()
    fig.savefig(path, dpi=72)
    plt.close(fig)
