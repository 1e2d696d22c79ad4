"""Accounts: creating users with their first key, reading a balance and its ledger, adding credit."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from typing import NamedTuple

from sqlalchemy import select

from app import ledger
from app.auth import forget_keys_of, hash_api_key, new_api_key
from app.db import transaction
from app.errors import NotFound, ValidationFailed
from app.models import CreditTransaction, User, table
from app.money import checked_balance
from app.paging import PAGE_OF_A_WHOLE_LIST, every_row, page_of
from app.text import not_one_line, unstorable


@dataclass(frozen=True, slots=True)
class NewUser:
    user: User
    api_key: str


NAME_MAX_CHARS: int = table(User).c.name.type.length  # type: ignore[attr-defined]
"""The length of `users.name`, checked here for every caller (the API's schema checks it too, the CLI not)."""


def create_user(name: str, *, is_admin: bool = False, balance: Decimal = Decimal(0),
                api_key: str | None = None) -> NewUser:
    """The key is returned once and never stored; an opening balance is a ledger credit like any other.
    A new key is made unless one is given (the demo keeps its key in a file, so that `make run` prints the
    same one every time)."""
    if not name.strip():
        raise ValidationFailed("name must not be blank.")
    if len(name.strip()) > NAME_MAX_CHARS:
        raise ValidationFailed(f"name must be at most {NAME_MAX_CHARS} characters.")
    if (problem := unstorable(name) or not_one_line(name)) is not None:
        raise ValidationFailed(f"name {problem}.")
    try:
        checked_balance(balance)
    except ValueError as exc:
        raise ValidationFailed(f"{exc}.") from None
    api_key = api_key or new_api_key()
    with transaction() as session:
        user = User(name=name.strip(), api_key_hash=hash_api_key(api_key), is_admin=is_admin,
                    balance=Decimal(0), reserved=Decimal(0))
        session.add(user)
        session.flush()
        if balance > 0:
            ledger.add_credit(session, user.id, balance)
        session.flush()
        session.refresh(user)
    return NewUser(user=user, api_key=api_key)


def replace_api_key(user_id: int) -> NewUser:
    """A new key for the user, returned once; the old one stops working at once in every process that has not
    seen it lately, and within `app.auth`'s cache time (10 s) in those that have: the way to revoke a key
    that leaked, without a database edit."""
    api_key = new_api_key()
    with transaction() as session:
        user = session.get(User, user_id, with_for_update=True)
        if user is None:
            raise NotFound("No such user.")
        user.api_key_hash = hash_api_key(api_key)
        session.flush()
        session.refresh(user)
    forget_keys_of(user_id)
    return NewUser(user=user, api_key=api_key)


def get_user(user_id: int) -> User:
    with transaction() as session:
        user = session.get(User, user_id)
        if user is None:
            raise NotFound("No such user.")
        return user


def add_credit(user_id: int, amount: Decimal) -> ledger.Credited:
    with transaction() as session:
        if session.get(User, user_id) is None:
            raise NotFound("No such user.")
        return ledger.add_credit(session, user_id, amount)


class LedgerPage(NamedTuple):
    items: list[CreditTransaction]
    next_cursor: int | None
    """The id to pass back as `cursor`; None on the last page."""


def list_transactions(user_id: int, limit: int = 100, before_id: int | None = None) -> LedgerPage:
    """Newest first; `before_id` continues after the last row of the previous page.

    One row more than the page is read (`app.paging.page_of`)."""
    query = (select(CreditTransaction).where(CreditTransaction.user_id == user_id)
             .order_by(CreditTransaction.id.desc()).limit(limit + 1))
    if before_id is not None:
        query = query.where(CreditTransaction.id < before_id)
    with transaction() as session:
        rows = list(session.scalars(query))
    return LedgerPage(*page_of(rows, limit, lambda row: row.id))


def every_transaction(user_id: int, before_id: int | None = None) -> Iterator[CreditTransaction]:
    """The whole ledger, newest first, read a page at a time (a ledger grows without bound)."""
    return every_row(lambda cursor: list_transactions(user_id, PAGE_OF_A_WHOLE_LIST, cursor), before_id)
