"""POST latency at a steady load below capacity: what a client sees on a deployment that is not saturated.

The pipeline run is a closed loop that keeps the machine at 100 % CPU, where every request queues
behind every other process for a core; no deployment is run like that. Here turns arrive open
loop, at Poisson times (fixed seed) whose mean rate is a share of the throughput the pipeline run
measured on the same deployment, each on a fresh conversation, and the bench never waits for them
between POSTs. A POST's latency is timed from its scheduled moment, so a sender that fell behind
(coordinated omission) counts against the figure, not for it.

The requests come from one asyncio loop (aiohttp), not from threads: a thread-per-client driver
spends a millisecond or two of Python per request and its threads wait for the GIL before they
can read the clock, which a latency figure would then count as the server's.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from dataclasses import dataclass, field

import aiohttp

from bench.deploy import Deployment, turn_content
from bench.driver import ends, wait_all_terminal, work_items
from bench.procs import BenchError, percentile


@dataclass
class SteadyLoad:
    turns: int
    share_of_capacity: float
    rate_per_second: float
    statuses: dict[str, int]
    post_p50_ms: float
    post_p99_ms: float
    post_max_ms: float
    post_latencies_ms: list[float] = field(default_factory=list)


async def _post_all(base_url: str, work: list[tuple[str, int]], moments: list[float]) -> list[tuple[int, float]]:
    """POST each turn at its moment; returns (assistant message id, latency ms from the moment) in order."""
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(base_url, connector=connector) as http:

        async def one(index: int) -> tuple[int, float]:
            await asyncio.sleep(max(0.0, moments[index] - time.monotonic()))
            key, conversation = work[index]
            async with http.post(f"/api/conversations/{conversation}/messages",
                                 json={"content": turn_content(f"s{conversation}")},
                                 headers={"Authorization": f"Bearer {key}"}) as response:
                body = await response.json()
                done = time.monotonic()
                if response.status != 202:
                    raise BenchError(f"POST messages answered {response.status}: {body}")
            return body["assistant_message"]["id"], (done - moments[index]) * 1000

        return await asyncio.gather(*(one(i) for i in range(len(work))))


def run(dep: Deployment, turns: int, capacity_per_second: float, share: float) -> SteadyLoad:
    rate = capacity_per_second * share
    conversations = dep.conversations("instant", per_user=math.ceil(turns / len(dep.seed.users)) + 1)
    work = list(work_items(dep, conversations, turns))
    arrivals = random.Random(7)
    at = time.monotonic() + 0.5
    moments = []
    for _ in range(turns):
        at += arrivals.expovariate(rate)
        moments.append(at)
    posted = asyncio.run(_post_all(dep.web_url, work, moments))
    ids = [message_id for message_id, _ in posted]
    latencies = [latency for _, latency in posted]
    wait_all_terminal(dep, ids, timeout=120)
    return SteadyLoad(turns=turns, share_of_capacity=share, rate_per_second=rate,
                      statuses=ends(dep, ids)["statuses"],  # type: ignore[arg-type]
                      post_p50_ms=percentile(latencies, 50), post_p99_ms=percentile(latencies, 99),
                      post_max_ms=max(latencies), post_latencies_ms=[round(v, 2) for v in latencies])
