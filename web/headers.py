"""The headers agentq sends besides its bodies: those of the two server-rendered pages (`/` and `/admin`),
and those of every response.

Both pages keep a key in the browser (the admin page an admin's), so they load scripts and styles only
from agentq itself, run no inline script, and may not be framed by another site (clickjacking the
admin page's buttons). Every response also says its content type is to be believed, sends no referrer
(a page's address is no business of the sites it links to), and is kept in no cache unless it says how to
be cached: an API answer carries a user's conversations, a new API key, an operator's dead letters, and a
shared proxy or a browser's disk cache keeps a copy for whoever asks next. The pages' scripts and styles
say their own (Flask's revalidation), and an answer stream says `no-cache`.
"""

from __future__ import annotations

from flask import Blueprint, Flask, Response

PAGE_POLICY = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
               "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'")


def page_blueprint(name: str, import_name: str) -> Blueprint:
    page = Blueprint(name, import_name)
    page.after_request(_page_headers)
    return page


def _page_headers(response: Response) -> Response:
    response.headers["Content-Security-Policy"] = PAGE_POLICY
    response.headers["X-Frame-Options"] = "DENY"
    return response


def guard_every_response(app: Flask) -> None:
    app.after_request(_guarded)


def _guarded(response: Response) -> Response:
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "no-referrer"
    if "Cache-Control" not in response.headers:
        response.headers["Cache-Control"] = "no-store"
    return response
