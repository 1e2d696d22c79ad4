"""Every error the API returns, in the contract's shape: `{"error": {"code", "message"}}`.

Domain errors carry their own status and code; request parsing maps to 400 (the body is not a
JSON object: `web.bodies`) or 422 (a field fails validation); an unexpected exception is logged with
its traceback and answered 500 without details, which a test treats as a bug.
"""

from __future__ import annotations

import logging

import redis
import sqlalchemy.exc
from flask import Flask, Response, jsonify, request
from gunicorn.http import errors as http_errors
from pydantic import ValidationError
from werkzeug.exceptions import HTTPException, NotFound
from werkzeug.wrappers import Response as WerkzeugResponse

from app.errors import AgentqError, DatabaseAwaitsUpgrade, DatabaseNotCreated, InvalidConfiguration, error_object
from app.outages import in_one_line, lacks_a_column, schema_missing

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
    if not first["loc"]:  # a rule across fields (a PATCH setting a required one to null)
        return error_response(422, "validation_failed", f"Invalid request body: {first['msg']}.")
    where = ".".join(str(part) for part in first["loc"])
    return error_response(422, "validation_failed", f"Invalid value for '{where}': {first['msg']}.")


def _no_schema_response() -> Response:
    return error_response(503, "service_unavailable", "The service is not set up yet: its database has no schema. "
                          "The operator must run `agentq db init`.")


def _schema_behind_response() -> Response:
    return error_response(503, "service_unavailable", "The service's database predates this release. The operator "
                          "must run `agentq db init` to upgrade it.")


def install_error_handlers(app: Flask) -> None:
    @app.errorhandler(http_errors.ParseException)
    def _unreadable(exc: http_errors.ParseException) -> Response:
        """A body gunicorn cannot read (a chunk whose size or end is malformed) is the client's malformed
        request, as its own refusals of a request line or headers are (`web.server`), never a 500."""
        return error_response(400, "malformed_request", f"The HTTP request body could not be read: {exc}.")

    @app.errorhandler(InvalidConfiguration)
    def _misconfigured(exc: InvalidConfiguration) -> Response:
        """What is wrong (a server path, a setting) is the operator's to read in the log, not a caller's."""
        log.error("the service cannot serve: %s", exc.message)
        return error_response(exc.status, exc.code,
                              "The service is not configured to serve; its operators are told why in its log.")

    @app.errorhandler(DatabaseNotCreated)
    def _not_created(exc: DatabaseNotCreated) -> Response:
        """As a database without the schema: the operator must run `db init`; where the file was looked for (a
        server path) is in the log."""
        log.error("the service cannot serve: %s", exc.message)
        return _no_schema_response()

    @app.errorhandler(DatabaseAwaitsUpgrade)
    def _awaits_upgrade(exc: DatabaseAwaitsUpgrade) -> Response:
        """Served without the upgrade, every amount would be read a million times too small (`app.sqlite_upgrades`);
        the API serves once `db init` has run, without a restart."""
        log.error("the service cannot serve: %s", exc.message)
        return _schema_behind_response()

    @app.errorhandler(AgentqError)
    def _domain(exc: AgentqError) -> Response:
        response = error_response(exc.status, exc.code, exc.message)
        if exc.status == 401:
            response.headers["WWW-Authenticate"] = "Bearer"  # RFC 6750: which credentials the route takes
        return response

    @app.errorhandler(HTTPException)
    def _http(exc: HTTPException) -> WerkzeugResponse:
        if exc.code is None:
            return exc.get_response()
        if exc.code == 413:
            return error_response(413, "content_too_large", "The request body is larger than this route accepts.")
        code = (exc.name or "error").lower().replace(" ", "_")
        message = exc.description or exc.name
        if exc.code == 404 and message == NotFound.description:
            # No route matched (an id must be a whole number from 1): Werkzeug's text speaks of URLs typed by hand.
            message = "Nothing is found at this path (ids are whole numbers from 1)."
        response = error_response(exc.code, code, message)
        if exc.code == 405:
            response.headers["Allow"] = exc.get_response().headers.get("Allow", "")
        return response

    @app.errorhandler(sqlalchemy.exc.OperationalError)
    @app.errorhandler(sqlalchemy.exc.InterfaceError)
    @app.errorhandler(sqlalchemy.exc.TimeoutError)
    @app.errorhandler(redis.ConnectionError)
    @app.errorhandler(redis.TimeoutError)
    def _unavailable(exc: Exception) -> Response:
        """A database or Redis outage (a restart, a failover), or no pooled database connection free within
        AGENTQ_DB_POOL_TIMEOUT_SECONDS, is the service's state, not the request's fault."""
        if schema_missing(exc):
            return _no_schema()
        if lacks_a_column(exc):
            return _schema_behind(exc)
        log.warning("dependency unavailable on %s %s: %s", request.method, request.path, in_one_line(exc))
        response = error_response(503, "service_unavailable",
                                  "A backing service is unavailable for a moment; retry shortly.")
        response.headers["Retry-After"] = "1"
        return response

    @app.errorhandler(sqlalchemy.exc.ProgrammingError)
    def _programming(exc: sqlalchemy.exc.ProgrammingError) -> Response:
        if schema_missing(exc):
            return _no_schema()
        return _schema_behind(exc) if lacks_a_column(exc) else _unexpected(exc)

    def _no_schema() -> Response:
        log.error("the database has no agentq schema (%s %s); run `agentq db init`", request.method, request.path)
        return _no_schema_response()

    def _schema_behind(exc: Exception) -> Response:
        """An API deployed before `agentq db init` added this release's columns: a setup step for the operator,
        not an outage to retry (SQLite says it as an OperationalError) nor a bug (PostgreSQL as a ProgrammingError)."""
        log.error("the database lacks a column of this release (%s %s: %s); run `agentq db init`", request.method,
                  request.path, in_one_line(exc))
        return _schema_behind_response()

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> Response:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return error_response(500, "internal_error", "An internal error occurred; it has been logged.")
