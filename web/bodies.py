"""Request bodies as the routes take them: JSON objects of a bounded size, parsed without a server error
whatever the client sent (too deep, too long a number, a string instead of an object, a chunked body
past the route's limit)."""

from __future__ import annotations

import sys
from decimal import Decimal, InvalidOperation
from json import JSONDecodeError
from typing import Any

from flask import Response, current_app, request
from flask.json.provider import DefaultJSONProvider
from werkzeug.exceptions import RequestEntityTooLarge

from web.errors import error_response


def _json_integer(literal: str) -> int | Decimal:
    """An integer literal too long for Python's int parsing (its guard against quadratic time, 4,300 digits
    by default) is kept as a Decimal, which no integer or money field accepts: 422 for that field, not a
    body that is not JSON (400)."""
    limit = sys.get_int_max_str_digits()
    return int(literal) if not limit or len(literal.lstrip("-")) <= limit else Decimal(literal)


def _json_fraction(literal: str) -> Decimal:
    """A number with a fraction or an exponent, exactly; one whose exponent is past what a Decimal holds
    (`1e999999999999999999999`) is a body that cannot be read (400), where Decimal's own error was a 500."""
    try:
        return Decimal(literal)
    except InvalidOperation as exc:
        raise ValueError(f"the number {literal[:40]} is out of range") from exc


def _not_json(constant: str) -> Any:
    """`NaN`, `Infinity` and `-Infinity`, which Python's parser takes and JSON (RFC 8259) has not: a body
    holding one was accepted (a turn ran for `{"content": "x", "extra": NaN}`)."""
    raise ValueError(f"{constant} is not a JSON value")


class SafeJSONProvider(DefaultJSONProvider):
    """A body nested thousands of levels deep is malformed input, not a server error; a huge integer is a
    field's invalid value. A number with a fraction or an exponent is read exactly, as a Decimal: money sent
    as a number was rounded as a binary float before its six-decimal check (0.99999999999999999 was credited
    as 1.000000); a float field takes it as a float (`web.schemas.Temperature`)."""

    def loads(self, s: str | bytes, **kwargs: Any) -> Any:
        try:
            return super().loads(s, parse_int=_json_integer, parse_float=_json_fraction, parse_constant=_not_json,
                                 **kwargs)
        except RecursionError as exc:
            raise ValueError("it is nested too deeply to be read") from exc


def body_limit(chars: int) -> int:
    """The most a JSON body carrying `chars` characters of text can take: 12 bytes for the escaped form of
    a character outside the BMP (`\\ud83d\\ude00`), and room for the other fields. Enforced before the body is
    read, so a client cannot make a worker read and parse megabytes only to be told 413 afterwards."""
    return chars * 12 + 64 * 1024


def require_object_body() -> Response | None:
    """flask-openapi3 would parse a JSON *string* body as a second JSON document; refuse it. A chunked body
    has no length to refuse it by before it is read: Werkzeug stops reading it at the route's limit, and
    one that goes on past it is refused 413 here rather than parsed cut short (a 400 that blamed its JSON)."""
    if request.method not in ("POST", "PUT", "PATCH"):
        return None
    if (encoding := request.content_encoding) and encoding.strip().lower() != "identity":
        # Werkzeug does not decode a body: a gzipped one was refused as JSON it could not parse, and a plain one
        # that claimed to be gzipped was taken as it was.
        return error_response(400, "malformed_body", f"The request body must be sent as it is, not encoded "
                              f"(Content-Encoding: {encoding[:40]}).")
    body = request.get_data(cache=True)
    if _cut_at_the_limit(body):
        raise RequestEntityTooLarge()
    if body and not isinstance(request.get_json(silent=True), dict):
        return error_response(400, "malformed_body", "The request body must be a JSON object, sent with "
                              f"Content-Type: application/json{_why_it_is_not(body)}.")
    return None


def _why_it_is_not(body: bytes) -> str:
    """What a client must mend: the body's type, or where its JSON fails (the parser's own words)."""
    if not request.is_json:
        return f" (it was sent as {request.mimetype or 'no Content-Type'})"
    try:
        document = current_app.json.loads(body)
    except ValueError as exc:  # JSONDecodeError, a byte that is no UTF-8 (UnicodeDecodeError) and ours
        return f" ({'it is not JSON: ' if isinstance(exc, JSONDecodeError) else ''}{str(exc).rstrip('.')})"
    return f" (it is {_JSON_KINDS.get(type(document), 'another JSON value')})"


_JSON_KINDS: dict[type, str] = {list: "a JSON array", str: "a JSON string", int: "a JSON number",
                                Decimal: "a JSON number", float: "a JSON number", bool: "a JSON boolean",
                                type(None): "JSON null"}
"""What a parsed JSON document that is no object is, named as JSON names it, for the 400 that refuses it."""


def _cut_at_the_limit(body: bytes) -> bool:
    limit = request.max_content_length
    if request.content_length is not None or limit is None or len(body) < limit:
        return False
    return bool(request.environ["wsgi.input"].read(1))
