"""Every error the API returns, in the contract's shape: `{"error": {"code", "message"}}`.

Domain errors carry their own status and code; request parsing maps to 400 (the body is not a
JSON object: `web.bodies`) or 422 (a field fails validation); an unexpected exception is logged with
its traceback and answered 500 without details, which a test treats as a bug.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import sqlalchemy.exc
from flask import Flask, Response, current_app, jsonify, request
from gunicorn.http import errors as http_errors
from pydantic import ValidationError
from werkzeug.exceptions import HTTPException, NotFound
from werkzeug.routing import Map, UnicodeConverter
from werkzeug.wrappers import Response as WerkzeugResponse

from app.errors import AgentqError, InvalidConfiguration, error_object
from app.outages import REDIS_UNAVAILABLE, in_one_line, is_outage
from app.setup_problems import SetupProblem, setup_problem
from web.schemas import LARGEST_PATH_ID

log = logging.getLogger(__name__)

_BODY_SHAPE_ERRORS = frozenset({"model_type", "json_invalid", "dict_type", "model_attributes_type"})


def error_response(status: int, code: str, message: str) -> Response:
    response = jsonify(error_object(code, message))
    response.status_code = status
    return response


def on_validation_error(exc: ValidationError) -> Response:
    errors = exc.errors(include_url=False, include_input=False, include_context=False)
    first = errors[0] if errors else {"loc": (), "type": "model_type", "msg": "invalid"}
    if not first["loc"] and first["type"] in _BODY_SHAPE_ERRORS:
        return error_response(400, "malformed_body", "The request body must be a JSON object.")
    # pydantic prefixes the words of a validator's own ValueError with its exception's name, which is no
    # sentence of the API's (as `app.config` says of a setting)
    said = str(first["msg"]).removeprefix("Value error, ")
    if not first["loc"]:  # a rule across fields (a PATCH setting a required one to null)
        return error_response(422, "validation_failed", f"Invalid request body: {said}.")
    where = ".".join(str(part) for part in first["loc"])
    return error_response(422, "validation_failed", f"Invalid value for '{where}': {said}.")


_SETUP_ANSWERS: dict[str, tuple[str, str]] = {
    "service_unavailable": ("service_unavailable", "The service is not set up yet: its database has no schema. The "
                                                   "operator must run `agentq db init`."),
    "schema_incomplete": ("service_unavailable", "The service's database predates this release. The operator must "
                                                 "run `agentq db init` to upgrade it."),
    "invalid_configuration": ("invalid_configuration", "The service is not configured to serve; its operators are "
                                                       "told why in its log."),
}
"""What a caller is told of each setup step the operator must take (`app.setup_problems.SetupProblem.code`): that
there is one, and whose it is. What exactly, which may name a server path or a role, goes to the log."""


def _setup_step_response(problem: SetupProblem, error: BaseException) -> Response:
    """A setup step no retry takes (no schema, a column of this release missing, a database refusing DATABASE_URL's
    role): 503 saying so, not "retry shortly" nor a 500; the API serves once it is taken, without a restart."""
    said = error.message if isinstance(error, AgentqError) else f"{problem.step}. {in_one_line(error)}"
    log.error("the service cannot serve: %s (%s %s)", said, request.method, request.path)
    code, message = _SETUP_ANSWERS[problem.code]
    return error_response(503, code, message)


def _unreadable(exc: http_errors.ParseException) -> Response:
    """A body gunicorn cannot read (a chunk whose size or end is malformed) is the client's malformed
    request, as its own refusals of a request line or headers are (`web.server`), never a 500."""
    return error_response(400, "malformed_request", f"The HTTP request body could not be read: {exc}.")


def _misconfigured(exc: InvalidConfiguration) -> Response:
    """What is wrong (a server path, a setting) is the operator's to read in the log, not a caller's."""
    return _setup_step_response(SetupProblem(exc.code, exc.message, exc.message), exc)


def _domain(exc: AgentqError) -> Response:
    if (problem := setup_problem(exc)) is not None:  # a SQLite file not made, or awaiting its upgrade
        return _setup_step_response(problem, exc)
    response = error_response(exc.status, exc.code, exc.message)
    if exc.retry_after is not None:
        response.headers["Retry-After"] = str(exc.retry_after)
    if exc.status == 401:
        response.headers["WWW-Authenticate"] = "Bearer"  # RFC 6750: which credentials the route takes
    return response


def _http(exc: HTTPException) -> WerkzeugResponse:
    if exc.code is None:
        return exc.get_response()
    if exc.code == 413:
        return error_response(413, "content_too_large", "The request body is larger than this route accepts.")
    code = (exc.name or "error").lower().replace(" ", "_")
    message = exc.description or exc.name
    if exc.code == 404 and message == NotFound.description:  # Werkzeug's text speaks of URLs typed by hand
        message = "Nothing is found at this path" + (
            f" (ids are whole numbers from 1 to {LARGEST_PATH_ID})." if _matched_but_for_its_ids(request.path) else ".")
    response = error_response(exc.code, code, message)
    if exc.code == 405:
        response.headers["Allow"] = exc.get_response().headers.get("Allow", "")
    return response


def _matched_but_for_its_ids(path: str) -> bool:
    """Whether a route would have matched `path` if its ids were any path segment (`/api/messages/abc`): only
    then is the id's form the reason nothing is found."""
    loose = current_app.extensions.get(_LOOSE_IDS)
    if loose is None:  # the routes are registered after the handlers: read once, at the first miss
        loose = current_app.extensions[_LOOSE_IDS] = Map(
            [rule.empty() for rule in current_app.url_map.iter_rules() if "<id:" in rule.rule],
            converters={"id": UnicodeConverter})
    try:
        loose.bind("").match(path)
    except NotFound:
        return False
    except HTTPException:  # the path of a route of another method, or one to redirect to
        pass
    return True


