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


def estimate_answer_tokens(text: str, max_tokens: int | None, unseen: int = 0) -> int:
    """An answer's tokens where the provider reported none (the call failed or was stopped), at
    most the `max_tokens` its request was sent with: the estimate counts a token a character outside ASCII,
    more than a model makes of such text, and a model makes no more than it was allowed. `unseen` counts
    characters of it whose text is not at hand (a live stream's entries Redis lost), at four a token."""
    estimate = estimate_tokens(text) + (unseen + 3) // 4
    return estimate if max_tokens is None else min(estimate, max_tokens)


MESSAGE_OVERHEAD_TOKENS = 4
"""What a chat message costs besides its text (role and separators, as chat formats frame it)."""
REPLY_PRIMING_TOKENS = 2
"""What a prompt costs once besides its messages (the start of the reply it primes)."""


def estimate_message_tokens(message: dict[str, str]) -> int:
    """One message's share of a prompt: the same count whether a history is being trimmed to fit the context
    window or a whole prompt priced for its reservation."""
    return estimate_tokens(message.get("content", "")) + MESSAGE_OVERHEAD_TOKENS


def estimate_tokens_of_messages(messages: list[dict[str, str]]) -> int:
    return sum(estimate_message_tokens(m) for m in messages) + REPLY_PRIMING_TOKENS


PROMPT_FRAMING_BOUND_TOKENS = 8
"""More than any chat format spends framing one message (its role and separators), or priming the reply."""


def most_tokens_of_messages(messages: list[dict[str, str]]) -> int:
    """The most tokens a prompt can be, whatever the tokenizer: a byte-level one (the GPT family's, Llama's,
    any with byte fallback) makes no token of less than one byte, so a text is at most its UTF-8 bytes.
    A provider's usage past this is an error in the report, not a prompt the user sent."""
    return sum(len(m.get("content", "").encode()) + PROMPT_FRAMING_BOUND_TOKENS for m in messages) + \
        PROMPT_FRAMING_BOUND_TOKENS
