"""Keyset pages: a list reads one row more than its page, so a cursor is given only when a row follows."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

Row = TypeVar("Row")
Cursor = TypeVar("Cursor")


def page_of(rows: list[Row], limit: int, cursor: Callable[[Row], Cursor]) -> tuple[list[Row], Cursor | None]:
    """The page of `rows` (read with `limit + 1`) and the next page's cursor, made by `cursor` from its last
    row when another row follows it: a page that ends at the last row has none."""
    page = rows[:limit]
    return page, cursor(page[-1]) if len(rows) > limit and page else None
