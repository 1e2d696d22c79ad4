"""What text the database can store, for every caller: PostgreSQL refuses a NUL character and text that is
not valid UTF-8, which a string holding a lone surrogate (what a command line's undecodable bytes become,
or a JSON `\\ud800` escape) cannot be encoded to.

What a client sends is refused with a 422 that says so (`unstorable`); what a model sends is the
provider's, paid for and already on its way to readers, so it is kept with those characters replaced
(`storable`): refused at the settlement, it made every delivery fail and call the model again. What another
side says of a failure (an error body, a transport's error) is kept and logged as a bounded quote (`quoted`).
"""

from __future__ import annotations

import re

_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")
"""NUL, and any surrogate: a Python string holds a valid pair as the one character it encodes."""

QUOTE_LIMIT = 2000
"""The most characters of another side's words kept and logged: an error page of 20 MB was stored whole in each
failed attempt's row and logged on each attempt's line."""

_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
"""What a log line or a terminal acts on rather than shows: the C0 and C1 controls, and the two Unicode line
breaks."""


def _escape(match: re.Match[str]) -> str:
    return match.group().encode("unicode_escape").decode("ascii")


def not_one_line(text: str) -> str | None:
    """Why `text`, a name, is not one line of text, as the end of a sentence about the field; None when it is.
    Names are written into log lines as they are, where a line break or an escape sequence would forge or
    garble the lines that name them."""
    return "must not contain line breaks or control characters" if _CONTROL.search(text) else None


def one_line(text: str) -> str:
    """What another side sent (a client's user agent, say), as a log line may hold it: each control character
    and line break written as its escape, and a backslash doubled, so that an escape the text held reads apart
    from one made here."""
    if not _CONTROL.search(text) and "\\" not in text:
        return text
    return _CONTROL.sub(_escape, text.replace("\\", "\\\\"))


def unstorable(text: str) -> str | None:
    """Why `text` cannot be stored, as the end of a sentence about the field; None when it can."""
    if "\x00" in text:
        return "must not contain NUL characters"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "must be valid Unicode text (it holds a lone surrogate, which no UTF-8 encodes)"
    return None


def storable(text: str) -> str:
    """`text` with every character the database cannot store replaced by U+FFFD, the replacement character."""
    if text.isascii() and "\x00" not in text:
        return text
    return _UNSTORABLE.sub("\ufffd", text)


def quoted(text: str) -> str:
    """Another side's words as agentq stores and logs them: storable, at most `QUOTE_LIMIT` characters, each
    control character written as its escape, so a line break cannot start a line of the log that looks like
    agentq's own, nor an escape sequence drive the terminal of an operator reading it."""
    said = _CONTROL.sub(_escape, storable(text[:QUOTE_LIMIT * 8]))  # no escape is longer than 6 characters
    if len(said) <= QUOTE_LIMIT and len(text) <= QUOTE_LIMIT * 8:
        return said
    kept = said[:QUOTE_LIMIT]
    if (escape := kept.rfind("\\", max(0, QUOTE_LIMIT - 6))) != -1:  # not half of an escape
        kept = kept[:escape]
    return f"{kept}… (cut at {QUOTE_LIMIT} characters)"
