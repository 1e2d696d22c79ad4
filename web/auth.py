"""Bearer authentication for the /api blueprints: who is calling, and whether they may."""

from __future__ import annotations

from flask import g, request
from werkzeug.exceptions import MethodNotAllowed

from app.auth import Principal, authenticate, bearer_token_of


def bearer_token() -> str | None:
    return bearer_token_of(request.headers.get("Authorization", ""))


def load_principal() -> None:
    """before_request of every /api blueprint: 401 before anything else is looked at."""
    g.principal = authenticate(bearer_token())


def load_admin() -> None:
    """before_request of the admin blueprints: 401 for no key, then 403 for a user's key."""
    load_principal()
    g.principal.require_admin()


def load_principal_before_a_method_refusal() -> None:
    """before_request of the application: Flask runs no blueprint's hooks for a method its route lacks, so such a
    request to an /api path was answered 405 before its key was looked at (and told an anonymous caller which
    methods the path has). The key is checked first there too; a caller with one is then told 405."""
    if isinstance(request.routing_exception, MethodNotAllowed) and request.path.startswith("/api/"):
        load_principal()


def principal() -> Principal:
    return g.principal
