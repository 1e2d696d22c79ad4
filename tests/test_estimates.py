"""Token estimates, the budget of every prompt and reservation when no tokenizer is at hand."""

from __future__ import annotations

from decimal import Decimal

import pytest

from app.chat_chunks import TOKEN_COUNT_LIMIT, read_chunk
from app.money import MAX_AMOUNT, token_cost
from app.prompt import build_prompt
from app.token_estimates import estimate_tokens


def test_ascii_text_counts_four_characters_a_token_and_other_text_one_a_character() -> None:
    assert estimate_tokens("hello world") == 3
    assert estimate_tokens("") == 0
    assert estimate_tokens("你好，世界") == 5
    assert estimate_tokens("hi 你好") == 1 + 2


def test_a_providers_token_counts_are_brought_into_the_range_they_are_charged_and_stored_in() -> None:
    """A negative count would credit the user, and one past INTEGER failed the settlement on every delivery."""
    def usage(prompt: object, completion: object) -> tuple[int, int] | None:
        chunk = {"choices": [], "usage": {"prompt_tokens": prompt, "completion_tokens": completion}}
        _, reported, _ = read_chunk(chunk)
        return None if reported is None else (reported.prompt_tokens, reported.completion_tokens)

    assert usage(12, 7) == (12, 7)
    assert usage(-5, 0) == (0, 0)
    assert usage(-5, None) is None  # no count is no report: both are estimated
    assert usage(10**12, 3.0) == (TOKEN_COUNT_LIMIT, 3)
    for bad in ("12", float("inf"), True, [1]):
        with pytest.raises(TypeError):
            usage(bad, 1)


def test_a_cost_on_a_half_millionth_rounds_up_as_the_database_rounds_it() -> None:
    """Half-up, as PostgreSQL's NUMERIC rounds: a cost computed here and a sum the database rounds agree to the
    millionth (half-even would make 5 tokens at 0.0005 a thousand 0.000002, the database 0.000003)."""
    from app.money import render

    assert token_cost(5, 0, Decimal("0.0005"), Decimal(0)) == Decimal("0.000003")
    assert token_cost(1, 0, Decimal("0.0005"), Decimal(0)) == Decimal("0.000001")
    assert render(Decimal("0.0000025")) == "0.000003" and render(Decimal("0.0000035")) == "0.000004"


def test_a_cost_is_at_most_what_a_money_column_holds() -> None:
    assert token_cost(1000, 500, Decimal("1.5"), Decimal("2")) == Decimal("2.500000")
    assert token_cost(10**8, 10**6, MAX_AMOUNT, MAX_AMOUNT) == MAX_AMOUNT


QUESTION, ANSWER = {"role": "user", "content": "abcd"}, {"role": "assistant", "content": "dcba"}
"""Each 5 tokens (1 of text, 4 of a message's framing); a prompt adds 2 for the reply's priming: with no system
prompt and the new message "abcd", a window of 27 and 10 tokens of answer room leave exactly 10 for history."""


def test_history_that_fills_the_window_exactly_is_kept_whole() -> None:
    prompt = build_prompt("", [QUESTION, ANSWER], "abcd", context_window=27, max_tokens=10)
    assert (prompt.messages, prompt.estimated_tokens) == ([QUESTION, ANSWER, QUESTION], 5 + 5 + 5 + 2)


def test_a_history_cut_to_fit_never_starts_with_an_answer() -> None:
    """A window one token short takes the oldest question away: its answer, alone, would be an answer to nothing."""
    prompt = build_prompt("", [QUESTION, ANSWER], "abcd", context_window=26, max_tokens=10)
    assert (prompt.messages, prompt.estimated_tokens) == ([QUESTION], 5 + 2)
