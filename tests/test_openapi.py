"""/openapi.json documents every route's success as well as its errors.

The bodies themselves are checked against the document by the whole suite: the test app validates every
response it sends against the route's response model (`VALIDATE_RESPONSES`), and those models forbid
fields they do not name."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tests.conftest import Api


def test_every_route_documents_its_success_response(api: Api) -> None:
    document = api.get("/openapi.json").json
    schemas = document["components"]["schemas"]
    undocumented = []
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            successes = {code: answer for code, answer in operation["responses"].items() if code.startswith("2")}
            if not successes:
                undocumented.append(f"{method.upper()} {path}")
            for answer in successes.values():
                for media in answer.get("content", {}).values():
                    ref = media.get("schema", {}).get("$ref")
                    if ref is not None:
                        assert ref.rsplit("/", 1)[1] in schemas, ref
    assert undocumented == []
    assert document["paths"]["/api/conversations/{conversation_id}/messages"]["post"]["responses"]["202"][
        "content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/AcceptedTurn"}
    stream = document["paths"]["/api/messages/{message_id}/stream"]["get"]["responses"]
    assert list(stream["200"]["content"]) == ["text/event-stream"]
    api_operations = [op for path, ops in document["paths"].items() if path.startswith("/api/") for op in ops.values()]
    assert all("503" in op["responses"] for op in api_operations)  # a backing service out of reach
    assert set(schemas["Message"]["properties"]) == {
        "id", "conversation_id", "seq", "role", "content", "status", "error_message", "error_display", "model",
        "prompt_tokens", "completion_tokens", "total_tokens", "cost", "latency_ms", "created_at", "updated_at"}


def test_the_document_says_what_a_client_can_count_on(api: Api) -> None:
    """A generated client reads the statuses as an enumeration, times as date-times, money as a six-place
    decimal string, a path id's range, and a 403 on the admin routes alone (every route listed it)."""
    document = api.get("/openapi.json").json
    schemas = document["components"]["schemas"]
    message = schemas["Message"]["properties"]
    assert message["status"] == {"$ref": "#/components/schemas/TurnStatus"}
    assert schemas["TurnStatus"]["enum"] == ["pending", "processing", "success", "error", "insufficient_balance",
                                             "content_violation", "llm_error", "cancelled"]
    assert (message["created_at"]["format"], schemas["DebugLog"]["properties"]["status"]) == (
        "date-time", {"$ref": "#/components/schemas/TurnStatus"})
    assert schemas["Credited"]["properties"]["balance"]["pattern"] == r"^-?[0-9]+\.[0-9]{6}$"
    assert document["paths"]["/api/messages/{message_id}"]["get"]["parameters"] == [{
        "name": "message_id", "in": "path", "required": True,
        "schema": {"title": "Message Id", "type": "integer", "minimum": 1, "maximum": 10**18 - 1}},
        {"$ref": "#/components/parameters/X-Request-ID"}]
    forbidding = sorted({path.split("/")[2] for path, operations in document["paths"].items()
                         for operation in operations.values() if "403" in operation["responses"]})
    assert forbidding == ["admin"]
    assert all("403" in operation["responses"] for path, operations in document["paths"].items()
               if path.startswith("/api/admin/") for operation in operations.values())


def test_the_test_app_checks_each_response_against_its_documented_model(api: Api) -> None:
    assert api.client.application.validate_response is True


def test_the_document_says_every_operation_takes_and_answers_a_request_id(api: Api) -> None:
    """`X-Request-ID` (`web.request_ids`) was in no operation of the document, so a generated client neither sent
    nor read it; each operation now takes it, once, and each of its documented answers carries it."""
    document = api.get("/openapi.json").json
    parameter = document["components"]["parameters"]["X-Request-ID"]
    assert (parameter["in"], parameter["required"], parameter["schema"]["pattern"]) == (
        "header", False, "^[A-Za-z0-9._:+/=-]{1,128}$")
    operations = [operation for operations in document["paths"].values() for operation in operations.values()]
    assert all(operation["parameters"].count({"$ref": "#/components/parameters/X-Request-ID"}) == 1
               for operation in operations)
    assert all(answer["headers"]["X-Request-ID"] == {"$ref": "#/components/headers/X-Request-ID"}
               for operation in operations for answer in operation["responses"].values())
    assert api.get("/openapi.json").json == document  # documented once, not again at each ask
