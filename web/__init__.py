"""The Flask application: `create_app()` builds it; nothing connects at import time."""

from __future__ import annotations

from typing import Any

from flask import Response
from flask_openapi3 import Info, OpenAPI
from werkzeug.routing import IntegerConverter

from web.bodies import SafeJSONProvider
from web.errors import install_error_handlers, on_validation_error
from web.headers import guard_every_response
from web.request_ids import document_request_ids, name_every_request
from web.request_metrics import count_every_request
from web.schemas import LARGEST_PATH_ID, ErrorResponse


class IdConverter(IntegerConverter):
    """A path id is 1..10**18-1 in ASCII digits, written as the API writes it (no leading zero: one resource, one
    URL; `DELETE /api/admin/agents/01` deleted agent 1); anything else is simply not found (404), never a 500.

    The bound is in the pattern, not checked after the match: a value Werkzeug matched but its converter
    refused counts as a match of the path under the other methods' rules, and would be answered 405
    (PATCH /api/admin/models/0). Ids come from sequences that start at 1, which would need 10**18 rows to
    reach the bound."""

    regex = f"[1-9][0-9]{{0,{len(str(LARGEST_PATH_ID)) - 1}}}"

    def __init__(self, url_map: Any) -> None:
        super().__init__(url_map, min=1, max=LARGEST_PATH_ID)


class AgentqAPI(OpenAPI):
    json_provider_class = SafeJSONProvider

    def generate_spec_json(self) -> None:
        super().generate_spec_json()
        document_request_ids(self.spec_json)

    def make_default_options_response(self) -> Response:
        """An OPTIONS request is answered 204 with its `Allow` header: Flask's own answer is a 200 with an empty
        `text/html` body, on an API whose every answer is JSON or nothing."""
        response = super().make_default_options_response()
        response.status_code = 204
        del response.headers["Content-Type"]
        return response


def create_app(test_config: dict[str, Any] | None = None) -> AgentqAPI:
    from web.auth import load_principal_before_a_method_refusal
    from web.routes import admin, chat, console, conversations, debug, health, me, ops, streaming

    app = AgentqAPI(
        __name__,
        info=Info(title="agentq", version="0.1.0",
                  description="Execution backend of an LLM agent chat platform."),
        security_schemes={"bearerAuth": {"type": "http", "scheme": "bearer"}},
        validation_error_status=422,
        validation_error_model=ErrorResponse,
        validation_error_callback=on_validation_error,
        validate_response=bool(test_config and test_config.get("VALIDATE_RESPONSES")),
        doc_ui=False,
    )
    app.config["MAX_CONTENT_LENGTH"] = 8 * 1024 * 1024
    app.json.ensure_ascii = False  # type: ignore[attr-defined]
    if test_config:
        app.config.update(test_config)
    app.url_map.converters["id"] = IdConverter
    install_error_handlers(app)
    name_every_request(app)
    count_every_request(app)
    app.before_request(load_principal_before_a_method_refusal)
    for blueprint in (health.bp, me.bp, admin.bp, conversations.bp, streaming.bp, debug.bp, ops.bp):
        app.register_api(blueprint)
    app.register_blueprint(console.bp)
    app.register_blueprint(chat.bp)
    guard_every_response(app)

    @app.get("/openapi.json", doc_ui=False)
    def openapi_json() -> dict[str, Any]:
        return app.api_doc

    from workers.broker import install_broker

    install_broker()
    return app


__all__ = ["AgentqAPI", "IdConverter", "create_app"]
