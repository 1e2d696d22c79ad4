"""A table of bad inputs, each with its exact status and error code; no input yields a 5xx."""

from __future__ import annotations

import base64
from typing import TYPE_CHECKING, Any

import pytest

from app.config import get_settings
from tests.conftest import MOCK_URL

if TYPE_CHECKING:
    from tests.conftest import World


def cursor(raw: str) -> str:
    return base64.urlsafe_b64encode(raw.encode()).decode()


@pytest.fixture
def setup(world: World) -> dict[str, Any]:
    agent_id = world.agent(world.model())
    user_id, key = world.user()
    conversation_id = world.conversation(key, agent_id)
    return {"key": key, "admin": world.admin_key, "conversation": conversation_id, "agent": agent_id,
            "user": user_id}


BIG = "x" * (get_settings().max_content_chars + 1)

CASES = [
    # (who, method, path, body or raw bytes, status, code)
    ("user", "POST", "/api/conversations/{c}/messages", b"not json", 400, "malformed_body"),
    ("user", "POST", "/api/conversations/{c}/messages", b"[1, 2]", 400, "malformed_body"),
    ("user", "POST", "/api/conversations/{c}/messages", b'"{\\"content\\": \\"x\\"}"', 400, "malformed_body"),
    ("user", "POST", "/api/conversations/{c}/messages", b"null", 400, "malformed_body"),
    ("user", "POST", "/api/conversations/{c}/messages", b"[" * 5000, 400, "malformed_body"),
    ("user", "POST", "/api/conversations/{c}/messages", b"", 400, "malformed_body"),
    ("user", "POST", "/api/conversations/{c}/messages", b"\xff\xfe", 400, "malformed_body"),
    ("user", "POST", "/api/conversations/{c}/messages", {}, 422, "validation_failed"),
    ("user", "POST", "/api/conversations/{c}/messages", {"content": 5}, 422, "validation_failed"),
    ("user", "POST", "/api/conversations/{c}/messages", {"content": None}, 422, "validation_failed"),
    ("user", "POST", "/api/conversations/{c}/messages", {"content": "   "}, 422, "validation_failed"),
    ("user", "POST", "/api/conversations/{c}/messages", {"content": BIG}, 413, "content_too_large"),
    # A body larger than any content this route takes is refused before it is read, short content or not.
    ("user", "POST", "/api/conversations/{c}/messages", {"content": "hi", "pad": "x" * 1_000_000}, 413,
     "content_too_large"),
    ("user", "POST", "/api/conversations/{c}/messages", b'{"content": "hi \\ud800"}', 422, "validation_failed"),
    ("user", "POST", "/api/conversations/{c}/messages", {"content": "nul \x00 byte"}, 422, "validation_failed"),
    ("user", "POST", "/api/conversations", {"agent_id": 1, "title": "a\x00b"}, 422, "validation_failed"),
    ("user", "POST", "/api/conversations/999999/messages", {"content": "hi"}, 404, "not_found"),
    ("user", "POST", "/api/conversations/99999999999999999999/messages", {"content": "hi"}, 404, "not_found"),
    ("user", "POST", "/api/conversations/-1/messages", {"content": "hi"}, 404, "not_found"),
    ("user", "POST", "/api/conversations/abc/messages", {"content": "hi"}, 404, "not_found"),
    ("user", "POST", "/api/conversations/0{c}/messages", {"content": "hi"}, 404, "not_found"),
    ("admin", "DELETE", "/api/admin/agents/0{a}", None, 404, "not_found"),
    # An unknown id is 404 before the content is judged.
    ("user", "POST", "/api/conversations/999999/messages", {"content": "   "}, 404, "not_found"),
    ("user", "POST", "/api/conversations/999999/messages", {"content": BIG}, 404, "not_found"),
    ("admin", "POST", "/api/admin/agents/999999/debug/route", {"content": "   "}, 404, "not_found"),
    ("admin", "POST", "/api/admin/agents/999999/debug/prompt", {"content": BIG}, 404, "not_found"),
    ("admin", "POST", "/api/admin/agents/999999/debug/execute", {"content": "   "}, 404, "not_found"),
    ("user", "GET", "/api/messages/0", None, 404, "not_found"),
    # An id out of range is not found under every method; a PATCH or DELETE of one was answered 405.
    ("admin", "PATCH", "/api/admin/models/0", {"name": "x"}, 404, "not_found"),
    ("admin", "DELETE", "/api/admin/agents/9223372036854775808", None, 404, "not_found"),
    ("user", "DELETE", "/api/conversations/0", None, 404, "not_found"),
    ("user", "GET", "/api/conversations/99999999999999999999/messages", None, 404, "not_found"),
    ("admin", "DELETE", "/api/admin/dead-letters/0", None, 404, "not_found"),
    ("user", "GET", "/api/nowhere", None, 404, "not_found"),
    ("user", "PUT", "/api/conversations/{c}", {}, 405, "method_not_allowed"),
    ("user", "POST", "/api/conversations", {"agent_id": "one"}, 422, "validation_failed"),
    ("user", "POST", "/api/conversations", {"agent_id": 0}, 422, "validation_failed"),
    ("user", "POST", "/api/conversations", {"agent_id": 2**70}, 422, "validation_failed"),
    ("user", "POST", "/api/conversations", {"agent_id": 999999}, 404, "not_found"),
    ("user", "POST", "/api/conversations", {"agent_id": "{a}", "title": "t" * 501}, 422, "validation_failed"),
    ("user", "GET", "/api/conversations?limit=0", None, 422, "validation_failed"),
    ("user", "GET", "/api/conversations?limit=abc", None, 422, "validation_failed"),
    ("user", "GET", "/api/conversations?cursor=%%%", None, 422, "invalid_cursor"),
    ("user", "GET", f"/api/conversations?cursor={cursor('2026-01-01T00:00:00+00:00|99999999999999999999999')}",
     None, 422, "invalid_cursor"),
    ("user", "GET", f"/api/conversations?cursor={cursor('0001-01-01T00:00:00+05:00|1')}", None, 422,
     "invalid_cursor"),
    *[("user", "GET", f"/api/conversations?cursor={cursor(forged)}", None, 422, "invalid_cursor")
      for forged in ("2026-12-04|1", "2026-12-04T14:45:19.620878|1", "2026-12-04T14:45:19.620878+00:00| 5",
                     "2026-12-04T14:45:19.620878+00:00|\uff11", "2026-12-04T15:45:19.620878+01:00|5")],
    ("user", "GET", "/api/me/transactions?limit=0", None, 422, "validation_failed"),
    ("user", "GET", "/api/me/transactions?cursor=-5", None, 422, "validation_failed"),
    ("admin", "POST", "/api/admin/models", {"name": "m"}, 422, "validation_failed"),
    ("admin", "POST", "/api/admin/models", {"name": "m", "model": "x", "input_price_per_1k": "-1",
                                            "output_price_per_1k": "1"}, 422, "validation_failed"),
    ("admin", "POST", "/api/admin/models", {"name": "m", "model": "x", "input_price_per_1k": "NaN",
                                            "output_price_per_1k": "1"}, 422, "validation_failed"),
    ("admin", "POST", "/api/admin/models", {"name": "m", "model": "x", "input_price_per_1k": "0.0000001",
                                            "output_price_per_1k": "1"}, 422, "validation_failed"),
    ("admin", "POST", "/api/admin/models", {"name": "primary", "model": "x", "input_price_per_1k": "1",
                                            "output_price_per_1k": "1"}, 409, "name_taken"),
    ("admin", "POST", "/api/admin/models", {"name": "m", "model": "x", "base_url": "ftp://x",
                                            "input_price_per_1k": "1", "output_price_per_1k": "1"},
     422, "validation_failed"),
    *(("admin", "POST", "/api/admin/models", {"name": "m", "model": "x", "base_url": url,
                                              "input_price_per_1k": "1", "output_price_per_1k": "1"},
       422, "validation_failed")
      for url in ("http://", "http://[", "http://a b/v1", "http://127.0.0.1:99999/v1", "http://127.0.0.1:0/v1",
                  "http://127.0.0.1:8080/v1\r\nX-Injected: 1", "http://" + "a" * 64 + ".example/v1",
                  # Read as http://v1/ by the WHATWG rules, but stored as written, where the workers' client
                  # finds no host: every turn of the agent failed.
                  "http:///v1", "http:v1", "http:/v1", "http:\\\\host\\v1")),
    ("admin", "POST", "/api/admin/models", {"name": "  ", "model": "x", "input_price_per_1k": "1",
                                            "output_price_per_1k": "1"}, 422, "validation_failed"),
    ("admin", "POST", "/api/admin/agents", {"name": "a", "system_prompt": "s", "model_id": 999999},
     404, "not_found"),  # an unknown id, in a body as in a path (an unknown agent_id is 404 too)
    ("admin", "POST", "/api/admin/agents", {"name": "a", "system_prompt": "s", "model_id": 1,
                                            "timeout_seconds": 0}, 422, "validation_failed"),
    ("admin", "POST", "/api/admin/agents", {"name": "a", "system_prompt": "s", "model_id": 1,
                                            "timeout_seconds": 3601}, 422, "validation_failed"),
    ("admin", "POST", "/api/admin/agents", {"name": "a", "system_prompt": "s", "model_id": 1,
                                            "temperature": 3}, 422, "validation_failed"),
    ("admin", "PATCH", "/api/admin/agents/{a}", {"model_id": None}, 422, "validation_failed"),
    ("admin", "PATCH", "/api/admin/agents/{a}", {"timeout_seconds": None}, 422, "validation_failed"),
    ("admin", "PATCH", "/api/admin/agents/{a}", {"name": None}, 422, "validation_failed"),
    ("admin", "PATCH", "/api/admin/agents/{a}", {"temperature": True}, 422, "validation_failed"),
    ("admin", "PATCH", "/api/admin/models/1", {"name": None}, 422, "validation_failed"),
    ("admin", "PATCH", "/api/admin/models/1", {"input_price_per_1k": None}, 422, "validation_failed"),
    ("admin", "POST", "/api/admin/users", {"name": "nul\x00"}, 422, "validation_failed"),
    ("admin", "POST", "/api/admin/users/{u}/credits", {"amount": "999999999999.999999"}, 422, "balance_too_large"),
    ("admin", "DELETE", "/api/admin/models/1", None, 409, "model_in_use"),
    ("admin", "POST", "/api/admin/users", {"name": ""}, 422, "validation_failed"),
    ("admin", "POST", "/api/admin/users", {"name": "x", "balance": "-1"}, 422, "validation_failed"),
    ("admin", "POST", "/api/admin/users", {"name": "x", "is_admin": "yes"}, 422, "validation_failed"),
    ("admin", "POST", "/api/admin/users/1/credits", {"amount": "abc"}, 422, "validation_failed"),
    # Python's Decimal reads these (5000, 10, 1000): a typo would be credited as what it happens to mean
    ("admin", "POST", "/api/admin/users", {"name": "x", "balance": "5_000"}, 422, "validation_failed"),
    ("admin", "POST", "/api/admin/users", {"name": "x", "balance": "\u0661\u0660"}, 422, "validation_failed"),
    ("admin", "POST", "/api/admin/users/1/credits", {"amount": "1e3"}, 422, "validation_failed"),
    ("admin", "POST", "/api/admin/models", {"name": "m", "model": "x", "input_price_per_1k": "0.5_0",
                                            "output_price_per_1k": "1"}, 422, "validation_failed"),
    ("admin", "POST", "/api/admin/users/1/credits", {}, 422, "validation_failed"),
    # A JSON object with an integer past Python's 4,300-digit parsing guard is still a JSON object.
    ("admin", "POST", "/api/admin/users/1/credits", b'{"amount": 1' + b"0" * 4300 + b"}", 422, "validation_failed"),
    ("user", "POST", "/api/conversations", b'{"agent_id": 1' + b"0" * 5000 + b"}", 422, "validation_failed"),
    # Money sent as a JSON number is read exactly: rounded as a binary float first, these were taken as 1.000000.
    ("admin", "POST", "/api/admin/users/1/credits", b'{"amount": 0.99999999999999999}', 422, "validation_failed"),
    ("admin", "POST", "/api/admin/models", b'{"name": "m", "model": "x", "output_price_per_1k": 1, '
                                           b'"input_price_per_1k": 0.' + b"9" * 5000 + b"}", 422, "validation_failed"),
]


