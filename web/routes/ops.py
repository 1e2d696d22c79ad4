"""Operations for admins: queues, dead letters."""

from __future__ import annotations

from web.routes import api_blueprint

bp = api_blueprint("ops", admin=True)
