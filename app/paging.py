"""Keyset pages: a list reads one row more than its page, so a cursor is given only when a row follows."""

from __future__ import annotations

from typing import TypeVar

Row = TypeVar("Row")


def page_of(rows: list[Row], limit: int) -> tuple[list[Row], Row | None]:
    """The page of `rows` (read with `limit + 1`) and its last row when another follows it, else None:
    the next page's cursor is made from that row, and a page that ends at the last row has none."""
    page = rows[:limit]
    return page, page[-1] if len(rows) > limit and page else None
