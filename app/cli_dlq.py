"""`agentq dlq list / show ID / requeue ID|--all / purge ID|--all`."""

from __future__ import annotations

import argparse


def add_dlq_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Registered by the dead-letter feature."""
