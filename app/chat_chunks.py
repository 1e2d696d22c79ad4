"""What one decoded chunk of a streamed chat completion says: the answer's text, the usage report and the
`finish_reason`, and whether a finish leaves an answer to keep. Kept apart from the call (`app.llm_client`),
so that what a provider may send is read, and its counts brought into range, in one place a test can give
any chunk to."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    reported: bool


TOOL_CALL_FINISHES = frozenset({"tool_calls", "function_call"})
"""The `finish_reason`s of a model that ends its turn asking for a tool to be called (the second, OpenAI's older)."""


def no_answer_in(finish: str, *, has_text: bool) -> str | None:
    """Why a stream that finished so holds no answer to keep, as a failure's words (the fallback is called);
    None when it does. The provider's content filter cut the answer short, whatever it had sent; a model
    that asked for a tool and wrote nothing (`has_text` false) answered nothing (agentq sends no tools, and
    calls none)."""
    reason = finish.lower()
    if reason == "content_filter":
        return "the provider's content filter stopped the answer"
    if reason in TOOL_CALL_FINISHES and not has_text:
        return "the model asked for a tool instead of answering"
    return None


def read_chunk(chunk: Any) -> tuple[list[str], Usage | None, str | None]:
    """The answer's text pieces as sent (`app.llm_client` makes them what the database can store), the reported
    usage and the `finish_reason` that ends the answer, if the chunk has one (a body that ends without one was cut, by a
    proxy that closed it cleanly or by the watchdog), in one decoded chunk, read in one pass over its choices.
    A delta's `refusal` is text of the answer: the model's own words for what it will not do, which its reader
    is owed as much as any other answer.

    Raises TypeError or AttributeError when the chunk is not shaped like a chat completion chunk.
    """
    texts: list[str] = []
    finish: str | None = None
    for choice in chunk.get("choices") or ():
        delta = choice.get("delta") or {}
        if text := delta.get("content"):
            if not isinstance(text, str):
                raise TypeError("a delta's content is not a string")
            texts.append(text)
        if isinstance(refusal := delta.get("refusal"), str) and refusal:  # a flag elsewhere is no text of ours
            texts.append(refusal)
        finish = finish or choice.get("finish_reason") or None
    return texts, _usage(chunk.get("usage")), None if finish is None else str(finish)


def _usage(reported: Any) -> Usage | None:
    """A usage report that counts both the prompt and the answer; one without either count (a gateway's own
    field names, a null) reports nothing, and both are estimated, as when the usage chunk is missing: taken
    for zero, it made the turn free."""
    if not reported:
        return None
    prompt, completion = reported.get("prompt_tokens"), reported.get("completion_tokens")
    if prompt is None or completion is None:
        return None
    return Usage(_token_count(prompt), _token_count(completion), reported=True)


TOKEN_COUNT_LIMIT = (2**31 - 1) // 2
"""The largest token count stored: half of what an answer's INTEGER columns hold, so that the two counts'
sum (`total_tokens`) fits as well."""


def _token_count(reported: Any) -> int:
    """A provider's token count as it is charged and stored: a negative one would credit the user, and one
    past the columns' range failed the settlement on every delivery, so both are brought into range."""
    if isinstance(reported, bool) or not isinstance(reported, int | float) or not math.isfinite(reported):
        raise TypeError("a usage count is not a number")
    return min(max(int(reported), 0), TOKEN_COUNT_LIMIT)
