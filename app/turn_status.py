"""The statuses of a turn (and of an admin test run) and which changes between them are legal.

After intake (`app.turn_intake` inserts the first `pending`), a status changes only in
`app.turn_state` (a turn) and `app.debug_run_state` (a test run), each change an UPDATE guarded by
`sources_for`, which says which current statuses may move to the requested one; everything else only
reads these names.
"""

from __future__ import annotations

from enum import StrEnum


class TransitionRefused(RuntimeError):
    """The run was not in a status from which the requested change is legal."""


class TurnStatus(StrEnum):
    PENDING = "pending"
    PROCESSING = "processing"
    SUCCESS = "success"
    ERROR = "error"
    INSUFFICIENT_BALANCE = "insufficient_balance"
    CONTENT_VIOLATION = "content_violation"
    LLM_ERROR = "llm_error"
    CANCELLED = "cancelled"

    @property
    def is_terminal(self) -> bool:
        return self not in IN_FLIGHT


STOPPED = "stopped on request"
"""The error text of a turn that ended `cancelled` because its user stopped it, however it ended."""

IN_FLIGHT: frozenset[TurnStatus] = frozenset({TurnStatus.PENDING, TurnStatus.PROCESSING})
TERMINAL: frozenset[TurnStatus] = frozenset(TurnStatus) - IN_FLIGHT
IN_FLIGHT_VALUES: tuple[str, ...] = tuple(sorted(s.value for s in IN_FLIGHT))
CHARGED: frozenset[TurnStatus] = frozenset({TurnStatus.SUCCESS, TurnStatus.CANCELLED})
"""The contract's "charged" column: a success once, a stop for the tokens generated; a turn that ends in any
other status is charged nothing and its reservation is released."""
UNSUCCESSFUL: tuple[TurnStatus, ...] = tuple(s for s in TurnStatus if s in TERMINAL and s is not TurnStatus.SUCCESS)
"""The ends an operator looks at among recent turns (`app.operations.recent_failures`): every end but `success`,
a stop included."""

_ALLOWED: dict[TurnStatus, frozenset[TurnStatus]] = {
    TurnStatus.PENDING: frozenset({TurnStatus.PROCESSING, TurnStatus.CANCELLED, TurnStatus.ERROR}),
    TurnStatus.PROCESSING: TERMINAL,
    TurnStatus.ERROR: frozenset({TurnStatus.PENDING}),
}


def sources_for(target: TurnStatus) -> tuple[str, ...]:
    """The statuses from which `target` may be reached, as plain strings for a WHERE clause."""
    return tuple(sorted(s.value for s, targets in _ALLOWED.items() if target in targets))
