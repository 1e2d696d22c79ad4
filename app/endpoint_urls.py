"""Which `base_url` a model may have: one a worker can connect to, refused when an admin writes it rather than found
broken by every turn that calls it.

Pydantic's URL parser applies the WHATWG rules, which let through what a connection cannot use: the whitespace and
control characters they drop silently, port 0, a host name label over 63 characters, and `http:v1`, `http:///v1`
or backslashes, read as `http://v1/`, while the value is stored and used as written and the workers' HTTP client
finds no host in it. The API's request models ask here (their 422 names the field), and so does the catalog for
every other writer (`agentq demo seed --mock-url`).

No endpoint may be at a link-local address (169.254.0.0/16, fe80::/10): cloud metadata services answer there,
with the machine's credentials, and a failed call's error shows an admin what its endpoint said; no model
server lives there. A URL naming one is refused when it is written, and a host name that resolves to one is
refused at each connect (`app.upstream_connect.connect`).

An endpoint is the API's base: the openai SDK adds the operation's path (`/chat/completions`, `/moderations`), so a
URL that already ends with it (a provider's documentation often shows the whole path) is called at that path twice
and answers 404 to every call; it is refused, naming the ending to drop.
"""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

from pydantic import AnyHttpUrl, TypeAdapter, ValidationError

from app.errors import ValidationFailed

_HTTP_URL = TypeAdapter(AnyHttpUrl)


CHAT_PATH = "/chat/completions"
MODERATION_PATH = "/moderations"


def refusal(value: str, operation: str = CHAT_PATH) -> str | None:
    """Why `value` is not a usable endpoint for `operation` (the path the SDK adds), or None when it is."""
    if any(char.isspace() or not char.isprintable() for char in value):
        return "must not contain whitespace or control characters"
    try:
        url = _HTTP_URL.validate_python(value)
    except ValidationError as exc:
        return f"must be an http:// or https:// URL ({exc.errors()[0]['msg']})"
    if url.port == 0 or any(len(label) > 63 for label in (url.host or "").split(".")):
        return "must be an http:// or https:// URL with a usable host and port"
    parts = urlsplit(value)
    if "\\" in value or not parts.hostname or not value.lower().startswith(("http://", "https://")):
        return "must be written as http://host/… or https://host/…"
    if is_link_local(parts.hostname):
        return LINK_LOCAL_REFUSED
    if parts.path.rstrip("/").lower().endswith(operation):
        return (f"must be the API's base URL, to which the client adds {operation}: drop {operation} from its end "
                "(https://host/v1)")
    return None


LINK_LOCAL_REFUSED = "must not be at a link-local address (169.254.0.0/16, fe80::/10), where cloud metadata answers"


def is_link_local(host: str) -> bool:
    """Whether `host`, an address as written or as the name service gave it, is link-local (an IPv4 one
    written as IPv6 too); a host name is not an address, and is judged by what it resolves to."""
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    mapped = address.ipv4_mapped if isinstance(address, ipaddress.IPv6Address) else None
    return address.is_link_local or (mapped is not None and mapped.is_link_local)


def check_endpoint_url(value: str | None) -> None:
    """422 for a model whose `base_url` no worker could connect to."""
    if value is not None and (refused := refusal(value)) is not None:
        raise ValidationFailed(f"base_url: {refused}.")
