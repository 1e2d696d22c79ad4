"""Which `base_url` a model may have: one a worker can connect to, refused when an admin writes it rather than found
broken by every turn that calls it.

Pydantic's URL parser applies the WHATWG rules, which let through what a connection cannot use: the whitespace and
control characters they drop silently, port 0, a host name label over 63 characters, and `http:v1`, `http:///v1`
or backslashes, read as `http://v1/`, while the value is stored and used as written and the workers' HTTP client
finds no host in it. The API's request models ask here (their 422 names the field), and so does the catalog for
every other writer (`agentq demo seed --mock-url`).

No endpoint may be at a cloud's instance metadata address (`METADATA_NETWORKS`: every link-local address, and
the few elsewhere that clouds use): the metadata service answers with the machine's credentials, a failed
call's error shows an admin what its endpoint said, and no model server lives there. An address inside IPv6
(IPv4-mapped, 6to4, NAT64) is judged by the IPv4 address it carries. A URL naming one is refused when it is
written, and a host name that resolves to one at each connect (`app.upstream_connect.connect`).

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
    if is_metadata_address((url.host or "").strip("[]")):  # as the URL parser normalised it: 0xa9fea9fe too
        return METADATA_REFUSED
    if parts.path.rstrip("/").lower().endswith(operation):
        return (f"must be the API's base URL, to which the client adds {operation}: drop {operation} from its end "
                "(https://host/v1)")
    return None


METADATA_NETWORKS = tuple(ipaddress.ip_network(network) for network in (
    "169.254.0.0/16", "fe80::/10",  # link-local: AWS, GCP, Azure, Oracle, DigitalOcean, OpenStack at 169.254.169.254
    "fd00:ec2::254/128", "fd00:ec2::23/128",  # AWS's IMDS and its EKS Pod Identity agent over IPv6
    "fd20:ce::254/128",  # GCP's metadata server on an IPv6-only VM
    "100.100.100.200/32",  # Alibaba Cloud's
))
METADATA_REFUSED = "must not be at a cloud's instance metadata address (link-local, or one a cloud keeps elsewhere)"
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def is_metadata_address(host: str) -> bool:
    """Whether `host`, an address as the URL parser or the name service gave it, is in `METADATA_NETWORKS`,
    itself or the IPv4 address it carries; a host name is no address, and is judged by what it resolves to."""
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    candidates: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = [address]
    if isinstance(address, ipaddress.IPv6Address):
        candidates += [carried for carried in (address.ipv4_mapped, address.sixtofour) if carried is not None]
        if address in _NAT64:
            candidates.append(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
    return any(candidate in network for candidate in candidates for network in METADATA_NETWORKS
               if candidate.version == network.version)


def check_endpoint_url(value: str | None) -> None:
    """422 for a model whose `base_url` no worker could connect to."""
    if value is not None and (refused := refusal(value)) is not None:
        raise ValidationFailed(f"base_url: {refused}.")
