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
from typing import Any

from flask import Flask, Response, request

from app.logging_setup import log_as_request, logged_request_id

HEADER = "X-Request-ID"
_PLAIN_TOKEN = re.compile(r"[A-Za-z0-9._:+/=-]{1,128}")
_SCHEMA = {"type": "string", "pattern": f"^{_PLAIN_TOKEN.pattern}$"}


def name_every_request(app: Flask) -> None:
    """Registered before every other hook, so that their lines, and a refusal's, carry the id."""
    app.before_request(_named)
    app.after_request(_sent_back)
    app.teardown_request(_forgotten)


def request_id_of(given: str | None) -> str:
    return given if given is not None and _PLAIN_TOKEN.fullmatch(given) else uuid.uuid4().hex


def _named() -> None:
    log_as_request(request_id_of(request.headers.get(HEADER)))


def _sent_back(response: Response) -> Response:
    if (request_id := logged_request_id()) is not None:
        response.headers[HEADER] = request_id
    return response


def _forgotten(_: BaseException | None) -> None:
    log_as_request(None)


def document_request_ids(document: dict[str, Any]) -> None:
    """The OpenAPI document says it too, so that a generated client sends and reads the header: an optional
    parameter of every operation, and a header of every response it documents."""
    components = document.setdefault("components", {})
    components.setdefault("parameters", {})[HEADER] = {
        "name": HEADER, "in": "header", "required": False, "schema": _SCHEMA,
        "description": "Names the request in agentq's log lines and the worker's lines of the turn it sends; "
                       "a value of another form is replaced by a new id."}
    components.setdefault("headers", {})[HEADER] = {
        "schema": _SCHEMA, "description": "The request's id: the one sent, or a new one."}
    parameter, header = {"$ref": f"#/components/parameters/{HEADER}"}, {"$ref": f"#/components/headers/{HEADER}"}
    for operations in document.get("paths", {}).values():
        for operation in operations.values():
            if parameter not in (parameters := operation.setdefault("parameters", [])):
                parameters.append(parameter)
            for response in operation.get("responses", {}).values():
                response.setdefault("headers", {})[HEADER] = header
