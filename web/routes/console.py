"""The operator's page at /admin: one server-rendered template whose script calls the JSON admin API.

The page itself holds no data and needs no key; it asks for an admin key, keeps it in the browser's
sessionStorage, and sends it as a bearer token with every call, so the API's admin check is the
only guard.
"""

from __future__ import annotations

from flask import render_template

from web.headers import page_blueprint

bp = page_blueprint("console", __name__)

REFRESH_MS = 3000


@bp.get("/admin")
def admin_page() -> str:
    return render_template("admin.html", refresh_ms=REFRESH_MS)
