"""Streaming overhead: when a client sees the first `delta` of an answer, against when the upstream sent it.

Each client POSTs a turn and at once follows `GET /api/messages/{id}/stream`. The upstream (the mock,
scripted to wait `ttft` seconds before its first token) logs when each request arrived; the first
token leaves it at arrival + ttft. The overhead is the client's first-delta time minus that moment:
the worker's SDK parsing, the Redis stream, the web process reading it and the SSE write. Queueing
before the upstream call is not in it (the pipeline figures cover that). One clock: same machine.
"""

from __future__ import annotations

import json
import math
import threading
import time
from dataclasses import dataclass, field

import httpx

from bench.deploy import Deployment
from bench.driver import post_turn, run_clients, upstream_arrivals, work_items
from bench.procs import BenchError, percentile


@dataclass
class Streaming:
    turns: int
    clients: int
    upstream_ttft_s: float
    overhead_p50_ms: float
    overhead_p99_ms: float
    overhead_max_ms: float
    post_to_first_delta_p50_ms: float
    overheads_ms: list[float] = field(default_factory=list)


def _first_delta(http: httpx.Client, key: str, message_id: int) -> float:
    """Wall time of the first non-empty delta; reads the stream to `done` so the connection ends cleanly."""
    first = 0.0
    with http.stream("GET", f"/api/messages/{message_id}/stream", headers={"Authorization": f"Bearer {key}"}) as rsp:
        if rsp.status_code != 200:
            raise BenchError(f"stream of {message_id} answered {rsp.status_code}")
        event = "message"
        for line in rsp.iter_lines():
            if line.startswith("event:"):
                event = line[6:].strip()
            elif line.startswith("data:") and event == "delta" and not first:
                if json.loads(line[5:]).get("text"):
                    first = time.time()
            elif line.startswith("data:") and event == "done":
                break
    if not first:
        raise BenchError(f"stream of {message_id} ended without a delta")
    return first


def run(dep: Deployment, turns: int, clients: int, ttft: float) -> Streaming:
    httpx.delete(f"{dep.mock_url}/_requests", timeout=30)
    conversations = dep.conversations("stream", per_user=math.ceil(turns / len(dep.seed.users)) + 1)
    lock = threading.Lock()
    seen: dict[str, tuple[float, float]] = {}

    def one(http: httpx.Client, key: str, conversation: int) -> None:
        tag = f"s{conversation}"
        message_id, sent_at, _ = post_turn(http, key, conversation, tag)
        first = _first_delta(http, key, message_id)
        with lock:
            seen[tag] = (sent_at, first)

    run_clients(dep, work_items(dep, conversations, turns), clients, "sse", one)
    arrived = upstream_arrivals(dep, "s")
    overheads, post_to_first = [], []
    for tag, (sent_at, first) in seen.items():
        if tag not in arrived:
            raise BenchError(f"the upstream has no request for turn {tag}")
        overheads.append((first - (arrived[tag] + ttft)) * 1000)
        post_to_first.append((first - sent_at) * 1000)
    return Streaming(turns=turns, clients=clients, upstream_ttft_s=ttft,
                     overhead_p50_ms=percentile(overheads, 50), overhead_p99_ms=percentile(overheads, 99),
                     overhead_max_ms=max(overheads), post_to_first_delta_p50_ms=percentile(post_to_first, 50),
                     overheads_ms=[round(v, 2) for v in overheads])