@pytest.mark.parametrize(("who", "method", "path", "body", "status", "code"), CASES)
def test_bad_input_gets_its_exact_status(
        setup: dict[str, Any], world: World, who: str, method: str, path: str, body: bytes | dict[str, Any] | None,
        status: int, code: str) -> None:
    key = setup["key"] if who == "user" else setup["admin"]
    url = path.format(c=setup["conversation"], a=setup["agent"], u=setup["user"])
    if isinstance(body, bytes):
        response = world.api.call(method, url, key, data=body, content_type="application/json")
    else:
        response = world.api.call(method, url, key, json=body)
    assert response.status_code == status, response.get_data(as_text=True)[:300]
    assert response.json["error"]["code"] == code
    assert response.json["error"]["message"]


HTTP_REFUSALS = [
    # (raw request, status, code): requests the HTTP server refuses before the application sees them
    (b"GARBAGE\r\n\r\n", 400, "malformed_request"),
    (b"GET /api/me HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n", 400, "malformed_request"),
    (b"POST /api/me HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n", 400, "malformed_request"),
    # gunicorn's own answer to a transfer coding it does not know is 501; the client's input is never a 5xx here
    (b"POST /api/me HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: br\r\n\r\n", 400, "malformed_request"),
    (b"GET /api/me HTTP/1.1\r\nHost: x\r\nExpect: 200-ok\r\n\r\n", 417, "expectation_failed"),
    # gunicorn's own answer is a 500 (its SCRIPT_NAME is taken from a header of a trusted address, 127.0.0.1)
    (b"GET /api/me HTTP/1.1\r\nHost: x\r\nSCRIPT_NAME: /zzz\r\n\r\n", 400, "malformed_request"),
    (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414, "uri_too_long"),
    (b"GET /api/me HTTP/1.1\r\nHost: x\r\n" + b"X-A: b\r\n" * 200 + b"\r\n", 431, "headers_too_large"),
]


