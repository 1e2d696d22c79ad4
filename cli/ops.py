"""Operator commands of `agentq`: dead letters and admin debugging from a shell."""

from __future__ import annotations

import argparse

from cli.debug import add_debug_commands
from cli.dlq import add_dlq_commands


def add_ops_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    add_dlq_commands(sub)
    add_debug_commands(sub)
