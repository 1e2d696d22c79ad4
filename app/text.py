"""What text the database can store, for every caller: PostgreSQL refuses a NUL character and text that is
not valid UTF-8, which a string holding a lone surrogate (what a command line's undecodable bytes become)
cannot be encoded to."""

from __future__ import annotations


def unstorable(text: str) -> str | None:
    """Why `text` cannot be stored, as the end of a sentence about the field; None when it can."""
    if "\x00" in text:
        return "must not contain NUL characters"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "must be valid Unicode text (it holds a lone surrogate, which no UTF-8 encodes)"
    return None
