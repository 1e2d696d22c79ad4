"""Parsers of the command line's values: a value argparse refuses is a usage error (exit code 2) that says
what the value must be, never a traceback from the code that would have used it."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import TypeVar

Value = TypeVar("Value")


class InvalidVariable(ValueError):
    """An environment variable the command line reads for itself is unusable: the operator set the variable,
    not the flag, so the error names the variable (argparse would have named the flag)."""


@dataclass(frozen=True, slots=True)
class OptionDefault:
    """Where a serving command's option comes from when its flag is not given: an environment variable (from
    `.env` too), else a fallback. Written once, for the value and for the flag's help alike."""

    variable: str
    fallback: str

    def help(self, what: str = "") -> str:
        return f"{what}default: {self.variable}, else {self.fallback or 'none'}"


WEB_HOST = OptionDefault("AGENTQ_HOST", "127.0.0.1")
WEB_PORT = OptionDefault("PORT", "8000")
WEB_WORKERS = OptionDefault("AGENTQ_WEB_WORKERS", "2")
WEB_THREADS = OptionDefault("AGENTQ_WEB_THREADS", "256")
WORKER_PROCESSES = OptionDefault("AGENTQ_WORKER_PROCESSES", "2")
WORKER_THREADS = OptionDefault("AGENTQ_WORKER_THREADS", "16")
WORKER_METRICS_PORT = OptionDefault("AGENTQ_WORKER_METRICS_PORT", "")
WORKER_METRICS_HOST = OptionDefault("AGENTQ_WORKER_METRICS_HOST", "127.0.0.1")


def option_or_environment(given: Value | None, default: OptionDefault, parse: Callable[[str], Value]) -> Value:
    """The flag when given, else its variable, else its fallback, parsed by the flag's own parser."""
    if given is not None:
        return given
    value = os.environ.get(default.variable)
    if value is None:
        return parse(default.fallback)
    try:
        return parse(value)
    except argparse.ArgumentTypeError as exc:
        raise InvalidVariable(f"{default.variable}={value!r}: {exc}") from None


def whole_number(value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number") from None


MOST_PROCESSES = 256
MOST_THREADS = 10_000
"""Bounds far past any machine's use (1,000 turns in flight take 2 x 500 threads): a typo's count of processes
was forked one after another, hundreds a second, and a stop could not end it before all had started."""


def _count(value: str, most: int) -> int:
    """At least 1 (a worker with none would run and take no message, or hold one), at most `most`."""
    number = whole_number(value)
    if not 1 <= number <= most:
        raise argparse.ArgumentTypeError(f"must be 1 to {most}, not {number}")
    return number


def process_count(value: str) -> int:
    return _count(value, MOST_PROCESSES)


def thread_count(value: str) -> int:
    return _count(value, MOST_THREADS)


def page_size(value: str) -> int:
    from app.paging import LARGEST_PAGE

    number = whole_number(value)
    if not 1 <= number <= LARGEST_PAGE:
        raise argparse.ArgumentTypeError(f"a page holds 1 to {LARGEST_PAGE} rows, not {number}")
    return number


def host(value: str) -> str:
    """An address to listen on. An empty one listened on every interface, which nobody asks for by leaving
    it out; an IPv6 address is written bare (`::1`) or bracketed (`[::1]`), as operators write it."""
    address = value.strip()
    if address.startswith("[") and address.endswith("]"):
        address = address[1:-1]
    if not address or any(c.isspace() for c in address) or "/" in address:
        raise argparse.ArgumentTypeError(f"a host is a name or an address to listen on, not {value!r}")
    return address


def port(value: str) -> int:
    number = whole_number(value)
    if not 1 <= number <= 65535:
        raise argparse.ArgumentTypeError(f"a port is 1..65535, not {number}")
    return number


def optional_port(value: str) -> int | None:
    """A port, or none for an empty value: what leaves a variable's service off."""
    return port(value) if value.strip() else None


def record_id(value: str) -> int:
    """An id of a user, agent, conversation or dead letter; one out of the database's range was its error's
    traceback (`bigint out of range`)."""
    from app.models.base import LARGEST_ID

    number = whole_number(value)
    if not 1 <= number <= LARGEST_ID:
        raise argparse.ArgumentTypeError(f"an id is 1..{LARGEST_ID}, not {number}")
    return number


def listing_cursor(value: str) -> str:
    """A `next_cursor` an earlier page printed, checked before anything is read (an empty one starts the list):
    the API's refusal speaks of what "this API returned", and came as a command's failure (exit 1), not a usage
    error."""
    from app.errors import ValidationFailed
    from app.paging import check_cursor

    try:
        if value:
            check_cursor(value)
    except ValidationFailed:
        raise argparse.ArgumentTypeError(f"{value!r} is not a next_cursor that `dlq list` printed") from None
    return value


def seconds(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number of seconds") from None
    if not 0 < number < float("inf"):
        raise argparse.ArgumentTypeError(f"a number of seconds more than 0 and finite, not {value}")
    return number


def amount(value: str) -> Decimal:
    from app.money import checked_balance, written_plainly

    try:
        return checked_balance(Decimal(written_plainly(value)))
    except InvalidOperation as exc:
        raise argparse.ArgumentTypeError(f"{value!r} is not an amount") from exc
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc
