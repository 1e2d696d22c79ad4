"""Prometheus metrics, correct across several gunicorn and worker processes.

Processes write counters and histograms through prometheus_client's multiprocess mode (the
directory in PROMETHEUS_MULTIPROC_DIR, which `agentq web` and `agentq worker` set up); gauges that
describe shared state (turns in flight, queue and dead-letter depth) are read from the database
and the broker when /metrics is scraped, so they are right whichever process answers.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
from collections.abc import Iterable
from decimal import Decimal
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.exposition import ThreadingWSGIServer

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

    from app.attempts import AttemptRecord

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300)

TURNS = Counter("agentq_turns_total", "Turns that reached a terminal status.", ["status"])
ATTEMPTS = Counter("agentq_model_attempts_total", "Upstream model attempts.", ["model", "outcome"])
FALLBACKS = Counter("agentq_fallbacks_total", "Runs that switched to their fallback model.")
LLM_LATENCY = Histogram("agentq_llm_latency_seconds", "Duration of an upstream attempt.", ["model"],
                        buckets=LATENCY_BUCKETS)
COST = Counter("agentq_cost_credits_total",
               "Credits the answered model calls cost: a user turn's charge, or an admin test run's logged cost.",
               ["kind"])
DATABASE_CUT_OFFS = Counter("agentq_worker_database_cut_offs_total",
                            "Times a worker process stopped taking runs because its database was out of reach.")
FIRST_TOKEN = Histogram("agentq_llm_first_token_seconds", "Time to the first token of an attempt.", ["model"],
                        buckets=LATENCY_BUCKETS)
REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
REQUESTS = Counter("agentq_http_requests_total", "API requests answered, by route, method and status.",
                   ["route", "method", "status"])
REQUEST_LATENCY = Histogram("agentq_http_request_seconds",
                            "Time from a request's dispatch to its response's headers, by route and method (a "
                            "streamed body, an answer's SSE stream or a long list, is not counted in it).",
                            ["route", "method"], buckets=REQUEST_BUCKETS)


def host_counters() -> CollectorRegistry:
    """A registry of the counters and histograms every process of this host wrote to PROMETHEUS_MULTIPROC_DIR
    (none when it is not set: a process on its own), for an exposition to add its own collectors to."""
    from app.metrics_files import FoldSafeCollector

    registry = CollectorRegistry()
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        FoldSafeCollector(registry)
    return registry


_counters_server: WSGIServer | None = None


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """A scrape every few seconds is not worth a line on the worker's stderr."""


def _counters_app(registry: CollectorRegistry) -> WSGIApplication:
    """Prometheus's exposition of `registry`, behind the API's /metrics rule (`app.auth.check_metrics_token`)."""
    from prometheus_client import make_wsgi_app

    from app.auth import bearer_token_of, check_metrics_token
    from app.errors import Unauthorized, error_object

    exposition = make_wsgi_app(registry)

    def counters(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        try:
            check_metrics_token(bearer_token_of(environ.get("HTTP_AUTHORIZATION", "")))
        except Unauthorized as refusal:
            body = json.dumps(error_object(refusal.code, refusal.message)).encode()
            start_response("401 Unauthorized", [("Content-Type", "application/json"),
                                                ("Content-Length", str(len(body))), ("WWW-Authenticate", "Bearer")])
            return [body]
        return exposition(environ, start_response)

    return counters


def serve_host_counters(host: str, port: int) -> None:
    """Serve at http://host:port/metrics, from a thread of the calling process, the counters and histograms
    that this host's processes wrote to PROMETHEUS_MULTIPROC_DIR: for workers whose directory no API process
    reads (a container, a dyno or a machine of their own), whose counts the API's `/metrics` cannot show,
    and nearly all counts are made in workers. Not the shared-state gauges: the API's `/metrics` has those,
    the same whichever process answers, and served here too they would be counted twice. It asks for
    `AGENTQ_METRICS_TOKEN` when that is set, as the API's does.

    Its threads block the stop signals, as the worker group's parent blocks them in its main thread while
    it forks: a thread that did not took a SIGTERM meant for the group at those moments, and the stop was
    lost. The processes forked after it close its socket (`close_inherited_counters_server`)."""
    global _counters_server

    class CountersServer(ThreadingWSGIServer):
        address_family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]

    stops = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
    unblocked = signal.pthread_sigmask(signal.SIG_BLOCK, stops)
    try:
        _counters_server = make_server(host, port, _counters_app(host_counters()), CountersServer,
                                       handler_class=_QuietHandler)
        threading.Thread(target=_counters_server.serve_forever, name="counters-server", daemon=True).start()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, unblocked)


def close_inherited_counters_server() -> None:
    """In a process forked from one that serves the counters: its copy of the listening socket, which kept
    the port taken after the server's own process died (a supervisor's restart then could not listen)."""
    if _counters_server is not None:
        _counters_server.socket.close()


def observe_fallback() -> None:
    """Counted when a run's switch is recorded, which it is once (`app.model_calls`): not by a delivery that
    finds the run no longer its own there (the delivery that has it counts its own switch), nor again by
    the delivery that takes over a run whose worker died during the fallback's call, and calls it alone."""
    FALLBACKS.inc()


def observe_attempts(attempts: Iterable[AttemptRecord]) -> None:
    for attempt in attempts:
        ATTEMPTS.labels(attempt.model_name, attempt.outcome).inc()
        LLM_LATENCY.labels(attempt.model_name).observe(attempt.latency_ms / 1000)
        if attempt.first_token_ms is not None:
            FIRST_TOKEN.labels(attempt.model_name).observe(attempt.first_token_ms / 1000)


def observe_request(route: str, method: str, status: int, seconds: float | None) -> None:
    """`route` is the rule a request matched (`/api/messages/<id:message_id>`), never its path, whose ids would
    make a series a message; `seconds` None for a request whose start was not seen."""
    REQUESTS.labels(route, method, str(status)).inc()
    if seconds is not None:
        REQUEST_LATENCY.labels(route, method).observe(seconds)


def observe_terminal(status: str) -> None:
    TURNS.labels(status).inc()


def observe_cost(kind: str, cost: Decimal | None) -> None:
    """`kind` is "turn" (charged, unless the balance held less) or "test_run" (logged, never charged)."""
    if cost:
        COST.labels(kind).inc(float(cost))
