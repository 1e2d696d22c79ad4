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
        relative_to = str(Path.cwd()) if settings.is_sqlite else ""
        deployment = "|".join((settings.database_url, settings.redis_url, relative_to))
        tag = hashlib.sha256(deployment.encode()).hexdigest()[:12]
        path = Path(tempfile.gettempdir()) / f"agentq-metrics-{os.getuid()}-{tag}"
        _own_private_dir(path)
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(path)


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
