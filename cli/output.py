"""What every `agentq` command prints: one JSON object a line, as the HTTP API would answer."""

from __future__ import annotations

import json
import sys


def print_json(payload: object) -> None:
    print(json.dumps(payload, ensure_ascii=False, default=str))


def print_error(code: str, message: str) -> None:
    """The contract's error object, on stderr."""
    print(json.dumps({"error": {"code": code, "message": message}}, ensure_ascii=False), file=sys.stderr)
