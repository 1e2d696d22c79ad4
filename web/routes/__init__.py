"""One blueprint per area of the API; `web.create_app` registers them all."""

from __future__ import annotations

from collections.abc import Callable
from http import HTTPStatus
from typing import Any

from flask import request
from flask_openapi3 import APIBlueprint
from pydantic import BaseModel

from app.config import get_settings
from app.models.catalog import SYSTEM_PROMPT_MAX_CHARS
from web.auth import load_admin, load_principal
from web.bodies import body_limit, require_object_body
from web.schemas import ErrorResponse

SECURITY: list[dict[str, list[str]]] = [{"bearerAuth": []}]
ERRORS: dict[str | int | HTTPStatus, type[BaseModel] | dict[Any, Any] | None] = {
    status: ErrorResponse for status in (400, 401, 403, 404, 409, 413, 414, 417, 422, 429, 431, 503)}
"""The contract's statuses, and those the HTTP server answers itself before the application, in the same
shape: 414 a request line past 8,190 bytes, 417 an `Expect` other than `100-continue`, 431 headers past
their limits (`web.server`)."""


def api_blueprint(name: str, *, admin: bool = False) -> APIBlueprint:
    """A blueprint under /api whose routes need a key (an admin's, when `admin`: only those answer 403) and take
    JSON objects."""
    errors = ERRORS if admin else {status: shape for status, shape in ERRORS.items() if status != 403}
    blueprint = APIBlueprint(name, __name__, url_prefix="/api", abp_security=SECURITY, abp_responses=errors)
    blueprint.before_request(load_admin if admin else load_principal)
    blueprint.before_request(_limit_body(admin))
    blueprint.before_request(require_object_body)
    return blueprint


def _limit_body(admin: bool) -> Callable[[], None]:
    """The largest text a user's route takes is a message's content; an admin's, an agent's prompt."""

    def limit() -> None:
        request.max_content_length = body_limit(SYSTEM_PROMPT_MAX_CHARS if admin else get_settings().max_content_chars)

    return limit


__all__ = ["ERRORS", "SECURITY", "api_blueprint"]
