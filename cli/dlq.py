"""`agentq dlq list / show ID / requeue ID|--all / purge ID|--all`: dead letters from a shell, and
`agentq dlq retries`: the runs that may become one, waiting for a retry.

The services are imported by the command that runs, not with the parser, so that every other command
(`db init`, `users create`, the parent of `worker`) starts without loading them.

Each command prints one JSON object, in the same shape as the admin API's answer, so a script can
read it; an unknown id prints the contract's error object on stderr and exits 1.
"""

from __future__ import annotations

import argparse

from cli.arguments import listing_cursor, page_size, record_id
from cli.output import print_json


def cmd_list(args: argparse.Namespace) -> int:
    from app import dead_letters
    from web import render

    if args.limit is None:
        print_json({"items": [render.dead_letter(v) for v in dead_letters.every_dead_letter(args.cursor)]})
        return 0
    print_json(render.dead_letter_page(dead_letters.list_dead_letters(args.limit, args.cursor)))
    return 0


def cmd_retries(args: argparse.Namespace) -> int:
    from app import waiting_retries
    from web import render

    print_json(render.waiting_retries(waiting_retries.soonest_first()))
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from app import dead_letters
    from web import render

    print_json(render.dead_letter(dead_letters.get_dead_letter(args.id), detail=True))
    return 0


def cmd_requeue(args: argparse.Namespace) -> int:
    from app import dead_letter_requeue
    from web import render
    from workers.broker import install_broker

    ident = args.id
    install_broker()
    print_json(render.requeue_outcome(dead_letter_requeue.requeue(ident) if ident is not None
                                     else dead_letter_requeue.requeue_all()))
    return 0


def cmd_purge(args: argparse.Namespace) -> int:
    from app import dead_letters

    ident = args.id
    if ident is not None:
        dead_letters.purge(ident)
        print_json({"purged": [ident]})
        return 0
    print_json({"purged": dead_letters.purge_all()})
    return 0


DEAD_LETTER_ID = "the dead letter's id, as `dlq list` prints it (its `id`, not its `run_id`)"


def add_dlq_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    dlq = sub.add_parser("dlq", help="dead letters: messages whose retries ran out")
    commands = dlq.add_subparsers(dest="dlq_command", metavar="COMMAND", required=True)
    listing = commands.add_parser("list", help="list the dead letters, newest first")
    listing.add_argument("--limit", type=page_size, help="a page of at most this many, with its next_cursor")
    listing.add_argument("--cursor", type=listing_cursor, help="start after this next_cursor of an earlier page")
    listing.set_defaults(func=cmd_list)
    commands.add_parser("retries", help="the runs waiting for a retry, the soonest first (not yet dead letters)"
                        ).set_defaults(func=cmd_retries)
    show = commands.add_parser("show", help="one dead letter, with its last traceback")
    show.add_argument("id", type=record_id, help=DEAD_LETTER_ID)
    show.set_defaults(func=cmd_show)
    for name, func, text in (("requeue", cmd_requeue, "run the dead letter's turn again (it goes back to pending)"),
                             ("purge", cmd_purge, "delete the dead letter for good (its turn stays error)")):
        command = commands.add_parser(name, help=text)
        which = command.add_mutually_exclusive_group(required=True)  # one or the other: a usage error otherwise
        which.add_argument("id", type=record_id, nargs="?", help=DEAD_LETTER_ID)
        which.add_argument("--all", action="store_true", help="every dead letter")
        command.set_defaults(func=func)
