"""Token counts estimated from text, where no tokenizer is at hand: every prompt's budget and reservation,
and an answer's usage when a provider reports none."""

from __future__ import annotations


def estimate_tokens(text: str) -> int:
    """About four characters a token for ASCII text, and one a character for the rest (tokenizers give
    Chinese, Japanese or Korean text about a token a character): used to fit a prompt into a context
    window, for the reservation, and when a provider reports no usage. Counting CJK at four a token would
    let a prompt run four times over the window, and the provider refuse every later turn."""
    ascii_chars = len(text.encode("ascii", "ignore"))
    return (ascii_chars + 3) // 4 + len(text) - ascii_chars


def estimate_tokens_of_messages(messages: list[dict[str, str]]) -> int:
    return sum(estimate_tokens(m.get("content", "")) + 4 for m in messages) + 2
