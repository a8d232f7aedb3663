"""``privlora chat``: an interactive conversation in the terminal, with secure generation."""

from __future__ import annotations

import argparse

from privlora.cli.options import (add_kept_pads_option, add_record_option, add_sampling_options, add_server_options,
                                  assistants, sampling)
from privlora.cli.parsing import Subparsers, add_command


def register(subparsers: Subparsers) -> None:
    parser = add_command(subparsers, "chat", run, "an interactive chat in the terminal, with secure generation")
    parser.add_argument("artifact", nargs=1, help="artifact directory")
    add_server_options(parser)
    add_kept_pads_option(parser)
    add_record_option(parser)
    parser.add_argument("--system", default=None, metavar="TEXT", help="a system message that opens the conversation")
    add_sampling_options(parser, max_new_tokens_help="the longest answer",
                         top_p_help="nucleus sampling mass, in (0, 1]")


def run(args: argparse.Namespace) -> int:
    from privlora.client.chat import ChatSession, run_chat

    (assistant,) = assistants(args)
    run_chat(ChatSession(assistant, system=args.system, **sampling(args)))
    return 0