@pytest.mark.parametrize(("raw", "status", "code"), HTTP_REFUSALS)
def test_a_request_the_http_server_cannot_read_gets_the_apis_error_shape(
        web_server: str, raw: bytes, status: int, code: str) -> None:
    """gunicorn answers these itself, before Flask; the answer is still JSON with the error's code."""
    import json
    import socket
    from urllib.parse import urlsplit

    address = urlsplit(web_server)
    with socket.create_connection((address.hostname, address.port), timeout=10) as connection:
        connection.sendall(raw)
        answer = b""
        while chunk := connection.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    assert int(lines[0].split()[1]) == status, answer[:300]
    assert "Content-Type: application/json" in lines
    error = json.loads(body)["error"]
    assert error["code"] == code and error["message"].startswith("The HTTP request could not be read: ")


def test_a_query_of_the_longest_cursor_the_document_allows_is_read(web_server: str, world: World) -> None:
    """A 500-character cursor of characters outside the BMP is 6,000 bytes percent-encoded: gunicorn's default
    request line limit (4,094) answered it 414, a status the document did not name. It is read, and refused by
    the application as any bad cursor is."""
    import httpx

    _, key = world.user("long-cursor")
    answer = httpx.get(f"{web_server}/api/conversations?cursor=" + "%F0%9F%98%80" * 500,
                       headers={"Authorization": f"Bearer {key}"})
    assert (answer.status_code, answer.json()["error"]["code"]) == (422, "invalid_cursor")


