"""The `agentq` command: thin wrappers that parse arguments and call one function of the application."""

from __future__ import annotations

import argparse
import io
import logging
import os
import sys
from dataclasses import asdict
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cli.arguments import (
    WEB_HOST,
    WEB_PORT,
    WEB_THREADS,
    WEB_WORKERS,
    WORKER_METRICS_HOST,
    WORKER_METRICS_PORT,
    WORKER_PROCESSES,
    WORKER_THREADS,
    InvalidVariable,
    amount,
    host,
    option_or_environment,
    optional_port,
    port,
    process_count,
    record_id,
    thread_count,
)
from cli.metrics_dir import prepare_metrics_dir
from cli.output import WarningLines, failed, print_error, print_json, print_warning

if TYPE_CHECKING:
    from app.users import NewUser


def _dotenv() -> None:
    """A `.env` file in the working directory supplies the environment of every process this command starts,
    not only `app.config`'s settings: a model's key (`api_key_env`, `OPENAI_API_KEY`), the server's and the
    workers' defaults below. Variables already set win."""
    from dotenv import load_dotenv
    from dotenv.parser import parse_stream

    path = Path.cwd() / ".env"
    if not path.is_file():
        return
    # python-dotenv skips a line it cannot read with a warning that names neither the file nor the variable,
    # which may be DATABASE_URL: the command then ran against the default database.
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:  # python-dotenv reads it strictly, and failed with a traceback
        line = raw[:exc.start].count(b"\n") + 1
        raise InvalidVariable(f"{path}: line {line} is not UTF-8 text; nothing of the file was loaded") from None
    unreadable = [str(binding.original.line) for binding in parse_stream(io.StringIO(text)) if binding.error]
    if unreadable:
        raise InvalidVariable(f"{path}: line {', '.join(unreadable)} cannot be read as NAME=value (an unclosed "
                              "quote?); nothing of the file was loaded")
    load_dotenv(stream=io.StringIO(text), override=False)  # the text checked, not the file read again


def cmd_db_init(args: argparse.Namespace) -> int:
    from app.schema import init_schema

    print_json(asdict(init_schema()))
    return 0


def _key_shown(created: NewUser) -> dict[str, Any]:
    """The contract's line for a new key: the user's id and name with it, fewer fields than the API's answer
    (`web.render.new_user`), which scripts read as the contract writes it."""
    return {"id": created.user.id, "name": created.user.name, "api_key": created.api_key}


def cmd_users_create(args: argparse.Namespace) -> int:
    from app.users import create_user

    print_json(_key_shown(create_user(args.name, is_admin=args.admin, balance=args.balance)))
    return 0


def cmd_users_replace_key(args: argparse.Namespace) -> int:
    from app.users import replace_api_key

    print_json(_key_shown(replace_api_key(args.id)))
    return 0


def cmd_web(args: argparse.Namespace) -> int:
    from app.logging_setup import configure_logging

    configure_logging()
    from web.server import bind_address, check_can_listen, serve

    address = option_or_environment(args.host, WEB_HOST, host)
    listen_port = option_or_environment(args.port, WEB_PORT, port)
    workers = option_or_environment(args.workers, WEB_WORKERS, process_count)
    threads = option_or_environment(args.threads, WEB_THREADS, thread_count)
    try:
        check_can_listen(address, listen_port)
    except OSError as exc:
        return failed("unavailable", f"the API cannot listen on {bind_address(address, listen_port)}: "
                      f"{exc.strerror or exc}")
    serve(address, listen_port, workers=workers, threads=threads)
    return 0


def worker_size(args: argparse.Namespace) -> tuple[int, int]:
    """Processes and threads a process: the flags, else their variables (from `.env` too), else their fallbacks."""
    return (option_or_environment(args.processes, WORKER_PROCESSES, process_count),
            option_or_environment(args.threads, WORKER_THREADS, thread_count))


