"""What every `agentq` command prints: one JSON object a line, as the HTTP API would answer."""

from __future__ import annotations

import json
import logging
import sys

from app.errors import error_object


def print_json(payload: object) -> None:
    """Flushed at once: a reader that went away is noticed here, inside the command (`cli.main`), not in
    the interpreter's last flush at exit."""
    print(json.dumps(payload, ensure_ascii=False, default=str), flush=True)


def print_error(code: str, message: str) -> None:
    """The contract's error object, on stderr."""
    print(json.dumps(error_object(code, message), ensure_ascii=False), file=sys.stderr)


def print_warning(code: str, message: str) -> None:
    """Something the command went on despite, on stderr, in the error object's shape."""
    print(json.dumps({"warning": {"code": code, "message": message}}, ensure_ascii=False), file=sys.stderr)


def failed(code: str, message: str) -> int:
    """Print the error object; the command's exit status: 2 for a setting the operator must mend
    (`invalid_configuration`, as argparse's usage errors are 2), 1 for any other failure."""
    print_error(code, message)
    return 2 if code == "invalid_configuration" else 1


class WarningLines(logging.Handler):
    """A command's log records at WARNING and above (Redis out of reach for `dlq list`, a send left to
    recovery) as warning lines, `print_warning`'s shape with the level as the code: Python's last-resort
    handler printed them as bare text among the command's JSON lines. A record's exception is said in one
    line, as the command's own errors are. A record of a Ctrl-C (SQLAlchemy's pool logs one that lands while it
    resets a connection) is not said: the interrupt is the command's one line (`cli.main.main`)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)

    def emit(self, record: logging.LogRecord) -> None:
        from app.outages import in_one_line

        if record.exc_info and isinstance(record.exc_info[1], KeyboardInterrupt):
            return
        try:
            message = record.getMessage()
            if record.exc_info and record.exc_info[1] is not None:
                message = f"{message} ({in_one_line(record.exc_info[1])})"
            print_warning(record.levelname.lower(), message)
        except Exception:  # a log call gone wrong is logging's to report, not the command's to fail on
            self.handleError(record)