def test_a_body_refused_unread_closes_its_connection_so_the_next_request_is_answered(
        web_server: str, world: World) -> None:
    """A 413 is answered before the body is read; gunicorn then drains at most 64 KiB of it and closes the
    connection, after a response that said `keep-alive`: the client's next request on it got no answer."""
    import httpx

    _, key = world.user()
    with httpx.Client(base_url=web_server, headers={"Authorization": f"Bearer {key}"}, timeout=30) as client:
        small = client.get("/api/me")
        assert (small.status_code, small.headers["connection"]) == (200, "keep-alive")
        big = client.post("/api/conversations", content=b'{"agent_id": 1, "x": "' + b"a" * 2_000_000 + b'"}',
                          headers={"Content-Type": "application/json"})
        assert (big.status_code, big.json()["error"]["code"], big.headers["connection"]) == (
            413, "content_too_large", "close")
        assert client.get("/api/me").status_code == 200


def _chunked_post(web_server: str, key: str, chunks: bytes) -> tuple[int, dict[str, Any]]:
    """POST /api/conversations with a chunked body written by hand, sent while the answer is read (a body
    refused before its end may be answered before it is all sent)."""
    import contextlib
    import json
    import socket
    import threading
    from urllib.parse import urlsplit

    address = urlsplit(web_server)
    head = (f"POST /api/conversations HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
            "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n").encode()
    with socket.create_connection((address.hostname, address.port), timeout=30) as connection:
        def send() -> None:
            with contextlib.suppress(OSError):  # the server answered and closed before the whole body was sent
                connection.sendall(head + chunks)

        sender = threading.Thread(target=send)
        sender.start()
        answer = b""
        while chunk := connection.recv(65536):
            answer += chunk
        sender.join()
    head_lines, _, body = answer.partition(b"\r\n\r\n")
    return int(head_lines.split()[1]), json.loads(body)["error"]


