"""The names workers and senders agree on: Dramatiq queues and actors.

A module of constants alone, so that what only needs a name (the command line's `--queues` choices, an
actor's declaration) does not import the database and broker code that `app.dispatch` needs to send."""

TURNS_QUEUE = "turns"
DEBUG_QUEUE = "debug"
RUN_TURN = "run_turn"
RUN_DEBUG = "run_debug_run"
QUEUES = (TURNS_QUEUE, DEBUG_QUEUE)
