"""The Redis keys Dramatiq's Redis broker keeps a queue in: what operators' views read (the queue's length,
its retries waiting out their backoff, its dead letters), since Dramatiq 2 has no API for the delayed and dead
messages. Its layout is Dramatiq's; agentq only names it, under its broker namespace (AGENTQ_BROKER_NAMESPACE)."""

from __future__ import annotations

from app.config import get_settings


def namespaced(name: str) -> str:
    """A key under the broker namespace, `<namespace>:<name>`: the broker's own, and agentq's that go with its
    messages (`app.dispatch.receipt_key`), so that one namespace is one deployment's whole broker state."""
    return f"{get_settings().broker_namespace}:{name}"


def broker_key(queue: str, suffix: str = "") -> str:
    """The Redis broker's key for a queue, `<namespace>:<queue>` (its list of messages waiting), and its other
    keys by their suffix (below)."""
    return namespaced(f"{queue}{suffix}")


def delayed_bodies_key(queue: str) -> str:
    """The hash of the queue's delayed messages (retries waiting out their backoff), by message id."""
    return broker_key(queue, ".DQ.msgs")


def dead_ids_key(queue: str) -> str:
    """The sorted set of the queue's dead message ids, each scored by when it died."""
    return broker_key(queue, ".XQ")


def dead_bodies_key(queue: str) -> str:
    """The hash of the queue's dead messages, by message id."""
    return broker_key(queue, ".XQ.msgs")
