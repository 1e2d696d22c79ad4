"""`agentq web`: the API under gunicorn (threaded workers), configured in code rather than a file."""

from __future__ import annotations

import importlib
import json
import logging
import os
import pkgutil
import socket
import sys
from ssl import SSLError
from typing import Any

from gunicorn import util
from gunicorn.app.base import BaseApplication
from gunicorn.glogging import Logger
from gunicorn.http import errors as http_errors

from app.errors import error_object
from app.text import one_line
from web.client_timeouts import with_timed_body
from web.connection_intake import ConnectionIntake

ACCESS_LOG_FORMAT = '%(h)s "%(r)s" %(s)s %(B)s bytes %(M)s ms "%(a)s" %({x-request-id}o)s'
"""An access line: the client's address, the request line, the status, the body's bytes, the time to the end of
the response (an answer stream's whole length), the client's user agent and the request's id (`web.request_ids`,
from the response: the line is written after the request's own lines, its context gone); no key (it is a
header)."""


class ApiLogger(Logger):
    """gunicorn's logger, with two changes.

    gunicorn builds every access log line (its "atoms") whenever any logging config is given, and only then
    asks the logger, set to WARNING here, whether to write it; it asks first here. And a client that kept a
    thread waiting mid-request past `AGENTQ_CLIENT_TIMEOUT_SECONDS` (`web.client_timeouts`) is one warning
    line, not gunicorn's "Socket error processing request." with a traceback, which reads as a server fault."""

    def access(self, resp: Any, req: Any, environ: Any, request_time: Any) -> None:
        if self.access_log.isEnabledFor(logging.INFO):
            super().access(resp, req, environ, request_time)

    def atoms(self, resp: Any, req: Any, environ: Any, request_time: Any) -> dict[str, Any]:
        """What a client sent (its request line, user agent, any header), with what is not printable escaped:
        gunicorn refuses CR, LF and ESC in a request, but not a C1 control such as NEL (U+0085), which a reader
        that splits lines by Unicode's rules takes for a line break, so an anonymous client could write a line
        that reads as agentq's own into the access log."""
        return {name: one_line(value) if isinstance(value, str) else value
                for name, value in super().atoms(resp, req, environ, request_time).items()}

    def exception(self, msg: str, *args: Any, **kwargs: Any) -> None:
        if isinstance(sys.exc_info()[1], BlockingIOError):  # a blocking socket's receive or send timeout
            self.warning("a client sent or took nothing for longer than its timeout in the middle of a request "
                         "(AGENTQ_CLIENT_TIMEOUT_SECONDS; an answer stream's writes: "
                         "AGENTQ_STREAM_WRITE_TIMEOUT_SECONDS); its connection is closed")
            return
        super().exception(msg, *args, **kwargs)


_REFUSALS: tuple[tuple[type[BaseException] | tuple[type[BaseException], ...], int, str, str], ...] = (
    ((http_errors.InvalidResponseHeader, http_errors.InvalidResponseHeaderName),
     500, "Internal Server Error", "internal_error"),
    (http_errors.LimitRequestLine, 414, "URI Too Long", "uri_too_long"),
    (http_errors.LimitRequestHeaders, 431, "Request Header Fields Too Large", "headers_too_large"),
    (http_errors.ExpectationFailed, 417, "Expectation Failed", "expectation_failed"),
    ((http_errors.ForbiddenProxyRequest, SSLError), 403, "Forbidden", "forbidden"),
    (http_errors.ParseException, 400, "Bad Request", "malformed_request"),
)
"""What a request gunicorn could not parse is answered, before Flask sees it: the statuses gunicorn
gives, except for what the client's input causes and gunicorn answers with a 5xx (a transfer coding it does
not know, its 501; a `SCRIPT_NAME` header that does not prefix the path, its 500), which is a 400 here: no
input yields a 5xx. A 500 is left for a response header the application got wrong."""


LARGEST_BODY_KEPT_ALIVE = 64 * 1024
"""gunicorn (27) drains at most this much of a body the application left unread (a 413, a 405) before it
reuses the connection, and closes it otherwise, after a response that said `keep-alive`: the client's next
request on it then fails without an answer (`tests/test_bad_inputs.py` checks this against the installed
gunicorn)."""


def _may_outgrow_the_drain(name: str, value: str) -> bool:
    """A header saying the body may be longer than gunicorn drains: chunked (of any length), or a length past it."""
    if name == "TRANSFER-ENCODING":
        return True
    return name == "CONTENT-LENGTH" and value.isdigit() and int(value) > LARGEST_BODY_KEPT_ALIVE