def _chunk(data: bytes) -> bytes:
    return f"{len(data):x}".encode() + b"\r\n" + data + b"\r\n0\r\n\r\n"


def test_a_chunked_body_that_is_malformed_or_over_the_limit_gets_its_4xx(web_server: str, world: World) -> None:
    """A chunked body has no Content-Length to refuse before it is read. One whose chunk size or chunk end is
    malformed raised out of gunicorn's reader into the application, a 500; one longer than the route takes was
    cut at its limit by Werkzeug and parsed short, a 400 that blamed its JSON. They are 400 and 413."""
    _, key = world.user()
    body = b'{"agent_id": 1}'
    assert _chunked_post(web_server, key, b"zz\r\n" + body + b"\r\n0\r\n\r\n")[0] == 400
    status, error = _chunked_post(web_server, key, b"5\r\n" + body + b"\r\n0\r\n\r\n")
    assert (status, error["code"]) == (400, "malformed_request")
    assert error["message"].startswith("The HTTP request body could not be read: ")
    status, error = _chunked_post(web_server, key, _chunk(b'{"title": "' + b"x" * 600_000 + b'", "agent_id": 1}'))
    assert (status, error["code"]) == (413, "content_too_large")
    status, error = _chunked_post(web_server, key, _chunk(b'{"title": "' + b"x" * 600 + b'", "agent_id": 1}'))
    assert (status, error["code"]) == (422, "validation_failed")


