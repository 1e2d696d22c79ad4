"""The upstream clients of a process: one openai client, and so one connection pool, per endpoint and key for the
life of the process, and which key is sent to which endpoint.

A model's key is read from the variable its `api_key_env` names (`app.key_variables` says which it may name);
the platform's `OPENAI_API_KEY` goes only to OpenAI's own endpoint, never to a server an admin chose unless its
model names it.
"""

from __future__ import annotations

import os
import threading
from urllib.parse import urlsplit

import httpx2

from app.key_variables import key_in, refusal
from app.model_target import ModelTarget
from app.openai_sdk import openai
from app.upstream_transport import ShardedTransport

PLACEHOLDER_API_KEY = "sk-no-key-configured"
"""Sent where no key is configured (a local server that takes none): the SDK refuses to build a client
without one."""

_clients: dict[tuple[str | None, str], openai.OpenAI] = {}
_clients_lock = threading.Lock()


THREADS_PER_POOL = 32
"""Threads that share one upstream connection pool (see `app.upstream_transport.ShardedTransport`)."""

_pools_per_client = 1


def size_pools(threads: int) -> None:
    """A worker process running `threads` turns at once splits each client's connections into pools of
    at most `THREADS_PER_POOL` threads; called at boot, before the first client is made."""
    global _pools_per_client
    _pools_per_client = max(1, -(-threads // THREADS_PER_POOL))


def _new_client(api_key: str, base_url: str | None) -> openai.OpenAI:
    transport = ShardedTransport(_pools_per_client,
                                 httpx2.Limits(max_connections=4000, max_keepalive_connections=1000))
    return openai.OpenAI(api_key=api_key, base_url=base_url, max_retries=0,
                         http_client=openai.DefaultHttpx2Client(transport=transport))


class EndpointUnusable(ValueError):
    """A model's endpoint cannot be called as configured because the variable its key is read from is not
    set. A URL that does not parse (a row written before the API checked it) fails the same way, as the
    transport's own `InvalidURL`."""


PLATFORM_KEY_HOST = "api.openai.com"
"""The one host `OPENAI_API_KEY` is sent to without being named (the SDK's default endpoint's), over https."""


def api_key_for(api_key_env: str | None, base_url: str | None) -> str:
    """The key in the variable `api_key_env` names. An endpoint that names none gets `OPENAI_API_KEY` when it
    is OpenAI's own, and a placeholder otherwise (a local server needs none, and the SDK builds no client
    without one): the platform's key is not sent to a server an admin chose unless its model names it. A
    named variable that is not set is an error, not a reason to send another key."""
    if api_key_env:
        if (key := key_in(api_key_env)) is None:
            raise EndpointUnusable(f"the variable {api_key_env} that holds its API key is not set")
        return key
    endpoint = urlsplit(base_url) if base_url is not None else None
    if endpoint is None or (endpoint.scheme == "https" and endpoint.hostname == PLATFORM_KEY_HOST):
        return os.environ.get("OPENAI_API_KEY", "") or PLACEHOLDER_API_KEY
    return PLACEHOLDER_API_KEY


def client_for(target: ModelTarget) -> openai.OpenAI:
    """A model's client; its `api_key_env` must name a variable that may hold a model's key
    (`app.key_variables`), here too, for a row written before the operator narrowed them."""
    if (refused := refusal(target.api_key_env)) is not None:
        raise EndpointUnusable(refused)
    return client_at(target.base_url, target.api_key_env)


def client_at(base_url: str | None, api_key_env: str | None) -> openai.OpenAI:
    """One client, and so one connection pool, per endpoint and key for the life of the process."""
    api_key = api_key_for(api_key_env, base_url)
    cache_key = (base_url, api_key)
    client = _clients.get(cache_key)
    if client is None:
        with _clients_lock:
            client = _clients.get(cache_key)
            if client is None:
                client = _clients[cache_key] = _new_client(api_key, base_url)
    return client


def warm_up() -> None:
    """The first client of a process imports the HTTP stack (httpcore2, anyio, trio, truststore: about
    half a second of CPU); a worker pays for it while it boots, not in its first wave of turns."""
    import encodings.idna  # noqa: F401  (imported by the first request's host name)

    _new_client(PLACEHOLDER_API_KEY, "http://127.0.0.1:9/v1").close()


def reset_clients() -> None:
    with _clients_lock:
        _clients.clear()
