"""The floor: the least a turn can cost with agentq's parts, measured on the same machine in the same run.

(a) A no-op Dramatiq actor on the same Redis, broker set-up, processes and threads: CPU of the
    worker processes per message plus the CPU of enqueueing it.
(b) One streamed chat completion through the openai SDK, configured as agentq configures it,
    against the mock upstream answering at once with the same prompt a bench turn sends: the
    client's CPU only (the mock upstream's CPU is left out, here and in the pipeline figure).
    The issue's floor is the SDK's typed stream (`client.chat.completions.create(stream=True)`,
    a `ChatCompletionChunk` model per chunk); agentq opens the same request through the SDK's
    `client.post` and reads plain JSON chunks (`app.llm_client.open_chat_stream`), which is
    measured alongside as (b'), so the ratio can be read against either.

`python -m bench.floor enqueue N` and `python -m bench.floor sdk ...` are the measuring children;
each prints one JSON line with the CPU of its measured loop alone (imports and set-up excluded).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass

from bench.deploy import SYSTEM_PROMPT, Deployment, turn_content
from bench.procs import Proc, cpu_seconds, wait_for

NOOP_QUEUE = "bench_noop"  # bench.noop_actor.QUEUE; importing that module builds and installs a broker


@dataclass
class DramatiqFloor:
    messages: int
    processes: int
    threads: int
    enqueue_cpu_ms: float
    worker_cpu_ms: float
    per_message_cpu_ms: float
    messages_per_second: float


@dataclass
class SdkFloor:
    call: str
    """"typed" (chat.completions.create) or "agentq" (app.llm_client.open_chat_stream)."""
    completions: int
    threads: int
    deltas_per_completion: float
    per_completion_cpu_ms: float
    completions_per_second: float


def _child(args: list[str], dep: Deployment, timeout: float) -> dict[str, float]:
    result = subprocess.run([sys.executable, "-m", "bench.floor", *args], env=dep.env(), cwd=dep.base,
                            capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(f"bench.floor {args[0]} failed: {result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def measure_dramatiq(dep: Deployment, processes: int, threads: int, messages: int) -> DramatiqFloor:
    env = dep.env(dramatiq_queue_prefetch=str(threads))
    worker = Proc("floor-dramatiq", [sys.executable, "-m", "dramatiq", "bench.noop_actor", "--processes",
                                     str(processes), "--threads", str(threads)], env, dep.log_dir, dep.base)
    try:
        def ready() -> bool:
            worker.check_alive()
            return worker.output().count("Worker process is ready") >= processes

        wait_for(ready, 120, "the no-op Dramatiq worker to boot", interval=0.1)
        time.sleep(1.0)
        client = dep.redis()
        queue_key = f"{dep.namespace}:{NOOP_QUEUE}"
        before = cpu_seconds([worker.pid])
        started = time.monotonic()
        enqueued = _child(["enqueue", str(messages)], dep, timeout=300)
        wait_for(lambda: client.llen(queue_key) == 0 and client.hlen(f"{queue_key}.msgs") == 0, 300,
                 "the no-op messages to be processed", interval=0.02)
        elapsed = time.monotonic() - started - enqueued["startup"]
        worker_cpu = cpu_seconds([worker.pid]) - before
    finally:
        worker.stop(grace=30)
    return DramatiqFloor(
        messages=messages, processes=processes, threads=threads,
        enqueue_cpu_ms=enqueued["cpu"] * 1000 / messages, worker_cpu_ms=worker_cpu * 1000 / messages,
        per_message_cpu_ms=(enqueued["cpu"] + worker_cpu) * 1000 / messages,
        messages_per_second=messages / max(elapsed, 1e-9),
    )


def measure_sdk(dep: Deployment, completions: int, threads: int, call: str = "typed") -> SdkFloor:
    result = _child(["sdk", "--base-url", f"{dep.mock_url}/v1", "--model", "echo", "-n", str(completions),
                     "--threads", str(threads), "--call", call], dep, timeout=600)
    return SdkFloor(call=call, completions=completions, threads=threads, deltas_per_completion=result["deltas"],
                    per_completion_cpu_ms=result["cpu"] * 1000 / completions,
                    completions_per_second=completions / result["wall"])


# -- the measuring children ---------------------------------------------------------------------------------------


def _enqueue(messages: int) -> dict[str, float]:
    started_at = time.monotonic()
    from bench.noop_actor import broker, enqueue

    broker.client.ping()
    startup = time.monotonic() - started_at
    cpu = time.process_time()
    for ident in range(messages):
        enqueue(ident)
    return {"cpu": time.process_time() - cpu, "startup": startup}


def _sdk(base_url: str, model: str, completions: int, threads: int, call: str) -> dict[str, float]:
    from decimal import Decimal

    import openai

    from app.chat_chunks import read_chunk
    from app.llm_client import open_chat_stream
    from app.model_target import ModelTarget
    from app.upstream_clients import client_for

    client = client_for(ModelTarget(0, "floor", model, base_url, None, Decimal(0), Decimal(0), None))
    deltas = [0]
    lock = threading.Lock()
    timeout = openai.Timeout(60, connect=10)

    def typed(messages: list[dict[str, str]]) -> int:
        stream = client.chat.completions.create(model=model, messages=messages, stream=True,  # type: ignore[call-overload]
                                                stream_options={"include_usage": True}, timeout=timeout)
        with stream:
            return sum(1 for chunk in stream for choice in chunk.choices if choice.delta and choice.delta.content)

    def as_agentq(messages: list[dict[str, str]]) -> int:
        body = {"model": model, "messages": messages, "stream": True, "stream_options": {"include_usage": True}}
        with open_chat_stream(client, body, timeout) as stream:
            return sum(len(read_chunk(chunk)[0]) for chunk in stream)

    read = typed if call == "typed" else as_agentq

    def one(index: int) -> None:
        messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": turn_content(str(index))}]
        count = read(messages)
        with lock:
            deltas[0] += count

    one(-1)  # the first call opens the pool's connection; not part of the steady state
    deltas[0] = 0
    counter = iter(range(completions))
    counter_lock = threading.Lock()

    def loop() -> None:
        while True:
            with counter_lock:
                index = next(counter, None)
            if index is None:
                return
            one(index)

    cpu, wall = time.process_time(), time.monotonic()
    workers = [threading.Thread(target=loop) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return {"cpu": time.process_time() - cpu, "wall": time.monotonic() - wall, "deltas": deltas[0] / completions}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="what", required=True)
    enqueue = sub.add_parser("enqueue")
    enqueue.add_argument("messages", type=int)
    sdk = sub.add_parser("sdk")
    sdk.add_argument("--base-url", required=True)
    sdk.add_argument("--model", default="echo")
    sdk.add_argument("-n", type=int, default=500)
    sdk.add_argument("--threads", type=int, default=4)
    sdk.add_argument("--call", choices=("typed", "agentq"), default="typed")
    args = parser.parse_args(argv)
    if args.what == "enqueue":
        result = _enqueue(args.messages)
    else:
        result = _sdk(args.base_url, args.model, args.n, args.threads, args.call)
    print(json.dumps(result))


__all__ = ["DramatiqFloor", "SdkFloor", "asdict", "measure_dramatiq", "measure_sdk"]

if __name__ == "__main__":
    main()
