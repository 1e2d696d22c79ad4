"""`agentq debug route|prompt|execute AGENT_ID "content" --admin-id ID`: the admin debugging API from a shell.

Each command prints the JSON the API answers, built by the same renderers; `execute --wait` polls the
debug log until the run ends and prints it.
"""

from __future__ import annotations

import argparse

from cli.arguments import record_id, seconds
from cli.output import print_error, print_json


def cmd_debug_route(args: argparse.Namespace) -> int:
    from app import debugging
    from app.auth import admin_principal
    from web import render

    admin_principal(args.admin_id)
    print_json(render.route_decision(debugging.route_decision(args.agent_id, args.content, args.conversation_id)))
    return 0


def cmd_debug_prompt(args: argparse.Namespace) -> int:
    from app import debugging
    from app.auth import admin_principal
    from web import render

    admin_principal(args.admin_id)
    print_json(render.prompt_preview(debugging.preview_prompt(args.agent_id, args.content, args.conversation_id)))
    return 0


DEFAULT_WAIT_SECONDS = 600.0
RUN_UNSUCCESSFUL = 3
"""The exit status of a `--wait` whose run ended in anything but `success` (1 is a command that failed, 2 a usage
error): the run itself is printed as for a success."""


def cmd_debug_execute(args: argparse.Namespace) -> int:
    from app import debugging
    from app.auth import admin_principal
    from web import render
    from workers.broker import install_broker

    if args.timeout is not None and not args.wait:  # before the run is written: it would be started regardless
        args.parser.error("--timeout is how long --wait waits: give --wait too")
    admin = admin_principal(args.admin_id)
    install_broker()
    log_id = debugging.start_debug_run(admin, args.agent_id, args.content)
    if not args.wait:
        print_json({"debug_log_id": log_id})
        return 0
    waited = DEFAULT_WAIT_SECONDS if args.timeout is None else args.timeout
    waited_run = debugging.wait_for_debug_log(log_id, waited)
    print_json(render.debug_log(waited_run.run))
    if waited_run.still_running is not None:
        print_error("still_running", waited_run.still_running)
        return 1
    if waited_run.unsuccessful is not None:
        print_error("run_unsuccessful", waited_run.unsuccessful)
        return RUN_UNSUCCESSFUL
    return 0


def add_debug_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    debug = sub.add_parser("debug", help="admin debugging: route test, prompt preview, execution test")
    commands = debug.add_subparsers(dest="debug_command", metavar="COMMAND", required=True)
    helps = {
        "route": ("the routing decision of a turn, without calling a model", cmd_debug_route),
        "prompt": ("the messages a turn would send upstream, without calling a model", cmd_debug_prompt),
        "execute": ("a test run through the workers, priced but never charged", cmd_debug_execute),
    }
    parsers: dict[str, argparse.ArgumentParser] = {}
    for name, (text, func) in helps.items():
        parser = commands.add_parser(name, help=text)
        parser.add_argument("agent_id", type=record_id, help="the id of the agent to test")
        parser.add_argument("content", help="the user message to test with")
        parser.add_argument("--admin-id", type=record_id, required=True, help="the administrator the test is run as")
        parser.set_defaults(func=func)
        parsers[name] = parser
    for name in ("route", "prompt"):
        parsers[name].add_argument("--conversation-id", type=record_id, default=None,
                                   help="take the history of this conversation of the agent (any user's)")
    parsers["execute"].add_argument("--wait", action="store_true", help="wait for the run to end and print its log")
    parsers["execute"].add_argument("--timeout", type=seconds, default=None,
                                    help=f"seconds --wait waits at most (default {DEFAULT_WAIT_SECONDS:g})")
    parsers["execute"].set_defaults(parser=parsers["execute"])
