"""The ``privlora`` command: the parser assembled from every command's ``register``, and the one
place that turns a failure into a one-line message and an exit code (2: usage, 1: runtime, 130:
interrupted), so that no command prints a traceback for a user's mistake."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Sequence

from privlora import __version__
from privlora.cli import (accounts, attack, bench, chat, compile, demo, evaluate, finetune, gateway, generate, inspect,
                          loadtest, models, prepare, serve)
from privlora.cli.parsing import Parser, formatter
from privlora.errors import PrivloraError

# In the order `privlora --help` lists them.
COMMANDS = (prepare, finetune, evaluate, compile, accounts, inspect, serve, models, generate, gateway, chat, loadtest,
            attack, bench, demo)
# The install role (pyproject extra) each command needs; the others need the full `compile` set.
INSTALL_ROLES = {"generate": "client", "chat": "client", "inspect": "client", "models": "client", "gateway": "gateway",
                 "serve": "server", "accounts": "server"}


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="privlora", formatter_class=formatter,
        description="Private inference for LoRA-fine-tuned LLMs: the prompt stays encrypted, "
                    "the adapter stays on the server.")
    parser.add_argument("--version", action="version", version=f"privlora {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in COMMANDS:
        command.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except PrivloraError as exc:
        print(f"privlora: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except ModuleNotFoundError as exc:  # a command of another install role
        role = INSTALL_ROLES.get(args.command, "compile")
        print(f"privlora: error: '{args.command}' needs the {role} install role (missing module {exc.name}): "
              f"pip install 'privlora[{role}]'", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("privlora: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader of our output left (`| head`): nothing more to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit's flush is quiet
        return 128 + signal.SIGPIPE
