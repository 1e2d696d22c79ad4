"""What every `agentq` command prints: one JSON object a line, as the HTTP API would answer."""

from __future__ import annotations

import json
import sys


def print_json(payload: object) -> None:
    """Flushed at once: a reader that went away is noticed here, inside the command (`cli.main`), not in
    the interpreter's last flush at exit."""
    print(json.dumps(payload, ensure_ascii=False, default=str), flush=True)


def print_error(code: str, message: str) -> None:
    """The contract's error object, on stderr."""
    print(json.dumps({"error": {"code": code, "message": message}}, ensure_ascii=False), file=sys.stderr)


def print_warning(code: str, message: str) -> None:
    """Something the command went on despite, on stderr, in the error object's shape."""
    print(json.dumps({"warning": {"code": code, "message": message}}, ensure_ascii=False), file=sys.stderr)