def test_a_text_over_its_length_is_told_in_characters(world: World) -> None:
    """Not pydantic's "items after validation", which its length bound said when it ran after the storable check."""
    _, key = world.user()
    titled = world.api.post("/api/conversations", key, {"agent_id": 1, "title": "t" * 501})
    assert (titled.status_code, titled.json["error"]["message"]) == (
        422, "Invalid value for 'title': String should have at most 500 characters.")
    conversation_id = world.conversation(key, world.agent(world.model()))
    keyed = world.send(key, conversation_id, "hi", headers={"Idempotency-Key": "k" * 201})
    assert (keyed.status_code, keyed.json["error"]["message"]) == (
        422, "Invalid value for 'Idempotency-Key': String should have at most 200 characters.")


@pytest.mark.parametrize(("path", "said"), [
    ("/nonexistent", "Nothing is found at this path."),
    ("/api/nowhere/7", "Nothing is found at this path."),
    ("/api/messages/abc", "Nothing is found at this path (ids are whole numbers from 1 to 999999999999999999)."),
    ("/api/messages/0/stream", "Nothing is found at this path (ids are whole numbers from 1 to 999999999999999999)."),
])
def test_only_a_path_that_a_whole_number_id_would_match_is_told_what_ids_are(
        world: World, path: str, said: str) -> None:
    """The hint about ids was given for any path, one that no id could make a route's as well."""
    _, key = world.user()
    answer = world.api.get(path, key)
    assert (answer.status_code, answer.json["error"]) == (404, {"code": "not_found", "message": said})


def test_a_method_a_route_lacks_is_refused_after_the_key_check(world: World) -> None:
    """Flask refused it 405 before any key was looked at: an anonymous caller learnt which methods an /api path
    has, where the contract says every /api route needs the key. OPTIONS is after the same check."""
    _, key = world.user()
    for anonymous in (world.api.call("PATCH", "/api/me"), world.api.call("PUT", "/api/admin/models")):
        assert (anonymous.status_code, anonymous.json["error"]["code"]) == (401, "missing_api_key")
        assert anonymous.headers["WWW-Authenticate"] == "Bearer"
    unknown = world.api.call("PATCH", "/api/me", "not-a-key")
    assert (unknown.status_code, unknown.json["error"]["code"]) == (401, "invalid_api_key")
    keyed = world.api.call("PATCH", "/api/me", key)
    assert (keyed.status_code, keyed.json["error"]["code"], set(keyed.headers["Allow"].split(", "))) == (
        405, "method_not_allowed", {"GET", "HEAD", "OPTIONS"})
    assert world.api.call("OPTIONS", "/api/me").status_code == 401
    assert world.api.call("OPTIONS", "/api/me", key).status_code == 204


def test_a_name_with_a_line_break_or_a_control_character_is_refused(world: World) -> None:
    """An admin's model named "a\\nb" or with an escape sequence wrote a second line, or a terminal's control
    sequence, into every log line that named it (a fallback's warning, a turn's end): a forged line. Names are
    one line of printable text; an emoji's joiner or a no-break space is still a name's."""
    said = "must not contain line breaks or control characters."
    model_body = {"model": "echo", "base_url": MOCK_URL, "input_price_per_1k": "0", "output_price_per_1k": "0"}
    for path, body, field in (("/api/admin/models", {**model_body, "name": "a\nb"}, "name"),
                              ("/api/admin/models", {**model_body, "name": "ok", "model": "gpt\x1b[2J"}, "model"),
                              ("/api/admin/agents", {"name": "a\rb", "system_prompt": "s", "model_id": 1}, "name"),
                              ("/api/admin/users", {"name": "x\u2028y"}, "name"),
                              ("/api/admin/users", {"name": "x\x85y"}, "name")):
        refused = world.api.post(path, world.admin_key, body)
        assert (refused.status_code, refused.json["error"]) == (422, {
            "code": "validation_failed", "message": f"Invalid value for '{field}': {said}"}), body
    family, spaced = "\U0001F468\u200D\U0001F469\u200D\U0001F467", "no\u00a0break"
    assert world.api.get(f"/api/admin/models/{world.model(family)}", world.admin_key).json["name"] == family
    assert world.api.post("/api/admin/users", world.admin_key, {"name": spaced}).status_code == 201


