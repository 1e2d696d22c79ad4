"""Operator commands of `agentq`: dead letters and admin debugging from a shell."""

from __future__ import annotations

import argparse


def add_ops_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Filled in by the operations and debugging features."""
