"""Every request the API answers, counted and timed by the route it matched (`agentq_http_requests_total`,
`agentq_http_request_seconds`): the request rates, error rates and latencies an operator alerts on, which
the API's own /metrics had none of (an access log or a proxy's was the only way to them)."""

from __future__ import annotations

import time

from flask import Flask, Response, g, request

from app.metrics import observe_request

METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
"""The methods counted by name; any other a client sends is `other`, as a path no rule matches is
`unmatched`: a label takes only values the server chose, or a client could make a series a request."""


def count_every_request(app: Flask) -> None:
    app.before_request(_started)
    app.after_request(_counted)


def _started() -> None:
    g.request_started = time.perf_counter()


def _counted(response: Response) -> Response:
    started: float | None = g.get("request_started")
    route = request.url_rule.rule if request.url_rule is not None else "unmatched"
    method = request.method if request.method in METHODS else "other"
    observe_request(route, method, response.status_code,
                    None if started is None else time.perf_counter() - started)
    return response
