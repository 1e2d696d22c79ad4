"""The openai SDK, imported without its aiohttp transport.

The SDK imports that transport whenever aiohttp is installed (it is, for the mock upstream): about 0.3 s of
CPU at every start of a process that calls models, on a slow host. agentq's calls go through its own httpx
transport (`app.upstream_transport`), never that one, so its module is marked absent before the SDK is first
imported; the SDK then leaves its aiohttp client unavailable, which nothing here asks for. Every agentq module
takes the SDK from here.
"""

from __future__ import annotations

import sys

sys.modules.setdefault("openai._vendor.httpx_aiohttp", None)  # type: ignore[arg-type]  # None: "not importable"

import openai  # noqa: E402

__all__ = ["openai"]