_LOOSE_IDS = "agentq.routes_with_any_ids"


def _unexpected(exc: Exception) -> Response:
    log.exception("unhandled error on %s %s", request.method, request.path)
    return error_response(500, "internal_error", "An internal error occurred; it has been logged.")


def _unavailable(exc: Exception) -> Response:
    """A database or Redis outage (a restart, a failover, a Redis refusing writes for want of memory or as a
    replica: `app.outages`), or no pooled database connection free within
    AGENTQ_DB_POOL_TIMEOUT_SECONDS, is the service's state, not the request's fault; a setup step the
    operator must take (SQLite says a missing table or column, PostgreSQL a refused role, this way) is not."""
    if (problem := setup_problem(exc)) is not None:
        return _setup_step_response(problem, exc)
    if not is_outage(exc):  # a deadlock, a statement timeout: a bug or a slow query to look at, not a wait
        return _unexpected(exc)
    log.warning("dependency unavailable on %s %s: %s", request.method, request.path, in_one_line(exc))
    response = error_response(503, "service_unavailable",
                              "A backing service is unavailable for a moment; retry shortly.")
    response.headers["Retry-After"] = "1"
    return response


def _programming(exc: sqlalchemy.exc.ProgrammingError) -> Response:
    """PostgreSQL says a missing table or column this way: the operator's `db init`, not a bug."""
    if (problem := setup_problem(exc)) is not None:
        return _setup_step_response(problem, exc)
    return _unexpected(exc)


_HANDLERS: list[tuple[type[Exception], Callable[[Any], WerkzeugResponse]]] = [
    (http_errors.ParseException, _unreadable),
    (InvalidConfiguration, _misconfigured),
    (AgentqError, _domain),
    (HTTPException, _http),
    *((unavailable, _unavailable) for unavailable in (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError,
                                                       sqlalchemy.exc.TimeoutError, *REDIS_UNAVAILABLE)),
    (sqlalchemy.exc.ProgrammingError, _programming),
    (Exception, _unexpected),
]
"""Each error's handler; Flask answers an error with the handler of its nearest class."""


def install_error_handlers(app: Flask) -> None:
    for error, handler in _HANDLERS:
        app.register_error_handler(error, handler)
