"""Bearer authentication for the /api blueprints: who is calling, and whether they may."""

from __future__ import annotations

from flask import g, request

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


def principal() -> Principal:
    return g.principal
