"""Keyset pages: a list reads one row more than its page, so a cursor is given only when a row follows."""

from __future__ import annotations

import base64
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import TypeVar

from sqlalchemy import ColumnElement, tuple_
from sqlalchemy.orm import InstrumentedAttribute

from app.errors import ValidationFailed
from app.models.base import LARGEST_ID, as_utc

Row = TypeVar("Row")
Cursor = TypeVar("Cursor")


def page_of(rows: list[Row], limit: int, cursor: Callable[[Row], Cursor]) -> tuple[list[Row], Cursor | None]:
    """The page of `rows` (read with `limit + 1`) and the next page's cursor, made by `cursor` from its last
    row when another row follows it: a page that ends at the last row has none."""
    page = rows[:limit]
    return page, cursor(page[-1]) if len(rows) > limit and page else None


LARGEST_PAGE = 500
"""The most rows a client may ask a page of a long list (the ledger, the dead letters) to hold."""

LARGEST_CONVERSATION_PAGE = 100
"""The most conversations a page of a user's list holds: each is read with its activity, for a chat sidebar."""

LARGEST_LOG_PAGE = 200
"""The most rows a page of an admin's logs holds (test runs, failed turns), each with its text."""

PAGE_OF_A_WHOLE_LIST = 500
"""How many rows `every_row` reads at a time."""


def every_row(read_page: Callable[[Cursor | None], tuple[list[Row], Cursor | None]],
              start: Cursor | None = None) -> Iterator[Row]:
    """Every row of a keyset-paged list from `start`, a page at a time (each read in its own short
    transaction) as the caller consumes them: for a client that asked for no page, the whole list without
    all of it in memory at once, nor a connection held while the client reads."""
    cursor = start
    while True:
        rows, cursor = read_page(cursor)
        yield from rows
        if cursor is None:
            return


def moment_cursor(moment: datetime, ident: int) -> str:
    """The cursor after a row of a list ordered newest first by a time, then by id (ties of a time are common:
    rows written in one transaction share it). Opaque to clients, who pass it back as they got it."""
    return base64.urlsafe_b64encode(f"{as_utc(moment).isoformat()}|{ident}".encode()).decode()


def older_than(moment: InstrumentedAttribute[datetime], ident: InstrumentedAttribute[int],
               cursor: str) -> ColumnElement[bool]:
    """The rows after `cursor` (from `moment_cursor`) in that order; 422 `invalid_cursor` for a cursor this
    API did not give."""
    after, last_id = _decode(cursor)
    # A row comparison, which an index on (moment, id) serves as its condition; `a < x OR (a = x AND …)`
    # was a filter on every row from the newest down to the page.
    return tuple_(moment, ident) < tuple_(after, last_id)


def check_cursor(cursor: str) -> None:
    """422 `invalid_cursor` now, for a cursor `older_than` will read later: a list written as it is read
    (`every_row`) has sent its status by then."""
    _decode(cursor)


def _decode(cursor: str) -> tuple[datetime, int]:
    try:
        stamp, ident = base64.urlsafe_b64decode(cursor.encode()).decode().split("|")
        moment, number = as_utc(datetime.fromisoformat(stamp)), int(ident)
        if not 1 <= number <= LARGEST_ID:
            raise ValueError(f"id {number} out of range")
        if moment_cursor(moment, number) != cursor:
            # Python reads more than it writes (a date alone, no offset, spaces, other scripts' digits): a
            # cursor that is no `moment_cursor` named a place in the list no page ends at.
            raise ValueError("not in the form this API writes")
    except (ValueError, UnicodeDecodeError, OverflowError) as exc:
        raise ValidationFailed("cursor is not one this API returned.", code="invalid_cursor") from exc
    return moment, number