def cmd_worker(args: argparse.Namespace) -> int:
    from app.logging_setup import configure_logging

    configure_logging()
    from app.key_variables import warn_of_key_variables_unset_here
    from app.readiness import require_setup
    from workers.group import serve_workers

    # Every setting is read before the database is asked anything: a mistyped one is said as such, whatever
    # state the database is in.
    processes, threads = worker_size(args)
    metrics_port = option_or_environment(args.metrics_port, WORKER_METRICS_PORT, optional_port)
    metrics_host = option_or_environment(args.metrics_host, WORKER_METRICS_HOST, host)
    require_setup()
    warn_of_key_variables_unset_here()
    if metrics_port is not None:
        from app.metrics import serve_host_counters

        try:
            serve_host_counters(metrics_host, metrics_port)
        except OSError as exc:  # the port taken
            return failed("unavailable", f"the worker's counters cannot be served on {metrics_host}:{metrics_port}: "
                          f"{exc.strerror or exc}")
    return serve_workers(processes, threads, args.queues, restart=not args.no_restart)


def cmd_workers(args: argparse.Namespace) -> int:
    from app import worker_presence
    from web import render

    print_json(render.worker_processes(worker_presence.live_workers()))
    return 0


def cmd_mock_llm(args: argparse.Namespace) -> int:
    from app.mock_upstream import serve

    # A server's log, tracebacks kept; it reads no AGENTQ_ setting, so not agentq's (`configure_logging`).
    logging.basicConfig(level=logging.WARNING, force=True)

    try:
        serve(args.host, args.port, args.tls_cert, args.tls_key)
    except OSError as exc:  # the port taken, or a certificate that cannot be read
        return failed("unavailable", f"the mock upstream cannot serve on {args.host}:{args.port}: {exc}")
    return 0


def cmd_demo_seed(args: argparse.Namespace) -> int:
    from app.demo import seed_demo

    demo = seed_demo(args.mock_url, Path(args.key_file))
    print_json({"user_id": demo.user_id, "agent_id": demo.agent_id, "api_key": demo.api_key})
    return 0


def build_parser() -> argparse.ArgumentParser:
    from app.queues import QUEUES

    parser = argparse.ArgumentParser(
        prog="agentq", description="agentq: LLM agent turns on Dramatiq workers.",
        epilog="Every command reads its settings (DATABASE_URL, REDIS_URL, AGENTQ_*) from the environment or from "
               "a .env file in the working directory; a variable already set wins.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    db = sub.add_parser("db", help="database schema").add_subparsers(dest="db_command", metavar="COMMAND",
                                                                      required=True)
    db.add_parser("init", help="create or upgrade the schema (safe to run twice)").set_defaults(func=cmd_db_init)

    users = sub.add_parser("users", help="accounts").add_subparsers(dest="users_command", metavar="COMMAND",
                                                                    required=True)
    create = users.add_parser("create", help="create a user and print its API key once")
    create.add_argument("name", help="the user's name")
    create.add_argument("--admin", action="store_true", help="make the user an administrator (the admin routes)")
    create.add_argument("--balance", type=amount, default=Decimal(0),
                        help="the credit the account opens with, a decimal amount (default: 0)")
    create.set_defaults(func=cmd_users_create)
    replace = users.add_parser("replace-key", help="give a user a new API key, printed once; the old one stops "
                                                   "working (within 10 s in a running API)")
    replace.add_argument("id", type=record_id, help="the user's id")
    replace.set_defaults(func=cmd_users_replace_key)

    web = sub.add_parser("web", help="serve the HTTP API with gunicorn")
    web.add_argument("--host", type=host, help=WEB_HOST.help())
    web.add_argument("--port", type=port, help=WEB_PORT.help())
    web.add_argument("--workers", type=process_count, help=WEB_WORKERS.help("gunicorn processes; "))
    web.add_argument("--threads", type=thread_count, help=WEB_THREADS.help("threads a process; "))
    web.set_defaults(func=cmd_web)

    worker = sub.add_parser("worker", help="run Dramatiq worker processes")
    worker.add_argument("--processes", type=process_count, help=WORKER_PROCESSES.help())
    worker.add_argument("--threads", type=thread_count, help=WORKER_THREADS.help("threads a process; "))
    worker.add_argument("--queues", nargs="+", default=None, choices=QUEUES,
                        help="serve only these queues (default: all)")
    worker.add_argument("--metrics-port", type=port,
                        help="serve this host's worker counters at /metrics on this port, for workers that share "
                             "no PROMETHEUS_MULTIPROC_DIR with an API process; " + WORKER_METRICS_PORT.help())
    worker.add_argument("--metrics-host", type=host,
                        help=WORKER_METRICS_HOST.help("the address it listens on; "))
    worker.add_argument("--no-restart", action="store_true",
                        help="exit when one process dies (Dramatiq's own way) instead of starting the group again; "
                             "for a supervisor that restarts the command itself")
    worker.set_defaults(func=cmd_worker)

    sub.add_parser("workers", help="the worker processes alive, by host and pid: the runs each holds and whether it "
                                   "takes new ones (as GET /api/admin/workers)").set_defaults(func=cmd_workers)

    mock = sub.add_parser("mock-llm", help="run the OpenAI-compatible mock upstream (demo and tests)")
    mock.add_argument("--host", default="127.0.0.1", help="the address it listens on (default: %(default)s)")
    mock.add_argument("--port", type=port, default=8765, help="the port it listens on (default: %(default)s)")
    mock.add_argument("--tls-cert", default=None, help="serve https with this certificate (PEM)")
    mock.add_argument("--tls-key", default=None, help="the certificate's private key (PEM)")
    mock.set_defaults(func=cmd_mock_llm)

    demo = sub.add_parser("demo", help="the built-in demo").add_subparsers(dest="demo_command", metavar="COMMAND",
                                                                           required=True)
    seed = demo.add_parser("seed", help="create (or reuse) the demo user, model and agent")
    seed.add_argument("--mock-url", default="http://127.0.0.1:8765/v1",
                      help="the mock upstream's base URL, which the demo model calls (default: %(default)s)")
    seed.add_argument("--key-file", default="var/demo-api-key",
                      help="the file that keeps the demo user's API key, made if missing (default: %(default)s)")
    seed.set_defaults(func=cmd_demo_seed)

    from cli.debug import add_debug_commands
    from cli.dlq import add_dlq_commands

    add_dlq_commands(sub)
    add_debug_commands(sub)
    return parser


