"""A lease token names the process that holds the lease: the same id that process publishes its presence under
(`app.worker_presence`), so the recovery sweep can tell a lease whose holder has left the workers' list from one
whose holder is alive but slow (`app.silent_holders`).

A token is `<process id>.<random>`; one written by an earlier release is random alone, and names no holder.
"""

from __future__ import annotations

import os
import re
import secrets
import uuid

_PROCESS_ID = re.compile(r"[0-9a-f]{32}")

_this_process = uuid.uuid4().hex


def _new_process_id() -> None:
    global _this_process
    _this_process = uuid.uuid4().hex


os.register_at_fork(after_in_child=_new_process_id)


def this_process() -> str:
    """This process's id in the workers' list and in its leases: random, made as the module is imported and again
    in a forked child (a pid repeats across hosts and over time). Made then, not at the first call: the worker's
    threads claim runs while its presence is being set up, and ids made at once by two of them would differ."""
    return _this_process


def new_lease_token() -> str:
    return f"{this_process()}.{secrets.token_hex(12)}"


def holder_of(token: str) -> str | None:
    """The process id a lease token names; None for a token that names none (an earlier release's)."""
    holder, dot, _ = token.partition(".")
    return holder if dot and _PROCESS_ID.fullmatch(holder) else None


__all__ = ["holder_of", "new_lease_token", "this_process"]
