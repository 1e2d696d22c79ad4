"""Which language `error_display` is written in: the client's Accept-Language, ranked by q-value."""

from __future__ import annotations

import pytest

from web.error_display import prefers_chinese


@pytest.mark.parametrize(("header", "chinese"), [
    ("zh", True), ("zh-CN,zh;q=0.9", True), ("en;q=0.5, zh", True), ("en, zh;q=0.9", False), (None, False),
    ("zh;q=0", False),  # "not acceptable" (RFC 9110): it was taken as the only language there was
    ("zh;q=0, en;q=0", False), ("en;q=0, zh;q=0.1", True), ("zh;q=nan", False),
    # a q-value out of 0..1 is malformed, not a stronger preference
    ("en;q=0.9, zh;q=inf", False), ("en;q=0.9, zh;q=1.5", False), ("en;q=1.5, zh", True),
    # languages not written here do not outrank the one that is: Chinese was named, English was not
    ("fr, zh;q=0.5", True), ("fr-CA, de;q=0.9, zh-TW;q=0.2", True), ("fr, en;q=0.5, zh;q=0.4", False),
    ("fr", False), ("*", False), ("zh;q=0.5, *", False), ("zhx, en;q=0.1", False),
    # white space before the `;` (RFC 9110's OWS), an underscore, a wildcard for what English's refusal leaves
    ("zh ;q=0.9, en;q=0.5", True), ("en ; q=0.9, zh;q=0.5", False), ("zh_CN, en;q=0.5", True), ("en;q=0, *", True),
    ("en;q=0, zh;q=0, *", False),
])
def test_chinese_only_when_it_ranks_first_among_acceptable_languages(header: str | None, chinese: bool) -> None:
    assert prefers_chinese(header) is chinese


def test_the_limit_of_conversations_in_flight_is_counted_in_words_that_agree() -> None:
    from app.errors import TooManyActiveConversations

    assert TooManyActiveConversations(1).message == ("You already have 1 conversation with a turn in flight; wait "
                                                     "for one to end.")
    assert TooManyActiveConversations(3).message.startswith("You already have 3 conversations with a turn")