def test_a_validators_refusal_is_said_in_its_own_words(world: World) -> None:
    """pydantic's "Value error, " led each such sentence."""
    _, key = world.user()
    refused = world.api.post("/api/admin/users", world.admin_key, {"name": "x", "balance": "5_000"})
    assert (refused.status_code, refused.json["error"]["code"]) == (422, "validation_failed")
    assert refused.json["error"]["message"].startswith("Invalid value for 'balance': an amount is written")
    conversation_id = world.conversation(key, world.agent(world.model()))
    nul = world.send(key, conversation_id, "a\x00b")
    assert (nul.status_code, nul.json["error"]) == (422, {
        "code": "validation_failed", "message": "Invalid value for 'content': must not contain NUL characters."})


def test_an_unmatched_path_and_a_body_without_its_content_type_say_what_is_wrong(world: World) -> None:
    _, key = world.user()
    unmatched = world.api.get("/api/messages/0", key)
    assert (unmatched.status_code, unmatched.json["error"]) == (404, {
        "code": "not_found",
        "message": "Nothing is found at this path (ids are whole numbers from 1 to 999999999999999999)."})
    untyped = world.api.call("POST", "/api/conversations", key, data=b'{"agent_id": 1}', content_type="text/plain")
    assert (untyped.status_code, untyped.json["error"]) == (400, {
        "code": "malformed_body",
        "message": "The request body must be a JSON object, sent with Content-Type: application/json (it was sent as "
                   "text/plain)."})


def test_a_body_that_is_not_json_says_where_it_fails(world: World) -> None:
    """`NaN` and `Infinity` are not JSON (RFC 8259), though Python's parser takes them: a message whose body held
    one was accepted and its turn run, and a credit of `Infinity` was judged as a number (422). A body nested too
    deeply to read, or one that is no JSON at all, was told only that it must be a JSON object; a number whose
    exponent is past a Decimal's was a 500. JSON that is no object (an array, a string) was told to be sent as
    JSON, which it was: it is told what it is instead."""
    user_id, key = world.user()
    conversation_id = world.conversation(key, world.agent(world.model()))
    balance = world.api.get("/api/me", key).json["balance"]
    said = []
    for who, path, body in ((key, f"/api/conversations/{conversation_id}/messages", b'{"content": "x", "extra": NaN}'),
                            (world.admin_key, f"/api/admin/users/{user_id}/credits", b'{"amount": Infinity}'),
                            (world.admin_key, f"/api/admin/users/{user_id}/credits", b'{"amount": -Infinity}'),
                            (key, "/api/conversations", b'{"agent_id": ' + b"[" * 5000 + b"]" * 5000 + b"}"),
                            (key, "/api/conversations", b'{"agent_id": 1, "n": 1e999999999999999999999}'),
                            (key, "/api/conversations", b'{"agent_id": 1,}'),
                            (key, "/api/conversations", b"[1]"),
                            (key, "/api/conversations", b'"{\\"agent_id\\": 1}"'),
                            (key, "/api/conversations", b"null"),
                            (key, "/api/conversations", b"1.5")):
        answer = world.api.call("POST", path, who, data=body, content_type="application/json")
        said.append((answer.status_code, answer.json["error"]["code"],
                     answer.json["error"]["message"].removeprefix("The request body must be a JSON object, sent "
                                                                  "with Content-Type: application/json")))
    assert said == [(400, "malformed_body", " (NaN is not a JSON value)."),
                    (400, "malformed_body", " (Infinity is not a JSON value)."),
                    (400, "malformed_body", " (-Infinity is not a JSON value)."),
                    (400, "malformed_body", " (it is nested too deeply to be read)."),
                    (400, "malformed_body", " (the number 1e999999999999999999999 is out of range)."),
                    (400, "malformed_body", " (it is not JSON: Expecting property name enclosed in double quotes: "
                                            "line 1 column 16 (char 15))."),
                    (400, "malformed_body", " (it is a JSON array)."),
                    (400, "malformed_body", " (it is a JSON string)."),
                    (400, "malformed_body", " (it is JSON null)."),
                    (400, "malformed_body", " (it is a JSON number).")]
    assert world.api.get(f"/api/conversations/{conversation_id}/messages", key).json["items"] == []
    assert world.api.get("/api/me", key).json["balance"] == balance


