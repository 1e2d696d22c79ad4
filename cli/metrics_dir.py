"""Where the serving commands' processes write their counters (prometheus_client's multiprocess mode), chosen
and checked before anything imports prometheus_client."""

from __future__ import annotations

import hashlib
import os
import stat
import tempfile
from pathlib import Path

from cli.arguments import InvalidVariable

SERVING_COMMANDS = ("web", "worker")
"""The commands whose processes count what /metrics reports; the others (a `dlq list` from cron, `db init`)
left a file of counters each in the shared directory, which every scrape then read, for ever."""


def prepare_metrics_dir(argv: list[str]) -> None:
    """Counters of every serving process land in one directory, which must be known before prometheus_client
    is first imported (it picks its storage then): so before anything else, the parser's imports included.

    The default is per user and per deployment (its database and Redis), so two deployments on one host
    do not add up each other's counters; other commands keep theirs in memory."""
    if not argv or argv[0] not in SERVING_COMMANDS:
        os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
        return
    configured = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if configured:
        _usable_metrics_dir(configured)
    else:
        from pydantic import ValidationError

        from app.config import Settings

        try:
            settings = Settings()  # the URLs as every process resolves them, defaults included (not cached here)
        except ValidationError:
            return  # the command stops at its first look at the settings, and says what is wrong there
        tag = hashlib.sha256(deployment_of(settings.database_url, settings.redis_url).encode()).hexdigest()[:12]
        path = Path(tempfile.gettempdir()) / f"agentq-metrics-{os.getuid()}-{tag}"
        _own_private_dir(path)
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(path)


DEFAULT_PORTS = {"postgresql": 5432, "redis": 6379}


def deployment_of(database_url: str, redis_url: str) -> str:
    """The deployment two URLs name, the same however they spell it: a web and a worker whose `REDIS_URL`s
    differed by a `/0` or a default port, or whose SQLite paths were relative to two directories, wrote their
    counters to two directories, and the API's /metrics missed every worker's counter without a word. Read
    as the database and Redis read them: the backend (any driver), the user, the host in lower case, the port
    with its default, the database; Redis's socket path, or host and port, and database number. A password
    or an option does not make another deployment. A SQLite file is its absolute path."""
    from redis.connection import parse_url
    from sqlalchemy.engine import make_url

    database = make_url(database_url)
    backend = database.get_backend_name()
    if backend == "sqlite":
        where = str(Path(database.database or "").resolve())
    else:
        where = (f"{database.username or ''}@{(database.host or '').lower()}:"
                 f"{database.port or DEFAULT_PORTS.get(backend, '')}/{database.database or ''}")
    redis = parse_url(redis_url)
    host, port = str(redis.get("host", "localhost")).lower(), redis.get("port", DEFAULT_PORTS["redis"])
    return f"{backend}:{where}|redis:{redis.get('path') or f'{host}:{port}'}/{redis.get('db', 0)}"


def _own_private_dir(path: Path) -> None:
    """The default directory sits in the shared temporary directory under a name anyone can work out: one
    another user made there first could feed /metrics its own counters, or hold links through which
    prometheus_client would write into this user's files. It is made private, and one that is not this
    user's own directory is refused."""
    refused = (f"the default metrics directory {path} is not a directory of this user's own: remove what is "
               "there, or set PROMETHEUS_MULTIPROC_DIR to a private directory")
    try:
        path.mkdir(mode=0o700, exist_ok=True)
        found = path.lstat()
    except FileExistsError:  # a file, or a link to one or to nothing
        raise InvalidVariable(refused) from None
    except OSError as exc:  # the temporary directory not writable
        raise InvalidVariable(f"the default metrics directory {path} cannot be made: {exc.strerror or exc}; set "
                              "PROMETHEUS_MULTIPROC_DIR to a private directory") from None
    if not stat.S_ISDIR(found.st_mode) or found.st_uid != os.geteuid():
        raise InvalidVariable(refused)
    if stat.S_IMODE(found.st_mode) != 0o700:  # made by an earlier release, with the umask's mode
        path.chmod(0o700)


def _usable_metrics_dir(configured: str) -> None:
    """An operator's directory is made if missing; one that cannot be written failed every process's first
    counter with a traceback (prometheus_client opens its files there lazily)."""
    path = Path(configured)
    if path.exists() and not path.is_dir():
        raise InvalidVariable(f"PROMETHEUS_MULTIPROC_DIR={configured!r}: not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InvalidVariable(f"PROMETHEUS_MULTIPROC_DIR={configured!r}: {exc.strerror or exc}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise InvalidVariable(f"PROMETHEUS_MULTIPROC_DIR={configured!r}: the directory is not writable")
