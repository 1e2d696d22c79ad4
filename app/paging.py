"""Keyset pages: a list reads one row more than its page, so a cursor is given only when a row follows."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TypeVar

Row = TypeVar("Row")
Cursor = TypeVar("Cursor")


def page_of(rows: list[Row], limit: int, cursor: Callable[[Row], Cursor]) -> tuple[list[Row], Cursor | None]:
    """The page of `rows` (read with `limit + 1`) and the next page's cursor, made by `cursor` from its last
    row when another row follows it: a page that ends at the last row has none."""
    page = rows[:limit]
    return page, cursor(page[-1]) if len(rows) > limit and page else None


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