class ApiWorker(ConnectionIntake):
    """gunicorn's threaded worker, with changes for an API's clients (and its connections taken as
    `ConnectionIntake` takes them).

    Its own refusals (a request line or headers it cannot parse or that are too large) are in the API's
    error shape instead of an HTML page a client cannot read. And a request whose body may be more than
    gunicorn drains is answered `Connection: close`, so the client opens a new connection for its next
    request instead of sending it on one gunicorn is about to close (the application may not read the
    body: a 413 is answered before). A graceful stop ends the answer streams it serves."""

    def handle_exit(self, sig: int, frame: Any) -> None:
        """A graceful stop (SIGTERM) also ends the answer streams this process serves, whose clients
        reconnect elsewhere, so the stop waits a heartbeat at most instead of gunicorn's graceful timeout."""
        from app.answer_stream import close_streams

        close_streams()
        super().handle_exit(sig, frame)

    def handle_request(self, req: Any, conn: Any) -> Any:
        if any(_may_outgrow_the_drain(name, value) for name, value in req.headers):
            req.force_close()
        return super().handle_request(req, conn)

    def handle_error(self, req: Any, client: Any, addr: Any, exc: BaseException) -> None:
        status, reason, code = next(((status, reason, code) for kinds, status, reason, code in _REFUSALS
                                     if isinstance(exc, kinds)), (500, "Internal Server Error", "internal_error"))
        if status >= 500:
            self.log.exception("Error handling request %s", getattr(req, "uri", "(no URI read)"))
            message = "Internal server error."
        else:
            self.log.warning("Invalid request from ip=%s: %s", (addr or ("",))[0], exc)
            message = f"The HTTP request could not be read: {exc}."
        body = json.dumps(error_object(code, message)).encode()
        head = (f"HTTP/1.1 {status} {reason}\r\nConnection: close\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode("latin-1")
        try:
            util.write_nonblock(client, head + body)
        except OSError:
            self.log.debug("Failed to send error message.")


class _Gunicorn(BaseApplication):
    def __init__(self, options: dict[str, Any]) -> None:
        self._options = options
        super().__init__()

    def load_config(self) -> None:
        for key, value in self._options.items():
            self.cfg.set(key, value)

    def load(self) -> Any:
        from web import create_app

        return with_timed_body(create_app())


def _child_exit(server: Any, worker: Any) -> None:
    """A worker gone (stopped, crashed, replaced): its counter files are folded into the ended processes' own
    (`app.metrics_files`), as every worker's were at the start."""
    from prometheus_client import multiprocess

    from app.metrics_files import fold_ended_processes

    multiprocess.mark_process_dead(worker.pid)
    fold_ended_processes()


def _post_fork(server: Any, worker: Any) -> None:
    from app.db import dispose_engines
    from app.redis_client import reset_redis

    dispose_engines()
    reset_redis()


def _post_worker_init(worker: Any) -> None:
    """Each API process bounds the answer streams it holds by its threads (`app.stream_slots`), and ends the
    runs no worker started in time and those past their deadline that no worker holds (`app.unheld_run_bounds`),
    so both bounds hold while every worker is gone."""
    from app.heap import freeze_after_boot
    from app.stream_slots import stream_slots, streams_for
    from app.unheld_run_bounds import start_unheld_run_bounds

    stream_slots.hold_at_most(streams_for(worker.cfg.threads))
    start_unheld_run_bounds()
    freeze_after_boot()


def check_can_listen(host: str, port: int) -> None:
    """Raise the `OSError` of an address gunicorn could not bind (taken, not local, not resolved): it tries five
    times over five seconds, then stops with "Can't connect to …", which reads as a client's failure. Binds as
    gunicorn does (IPv6 for an IPv6 address, else IPv4, with `SO_REUSEADDR`) and closes at once. A socket handed
    over (systemd's `LISTEN_FDS`, gunicorn's own `GUNICORN_FD` on a USR2 upgrade) is gunicorn's to use: its
    port is taken by design, and nothing is checked."""
    if "LISTEN_FDS" in os.environ or "GUNICORN_FD" in os.environ:
        return
    with socket.socket(socket.AF_INET6 if util.is_ipv6(host) else socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind((host, port))


def bind_address(host: str, port: int) -> str:
    """`host:port` as gunicorn reads it, and as an operator is told it: an IPv6 address in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def preload() -> None:
    """Import the application's modules in gunicorn's master, before it forks its workers: each worker
    inherits them (copy-on-write) and only builds the app (`_Gunicorn.load`), instead of importing the whole
    stack itself, about 1.5 s of CPU a worker on a slow host at every start and every restart of a worker.
    Nothing is connected or built here (`web.create_app` is not called); the workers drop whatever they
    inherited that could hold a socket (`_post_fork`). Modules imported here are not imported again when a
    worker is replaced: new code is deployed by restarting `agentq web`, not by a HUP."""
    import web.routes
    from app.heap import freeze_after_boot

    for route_module in pkgutil.iter_modules(web.routes.__path__, "web.routes."):
        importlib.import_module(route_module.name)
    freeze_after_boot()


def serve(host: str, port: int, *, workers: int, threads: int) -> None:
    from app.logging_setup import gunicorn_logconfig
    from app.metrics_files import fold_ended_processes

    fold_ended_processes()
    preload()
    _Gunicorn({
        "bind": bind_address(host, port),
        "workers": workers,
        "worker_class": ApiWorker,
        "threads": threads,
        "timeout": 120,
        "graceful_timeout": 30,
        # Longer than the idle timeout of common clients' pools (httpx keeps a connection 5 s) and proxies
        # (60 s): a server closing a keep-alive connection as the client sends on it resets that request.
        "keepalive": 75,
        # gunicorn's longest: a query every field of the document allows (a 500-character cursor of characters
        # outside the BMP, percent-encoded, is 6,000 bytes) fits, where the default 4,094 answered it 414.
        "limit_request_line": 8190,
        "accesslog": None,
        # Read only with AGENTQ_ACCESS_LOG, which lets gunicorn's access logger write through agentq's handler.
        "access_log_format": ACCESS_LOG_FORMAT,
        "logger_class": ApiLogger,
        "logconfig_dict": gunicorn_logconfig(),
        "child_exit": _child_exit,
        "post_fork": _post_fork,
        "post_worker_init": _post_worker_init,
        "preload_app": False,
        # gunicorn 27's control socket defaults to one path per user (~/.gunicorn/gunicorn.ctl): every
        # `agentq web` on a host took it over, and stopping any one of them removed it from the others.
        "control_socket_disable": True,
    }).run()
