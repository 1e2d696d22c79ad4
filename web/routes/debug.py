"""Admin debugging: route test, prompt preview, execution test, debug logs and cost analysis."""

from __future__ import annotations

from web.routes import api_blueprint

bp = api_blueprint("debug", admin=True)
