"""What text the database can store, for every caller: PostgreSQL refuses a NUL character and text that is
not valid UTF-8, which a string holding a lone surrogate (what a command line's undecodable bytes become,
or a JSON `\\ud800` escape) cannot be encoded to.

What a client sends is refused with a 422 that says so (`unstorable`); what a model sends is the
provider's, paid for and already on its way to readers, so it is kept with those characters replaced
(`storable`): refused at the settlement, it made every delivery fail and call the model again.
"""

from __future__ import annotations

import re

_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")
"""NUL, and any surrogate: a Python string holds a valid pair as the one character it encodes."""


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