COMMAND_LINE_VARIABLES = ("AGENTQ_HOST", "AGENTQ_WEB_", "AGENTQ_WORKER_", "AGENTQ_DEMO_", "AGENTQ_BENCH_")
"""The `AGENTQ_` variables that are no setting of `app.config`: the commands' own defaults (read where each is
used) and the benchmark's."""


def main(argv: list[str] | None = None) -> int:
    try:
        return _command(argv)
    except KeyboardInterrupt:
        print_error("interrupted", "Stopped by an interrupt (Ctrl-C) before the command finished.")
        return 130


def _command(argv: list[str] | None) -> int:
    from app.config import unknown_settings

    logging.getLogger().addHandler(WarningLines())  # the servers replace it with their log (`configure_logging`)
    try:
        _dotenv()
        for problem in unknown_settings(os.environ, COMMAND_LINE_VARIABLES):
            print_warning("unknown_setting", problem)
        prepare_metrics_dir(sys.argv[1:] if argv is None else argv)
    except InvalidVariable as exc:
        return failed("invalid_configuration", str(exc))
    import pydantic
    import redis
    import sqlalchemy.exc

    from app.config import describe_invalid_settings
    from app.errors import AgentqError

    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except BrokenPipeError:
        # The reader of the output went away (`agentq dlq show 1 | head -c 100`): the rest has nowhere to go,
        # and Python's own flush of stdout at exit must not fail again with a traceback.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except AgentqError as exc:
        return failed(exc.code, exc.message)
    except InvalidVariable as exc:
        return failed("invalid_configuration", str(exc))
    except pydantic.ValidationError as exc:
        if exc.title != "Settings":
            raise
        return failed("invalid_configuration", describe_invalid_settings(exc))
    except (sqlalchemy.exc.DBAPIError, redis.RedisError) as exc:
        return _backing_service_failed(exc)


def _backing_service_failed(exc: Exception) -> int:
    """One line an operator can act on: which service, where it is, and whether waiting or mending helps."""
    import redis

    from app.failure_logs import backing_service
    from app.outages import in_one_line, is_outage
    from app.setup_problems import setup_problem

    of_redis = isinstance(exc, redis.RedisError)
    said = f"{in_one_line(exc)} ({backing_service(of_redis=of_redis)})"
    if (problem := setup_problem(exc)) is not None:
        return failed(problem.code, f"{said}: {problem.step}.")
    if is_outage(exc):
        return failed("service_unavailable", said)
    return failed("redis_error" if of_redis else "database_error", said)


if __name__ == "__main__":
    sys.exit(main())
