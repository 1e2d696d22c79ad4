"""The id of each API request, so that an operator can find every line it logged from what a client reports.

A client, or the proxy in front, may name its request with `X-Request-ID`; that id is kept when it is a plain
token (at most 128 characters of letters, digits and `._:+/=-`), so that the proxy's log and agentq's share it,
and any other value is replaced, since it is written into log lines and a header. A request without one is
given a new one. It is sent back on every response the application answers, errors included (not on what
gunicorn refuses before the application sees a request: one it cannot parse), stamped on every line logged while
the request is handled (`app.logging_setup.log_as_request`), and written in the access log line.
"""

from __future__ import annotations

import re
import uuid

from flask import Flask, Response, g, request

from app.logging_setup import log_as_request

HEADER = "X-Request-ID"
_PLAIN_TOKEN = re.compile(r"[A-Za-z0-9._:+/=-]{1,128}")


def name_every_request(app: Flask) -> None:
    """Registered before every other hook, so that their lines, and a refusal's, carry the id."""
    app.before_request(_named)
    app.after_request(_sent_back)
    app.teardown_request(_forgotten)


def request_id_of(given: str | None) -> str:
    return given if given is not None and _PLAIN_TOKEN.fullmatch(given) else uuid.uuid4().hex


def _named() -> None:
    g.request_id = request_id_of(request.headers.get(HEADER))
    log_as_request(g.request_id)


def _sent_back(response: Response) -> Response:
    if (request_id := g.get("request_id")) is not None:
        response.headers[HEADER] = request_id
    return response


def _forgotten(_: BaseException | None) -> None:
    log_as_request(None)
