"""Liveness, readiness and metrics; no API key needed (/metrics takes its own token when one is set)."""

from __future__ import annotations

from typing import Any

from flask import Response
from flask_openapi3 import APIBlueprint, Tag

from app import readiness
from app.auth import check_metrics_token
from app.errors import error_object
from web import prometheus
from web import responses as r
from web.auth import bearer_token

bp = APIBlueprint("health", __name__)
tag = Tag(name="operations")


@bp.get("/healthz", tags=[tag], responses={200: r.Health})
def healthz() -> dict[str, Any]:
    return {"status": "ok"}


@bp.get("/readyz", tags=[tag], responses={200: r.Ready, 503: r.NotReady})
def readyz() -> dict[str, Any] | tuple[dict[str, Any], int]:
    report = readiness.check()
    if not report.ready:
        return {**error_object("not_ready", report.summary), "checks": report.checks}, 503
    return {"status": "ready", "checks": report.checks}


@bp.get("/metrics", tags=[tag],
        responses={200: {"description": "Prometheus text format", "content": {"text/plain": {}}}})
def metrics() -> Response:
    check_metrics_token(bearer_token())
    body, content_type = prometheus.exposition()
    return Response(body, content_type=content_type)
