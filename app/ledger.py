"""Credit: reservations, charges and top-ups. The only module that changes a balance.

Every change of `users.balance` writes one `credit_transactions` row with the balance after it, so
the ledger of a user always adds up to their balance. A turn reserves its worst-case cost before
the model is called (`reserved`), and `charge_turn` settles it; the unique `message_id` of the
ledger makes a second charge of the same turn fail in the database itself.
"""

from __future__ import annotations

from decimal import Decimal
from functools import cache
from types import SimpleNamespace

from sqlalchemy import bindparam, case, insert, select, update
from sqlalchemy.orm import Session

from app.errors import ValidationFailed
from app.models import CreditTransaction, User, table
from app.models.base import utc_now
from app.money import MAX_AMOUNT, quantize
from app.prepared import Prepared


def _locked_user(session: Session, user_id: int) -> User:
    user = session.execute(select(User).where(User.id == user_id).with_for_update()).scalar_one()
    return user


def _write(session: Session, user: User, amount: Decimal, message_id: int | None) -> CreditTransaction:
    user.balance = quantize(user.balance + amount)
    entry = CreditTransaction(
        user_id=user.id,
        message_id=message_id,
        kind="charge" if message_id is not None else "credit",
        amount=quantize(amount),
        balance_after=user.balance,
    )
    session.add(entry)
    session.flush()
    return entry


def add_credit(session: Session, user_id: int, amount: Decimal) -> Decimal:
    """Top up (or take back, when negative) credit; a balance is clamped at zero, never below."""
    user = _locked_user(session, user_id)
    change = max(quantize(amount), -user.balance)
    if user.balance + change > MAX_AMOUNT:
        raise ValidationFailed(f"A balance cannot exceed {MAX_AMOUNT}.", code="balance_too_large")
    if change != 0:
        _write(session, user, change, None)
    return user.balance


@cache
def _statements() -> SimpleNamespace:
    """Built once on the Core tables (see `app.models.table`): every turn reserves and settles."""
    users, ledger = table(User), table(CreditTransaction)
    unreserved = case((users.c.reserved > bindparam("held"), users.c.reserved - bindparam("held")), else_=0)
    return SimpleNamespace(
        reserve=Prepared(update(users)
                         .where(users.c.id == bindparam("user"),
                                users.c.balance - users.c.reserved >= bindparam("amount"))
                         .values(reserved=users.c.reserved + bindparam("amount"))),
        release=Prepared(update(users).where(users.c.id == bindparam("user")).values(reserved=unreserved)),
        settle_covered=Prepared(update(users)
                                .where(users.c.id == bindparam("user"), users.c.balance >= bindparam("cost"))
                                .values(balance=users.c.balance - bindparam("cost"), reserved=unreserved)
                                .returning(users.c.balance)),
        lock=Prepared(select(users.c.balance, users.c.reserved).where(users.c.id == bindparam("user"))
                      .with_for_update()),
        settle=Prepared(update(users).where(users.c.id == bindparam("user"))
                        .values(balance=bindparam("new_balance"), reserved=bindparam("new_reserved"))),
        charge=Prepared(insert(ledger).values(
            user_id=bindparam("user"), message_id=bindparam("message"), kind="charge", amount=bindparam("charged"),
            balance_after=bindparam("new_balance"), created_at=bindparam("at"))),
    )


def reserve(session: Session, user_id: int, amount: Decimal) -> bool:
    """Hold `amount` of the available balance for a turn; False when it is not there."""
    return _statements().reserve(session, {"user": user_id, "amount": quantize(amount)}).rowcount == 1


def release(session: Session, user_id: int, amount: Decimal) -> None:
    """Give back a reservation of a turn that will not be charged."""
    if amount <= 0:
        return
    _statements().release(session, {"user": user_id, "held": quantize(amount)})


def charge_turn(session: Session, user_id: int, message_id: int, cost: Decimal, reserved: Decimal) -> Decimal:
    """Settle a turn: release its reservation and charge its real cost, at most the whole balance.

    Returns what was charged. A cost of zero writes no ledger row. The balance almost always covers
    the cost (it was reserved), so one guarded UPDATE settles it; only a balance that fell short
    meanwhile takes the locked read that clamps the charge.
    """
    sql = _statements()
    cost, held = quantize(cost), quantize(reserved)
    balance = sql.settle_covered(session, {"user": user_id, "cost": cost, "held": held}).scalar()
    if balance is not None:
        charged = cost
    else:
        row = sql.lock(session, {"user": user_id}).one()
        charged = min(cost, row.balance)
        balance = quantize(row.balance - charged)
        sql.settle(session, {"user": user_id, "new_balance": balance,
                             "new_reserved": max(quantize(row.reserved - held), Decimal(0))})
    if charged > 0:
        sql.charge(session, {"user": user_id, "message": message_id, "charged": -charged,
                             "new_balance": quantize(balance), "at": utc_now()})
    return charged
