"""The chat page at /: one server-rendered template and a plain script that uses the public API."""

from __future__ import annotations

from flask import render_template

from web.headers import page_blueprint

bp = page_blueprint("chat", __name__)


@bp.get("/")
def chat_page() -> str:
    return render_template("chat.html")
