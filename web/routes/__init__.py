"""One blueprint per area of the API; `web.create_app` registers them all."""

from __future__ import annotations

from flask_openapi3 import APIBlueprint

from web.auth import load_admin, load_principal
from web.errors import require_object_body
from web.schemas import ErrorResponse

SECURITY = [{"bearerAuth": []}]
ERRORS = {400: ErrorResponse, 401: ErrorResponse, 403: ErrorResponse, 404: ErrorResponse,
          409: ErrorResponse, 413: ErrorResponse, 422: ErrorResponse, 429: ErrorResponse}


def api_blueprint(name: str, *, admin: bool = False) -> APIBlueprint:
    """A blueprint under /api whose routes need a key (an admin's, when `admin`) and take JSON objects."""
    blueprint = APIBlueprint(name, __name__, url_prefix="/api", abp_security=SECURITY, abp_responses=ERRORS)
    blueprint.before_request(load_admin if admin else load_principal)
    blueprint.before_request(require_object_body)
    return blueprint
