"""The mock upstream refuses a model string it cannot play, so a test's typo is seen rather than played as `echo`."""

from __future__ import annotations

import httpx
import pytest

from tests.conftest import UpstreamLog


@pytest.mark.parametrize(("model", "named"), [
    ("echo;ttft=abc", "ttft='abc' is not a number of seconds (0 or more)"),  # was a 500 and a traceback
    ("echo;ttft=-1", "ttft='-1' is not a number of seconds (0 or more)"),
    ("echo;words=many", "words='many' is not a whole number"),
    ("echo;fail=200", "fail='200' is out of range (400..599)"),
    ("echo;bogus=1", "the mock upstream knows no directive 'bogus' (in 'echo;bogus=1')"),
    ("echo;no_usage=yes", "the directive 'no_usage' takes no value, not 'no_usage=yes'"),
    ("ecoh;ttft=1", "the mock upstream plays 'echo' (directives follow it after ';'), not 'ecoh'"),
])
def test_a_model_string_the_mock_cannot_play_is_a_400_naming_the_part(
        upstream: UpstreamLog, model: str, named: str) -> None:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": True}
    answer = httpx.post(f"{upstream.base}/v1/chat/completions", json=body)
    assert (answer.status_code, answer.json()) == (400, {"error": {"message": named, "type": "invalid_request_error"}})


def test_every_directive_the_readme_lists_is_played(upstream: UpstreamLog) -> None:
    """Guards the strictness above: a directive the tests rely on must not become a refusal."""
    model = ("echo;ttft=0;gap=0;words=3;word=v;no_usage;hold_after_done=0;hang_after_finish=0;garbage_after_finish;"
             "redirect;split_pairs;reported_tokens=5;stall_after=9;cut_after=9;end_after=9;garbage_after=9;"
             "nested_after=9;hang_headers=0")
    answer = httpx.post(f"{upstream.base}/v1/chat/completions", follow_redirects=True,
                        json={"model": model, "messages": [{"role": "user", "content": "hi"}]})
    assert (answer.status_code, answer.json()["choices"][0]["message"]["content"]) == (200, "v0 v1 v2")


def test_the_mock_keeps_its_latest_requests_and_stream_fates_only() -> None:
    """The demo's upstream, left running, kept every request body it was sent: about 6 MB a minute at 20 turns
    a second, never given back. It keeps the latest `KEPT` of each."""
    from app.mock_upstream import KEPT, MockState

    state = MockState()
    for number in range(KEPT + 5):
        state.log_request({"number": number}, opened_in=0)
        state.record(f"stream-{number}", "completed", opened_in=0)
    assert (len(state.requests), state.requests[0], state.requests[-1]) == (KEPT, {"number": 5}, {"number": KEPT + 4})
    assert (len(state.streams), next(iter(state.streams))) == (KEPT, "stream-5")
