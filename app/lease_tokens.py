"""A lease token names the process that holds the lease: the same id that process publishes its presence under
(`app.worker_presence`), so the recovery sweep can tell a lease whose holder has left the workers' list from one
whose holder is alive but slow (`app.recovery`).

A token is `<process id>.<random>`; one written by an earlier release is random alone, and names no holder.
"""

from __future__ import annotations

import os
import re
import secrets
import uuid

_PROCESS_ID = re.compile(r"[0-9a-f]{32}")

_this_process: tuple[int, str] | None = None


def this_process() -> str:
    """This process's id in the workers' list and in its leases: random, made once per process (a forked child
    makes its own), since a pid repeats across hosts and over time."""
    global _this_process
    pid = os.getpid()
    if _this_process is None or _this_process[0] != pid:
        _this_process = (pid, uuid.uuid4().hex)
    return _this_process[1]


def new_lease_token() -> str:
    return f"{this_process()}.{secrets.token_hex(12)}"


def holder_of(token: str) -> str | None:
    """The process id a lease token names; None for a token that names none (an earlier release's)."""
    holder, dot, _ = token.partition(".")
    return holder if dot and _PROCESS_ID.fullmatch(holder) else None


__all__ = ["holder_of", "new_lease_token", "this_process"]
