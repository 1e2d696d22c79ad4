"""API keys: issued once, stored only as a SHA-256 digest, looked up on every request.

A key carries 256 bits of randomness, so a fast digest is as safe as a slow password hash here
and keeps authentication to one indexed lookup per request.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from dataclasses import dataclass
from functools import cache

from sqlalchemy import bindparam, select

from app.config import get_settings
from app.db import transaction
from app.errors import Forbidden, NotFound, Unauthorized
from app.models import User, table
from app.prepared import Prepared

KEY_PREFIX = "aq_"


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: what every service that checks ownership or admin rights needs."""

    id: int
    name: str
    is_admin: bool

    def require_admin(self) -> None:
        if not self.is_admin:
            raise Forbidden("This route is for administrators.")


def admin_principal(user_id: int) -> Principal:
    """The command line names its administrator by id, holding no key: it is refused, as the admin routes refuse a
    user's key, unless that user is one, and acts as that principal, since a test run records who ran it."""
    with transaction() as session:
        user = session.get(User, user_id)
        if user is None:
            raise NotFound(f"No user has id {user_id}.")
        if not user.is_admin:
            raise Forbidden(f"User {user_id} is not an administrator; debugging is for administrators.")
        return Principal(id=user.id, name=user.name, is_admin=True)


def new_api_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_api_key(api_key: str) -> str:
    return hashlib.sha256(api_key.encode()).hexdigest()


_CACHE_SECONDS = 10.0
_CACHE_SIZE = 10_000
_known: dict[str, tuple[float, Principal]] = {}


class _Forgotten:
    """How many times this process forgot keys: a read that began before the latest forget is not cached."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.generation = 0


_forgotten = _Forgotten()


@cache
def _key_owner() -> Prepared:
    users = table(User)
    return Prepared(select(users.c.id, users.c.name, users.c.is_admin)
                    .where(users.c.api_key_hash == bindparam("digest")))


def authenticate(api_key: str | None) -> Principal:
    """Who holds this key. Known keys are remembered for a few seconds per process, which saves a
    transaction on every request: a key replaced (`app.users.replace_api_key`) or an admin flag changed
    in the database takes effect within `_CACHE_SECONDS` in the processes that saw the old one."""
    if not api_key:
        raise Unauthorized("Send your API key as 'Authorization: Bearer <key>'.", code="missing_api_key")
    digest = hash_api_key(api_key)
    now = time.monotonic()
    cached = _known.get(digest)
    if cached is not None and cached[0] > now:
        return cached[1]
    generation = _forgotten.generation
    with transaction() as session:
        row = _key_owner()(session, {"digest": digest}).first()
    if row is None:
        raise Unauthorized("The API key is not known.", code="invalid_api_key")
    principal = Principal(id=row.id, name=row.name, is_admin=row.is_admin)
    with _forgotten.lock:
        # A key replaced while this read was under way may be the one read: not remembered then.
        if _forgotten.generation == generation:
            if len(_known) >= _CACHE_SIZE:
                _known.clear()
            _known[digest] = (now + _CACHE_SECONDS, principal)
    return principal


def still_admits(api_key: str, user_id: int) -> bool:
    """Whether the key still opens the user's account: an open answer stream asks between reads, so that a
    replaced key stops the streams it opened as it stops requests, within `_CACHE_SECONDS` (they ran to their
    end before, up to `AGENTQ_STREAM_MAX_SECONDS`: a leaked key replaced went on reading its answers)."""
    try:
        return authenticate(api_key).id == user_id
    except Unauthorized:
        return False


def bearer_token_of(header: str) -> str | None:
    """The token of an `Authorization: Bearer <token>` header; None for any other header or none."""
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def check_metrics_token(token: str | None) -> None:
    """/metrics (the API's, and the worker group's counters server) answers anyone, as Prometheus expects of a
    target, unless `AGENTQ_METRICS_TOKEN` is set: then only a scraper that sends it as a bearer token
    (Prometheus's `authorization` of a scrape config)."""
    expected = get_settings().metrics_token
    if expected is None:
        return
    if token is None or not hmac.compare_digest(token.encode(), expected.get_secret_value().encode()):
        raise Unauthorized("Send the metrics token (AGENTQ_METRICS_TOKEN) as 'Authorization: Bearer <token>'.",
                           code="invalid_metrics_token")


def forget_keys_of(user_id: int) -> None:
    """This process stops accepting the keys it remembers for the user at once (the others within
    `_CACHE_SECONDS`)."""
    with _forgotten.lock:
        _forgotten.generation += 1
        for digest, (_, principal) in list(_known.items()):
            if principal.id == user_id:
                _known.pop(digest, None)
