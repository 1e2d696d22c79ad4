"""Token estimates, the budget of every prompt and reservation when no tokenizer is at hand."""

from __future__ import annotations

from app.llm_client import estimate_tokens


def test_ascii_text_counts_four_characters_a_token_and_other_text_one_a_character() -> None:
    assert estimate_tokens("hello world") == 3
    assert estimate_tokens("") == 0
    assert estimate_tokens("你好，世界") == 5
    assert estimate_tokens("hi 你好") == 1 + 2
