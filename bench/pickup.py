"""Pickup on an idle deployment: how long a lone user's turn waits before a worker calls the model.

One client POSTs a turn, waits for its end, pauses so that the workers are idle again, and repeats.
The time runs from the POST being sent to the upstream receiving the chat request: the API's intake,
the Dramatiq send, a worker noticing the message, the claim and the opening of the upstream call.
An idle worker notices a message through the doorbell (`workers/doorbell.py`); without it, at its
next look at the queue (Dramatiq's backoff, up to a second).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import httpx

from bench.deploy import Deployment
from bench.driver import post_turn, upstream_arrivals, wait_all_terminal, work_items
from bench.procs import BenchError, percentile


@dataclass
class Pickup:
    turns: int
    pause_s: float
    p50_ms: float
    p90_ms: float
    max_ms: float
    waits_ms: list[float] = field(default_factory=list)


def run(dep: Deployment, turns: int, pause: float) -> Pickup:
    httpx.delete(f"{dep.mock_url}/_requests", timeout=30)
    conversations = dep.conversations("instant", per_user=math.ceil(turns / len(dep.seed.users)) + 1)
    sent: dict[str, float] = {}
    with httpx.Client(base_url=dep.web_url, timeout=60) as http:
        for key, conversation in work_items(dep, conversations, turns):
            time.sleep(pause)
            tag = f"p{conversation}"
            message_id, sent[tag], _ = post_turn(http, key, conversation, tag)
            wait_all_terminal(dep, [message_id], timeout=60)
    arrived = upstream_arrivals(dep, "p")
    missing = sent.keys() - arrived.keys()
    if missing:
        raise BenchError(f"the upstream has no request for turns {sorted(missing)}")
    waits = [(arrived[tag] - at) * 1000 for tag, at in sent.items()]
    return Pickup(turns=turns, pause_s=pause, p50_ms=percentile(waits, 50), p90_ms=percentile(waits, 90),
                  max_ms=max(waits), waits_ms=[round(w, 1) for w in waits])
