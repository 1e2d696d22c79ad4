"""`agentq web`: the API under gunicorn (threaded workers), configured in code rather than a file."""

from __future__ import annotations

import logging
from typing import Any

from gunicorn.app.base import BaseApplication
from gunicorn.glogging import Logger


class QuietAccessLogger(Logger):
    """gunicorn builds every access log line (its "atoms") whenever any logging config is given, and
    only then asks the logger, set to WARNING here, whether to write it; ask first."""

    def access(self, resp: Any, req: Any, environ: Any, request_time: Any) -> None:
        if self.access_log.isEnabledFor(logging.INFO):
            super().access(resp, req, environ, request_time)


class _Gunicorn(BaseApplication):
    def __init__(self, options: dict[str, Any]) -> None:
        self._options = options
        super().__init__()

    def load_config(self) -> None:
        for key, value in self._options.items():
            self.cfg.set(key, value)

    def load(self) -> Any:
        from web import create_app

        return create_app()


def _child_exit(server: Any, worker: Any) -> None:
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def _post_fork(server: Any, worker: Any) -> None:
    from app.db import dispose_engines
    from app.redis_client import reset_redis

    dispose_engines()
    reset_redis()


def _post_worker_init(worker: Any) -> None:
    from app.heap import freeze_after_boot

    freeze_after_boot()


def serve(host: str, port: int, *, workers: int, threads: int) -> None:
    from app.logging_setup import gunicorn_logconfig

    _Gunicorn({
        "bind": f"{host}:{port}",
        "workers": workers,
        "worker_class": "gthread",
        "threads": threads,
        "timeout": 120,
        "graceful_timeout": 30,
        # Longer than the idle timeout of common clients' pools (httpx keeps a connection 5 s) and proxies
        # (60 s): a server closing a keep-alive connection as the client sends on it resets that request.
        "keepalive": 75,
        "accesslog": None,
        "logger_class": QuietAccessLogger,
        "logconfig_dict": gunicorn_logconfig(),
        "child_exit": _child_exit,
        "post_fork": _post_fork,
        "post_worker_init": _post_worker_init,
        "preload_app": False,
        # gunicorn 27's control socket defaults to one path per user (~/.gunicorn/gunicorn.ctl): every
        # `agentq web` on a host took it over, and stopping any one of them removed it from the others.
        "control_socket_disable": True,
    }).run()