def test_a_body_sent_encoded_is_refused_whether_or_not_it_is(world: World) -> None:
    """The server does not decode a body: a plain one that claimed `Content-Encoding: gzip` was taken as it was
    (201), and a gzipped one was refused as JSON it could not parse."""
    import gzip

    agent_id = world.agent(world.model())
    _, key = world.user()
    said = [world.api.call("POST", "/api/conversations", key, data=body, content_type="application/json",
                           headers={"Content-Encoding": encoding})
            for body, encoding in ((b'{"agent_id": %d}' % agent_id, "gzip"),
                                   (gzip.compress(b'{"agent_id": %d}' % agent_id), "gzip"),
                                   (b'{"agent_id": %d}' % agent_id, "identity"))]
    assert [(answer.status_code, answer.json.get("error", {}).get("message")) for answer in said] == [
        (400, "The request body must be sent as it is, not encoded (Content-Encoding: gzip)."),
        (400, "The request body must be sent as it is, not encoded (Content-Encoding: gzip)."),
        (201, None)]


def test_an_options_request_is_answered_with_its_allowed_methods_and_no_body(world: World) -> None:
    """Flask answers OPTIONS by itself, with a 200 and an empty `text/html` body: here, 204 and `Allow` alone."""
    _, key = world.user()
    options = world.api.call("OPTIONS", "/api/conversations", key)
    assert (options.status_code, options.data, options.headers.get("Content-Type")) == (204, b"", None)
    assert set(options.headers["Allow"].split(", ")) == {"GET", "HEAD", "POST", "OPTIONS"}
    anonymous = world.api.call("OPTIONS", "/api/conversations")
    assert (anonymous.status_code, anonymous.json["error"]["code"]) == (401, "missing_api_key")


def test_a_patch_setting_a_required_field_to_null_names_the_field_not_the_body(world: World) -> None:
    model_id = world.model()
    response = world.api.patch(f"/api/admin/models/{model_id}", world.admin_key, {"name": None})
    assert (response.status_code, response.json["error"]) == (422, {
        "code": "validation_failed", "message": "Invalid request body: name cannot be null."})


def test_the_largest_balance_a_money_column_holds_is_accepted_and_one_quantum_more_is_not() -> None:
    """NUMERIC(18, 6)'s largest value is a balance an account may be opened with."""
    from app.money import MAX_AMOUNT, MONEY_QUANTUM, checked_balance

    assert checked_balance(MAX_AMOUNT) == MAX_AMOUNT
    with pytest.raises(ValueError, match=r"not 1000000000000\.000000"):
        checked_balance(MAX_AMOUNT + MONEY_QUANTUM)


def test_a_balance_refused_for_a_huge_exponent_is_said_in_its_exponent_form() -> None:
    """`_as_written` writes out an amount as typed, but not one that would run to thousands of digits."""
    from decimal import Decimal

    from app.money import checked_balance

    with pytest.raises(ValueError) as refused:
        checked_balance(Decimal("1E+5000"))
    assert str(refused.value).endswith("not 1E+5000") and len(str(refused.value)) < 200
