"""`agentq debug route|prompt|execute AGENT_ID "content"`."""

from __future__ import annotations

import argparse


def add_debug_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Registered by the admin debugging feature."""
