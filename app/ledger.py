"""Credit: reservations, charges and top-ups. The only module that changes a balance.

Every change of `users.balance` writes one `credit_transactions` row with the balance after it, so
the ledger of a user always adds up to their balance. A turn reserves its worst-case cost before
the model is called (`reserved`), and `settle_turn` settles it at its worker's end (`charge_turn` for a turn with
a cost, a release for one without; an end no delivery makes only releases): the charge statement writes no second
ledger row for a turn already charged, and the balance moves only by the row it wrote, so the turn is
charged once whoever settles it (the unique `message_id` stands behind the statement).
"""

from __future__ import annotations

from decimal import Decimal
from functools import cache
from typing import NamedTuple

from sqlalchemy import BigInteger, DateTime, bindparam, case, exists, func, insert, literal, select, update
from sqlalchemy.orm import Session

from app.errors import ValidationFailed
from app.models import CreditTransaction, User, table
from app.models.base import Money, utc_now
from app.money import MAX_AMOUNT, quantize
from app.prepared import Batch, Prepared, Rows, Unit


def _locked_user(session: Session, user_id: int) -> User:
    """The user's row as the lock found it: a balance read earlier in the session (before a settlement
    committed) is overwritten, or the new balance would be computed from a stale one and lose that charge."""
    return session.execute(select(User).where(User.id == user_id).with_for_update()
                           .execution_options(populate_existing=True)).scalar_one()


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


class Credited(NamedTuple):
    balance: Decimal
    credited: Decimal
    """The change made, which a take-back's stop makes smaller than the amount asked (`add_credit`)."""


def add_credit(session: Session, user_id: int, amount: Decimal) -> Credited:
    """Top up (or take back, when negative) credit.

    A take-back stops at what turns in flight hold: their reservations priced answers already being
    generated, and taking that money would leave their charges short (served for less, or free). The
    balance therefore never goes below the reservations, let alone zero; what a turn does not spend
    stays with the user when it settles, for the operator to take back then. The change made is returned
    with the balance, so that a take-back that stopped short says so."""
    user = _locked_user(session, user_id)
    change = max(quantize(amount), -max(user.available_balance, Decimal(0)))
    if user.balance + change > MAX_AMOUNT:
        raise ValidationFailed(f"A balance cannot exceed {MAX_AMOUNT}.", code="balance_too_large")
    if change != 0:
        _write(session, user, change, None)
    return Credited(user.balance, change)


class _Statements(NamedTuple):
    reserve: Prepared
    release: Prepared
    charge: Prepared
    settle: Prepared


@cache
def _statements() -> _Statements:
    """Built once on the Core tables and run on the driver (`app.prepared`): every turn reserves and settles.

    A charge is what the turn may spend: `cost`, or, when the cost came out above the reservation and the
    balance cannot cover it, what the balance holds beyond the other turns' reservations
    (this turn's hold and the unreserved rest). Taking the whole balance would spend money other turns in
    flight hold: each of them would then be charged short of its cost, a user who never overran. A turn
    already charged gets no second row: only a delivery that lost
    its lease can get this far with one (the one that took the turn over charged it first), and its lease
    check in the same batch then rolls everything back as `LeaseLost`, where a refused unique key would
    have been a database error raised before that check was read. `charge` writes the ledger row from
    the user's row, locked; `settle` then sets the balance to that row's `balance_after` (found by its
    turn and its stamp `at`), or leaves it where no row was written, and releases the reservation
    either way. Both go out together in a batch, and a balance never moves without its ledger row."""
    users, ledger = table(User), table(CreditTransaction)
    held, cost = bindparam("held", type_=Money), bindparam("cost", type_=Money)
    held_by_others = case((users.c.reserved > held, users.c.reserved - held), else_=0)
    spendable = users.c.balance - held_by_others
    covered = spendable >= cost
    message, at = bindparam("message", type_=BigInteger), bindparam("at", type_=DateTime(timezone=True))
    charged = (select(ledger.c.balance_after).where(ledger.c.message_id == message, ledger.c.created_at == at)
               .scalar_subquery())
    return _Statements(
        reserve=Prepared(update(users)
                         .where(users.c.id == bindparam("user"),
                                users.c.balance - users.c.reserved >= bindparam("amount"))
                         .values(reserved=users.c.reserved + bindparam("amount"))),
        release=Prepared(update(users).where(users.c.id == bindparam("user")).values(reserved=held_by_others)),
        charge=Prepared(insert(ledger).from_select(
            ["user_id", "message_id", "kind", "amount", "balance_after", "created_at"],
            select(users.c.id, message, literal("charge"),
                   -case((covered, cost), else_=spendable),
                   case((covered, users.c.balance - cost), else_=held_by_others), at)
            .where(users.c.id == bindparam("user"), spendable > 0, cost > 0,
                   ~exists().where(ledger.c.message_id == message))
            .with_for_update())),
        settle=Prepared(update(users).where(users.c.id == bindparam("user"))
                        .values(balance=func.coalesce(charged, users.c.balance), reserved=held_by_others)),
    )


def reserve(unit: Unit | Batch, user_id: int, amount: Decimal) -> Rows:
    """Hold `amount` of the available balance for a turn: held when the rowcount is 1, not there when 0."""
    return _statements().reserve(unit, {"user": user_id, "amount": quantize(amount)})


def release(unit: Unit | Batch, user_id: int, amount: Decimal) -> None:
    """Give back a reservation of a turn that will not be charged."""
    if amount <= 0:
        return
    _statements().release(unit, {"user": user_id, "held": quantize(amount)})


def settle_turn(unit: Unit | Batch, user_id: int, message_id: int, cost: Decimal | None, reserved: Decimal) -> None:
    """What a worker's settlement of a turn does with its user's money: a turn with a cost is charged it
    (`charge_turn`); one without (a failure, a refusal) only gives back what it held."""
    if cost is None:
        release(unit, user_id, reserved)
    else:
        charge_turn(unit, user_id, message_id, cost, reserved)


def charge_turn(unit: Unit | Batch, user_id: int, message_id: int, cost: Decimal, reserved: Decimal) -> None:
    """Settle a turn: release its reservation and charge its real cost, at most what the balance holds beyond
    the other turns' reservations.

    A charge of zero writes no ledger row; a turn already charged is not charged again, its balance
    untouched (`_statements`)."""
    sql = _statements()
    values = {"user": user_id, "message": message_id, "cost": quantize(cost), "held": quantize(reserved),
              "at": utc_now()}
    sql.charge(unit, values)
    sql.settle(unit, values)
