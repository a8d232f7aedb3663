"""``privlora demo``: the whole story on held-out questions: the base model, the fine-tuned model
with secure generation, and the fine-tuned model in plaintext, side by side."""

from __future__ import annotations

import argparse
from pathlib import Path

from privlora.backends import DEFAULT_BACKEND, available
from privlora.cli.options import add_adapter_option, add_base_option
from privlora.cli.parsing import POSITIVE_INT, Subparsers, add_command


def register(subparsers: Subparsers) -> None:
    parser = add_command(subparsers, "demo", run,
                         "held-out questions answered by the base model, by the fine-tuned model with secure "
                         "generation (prompt encrypted, adapter on the server) and by the fine-tuned model in "
                         "plaintext")
    add_base_option(parser)
    add_adapter_option(parser)
    parser.add_argument("--questions", type=POSITIVE_INT, default=3, help="how many held-out questions to ask")
    parser.add_argument("--backend", nargs="+", default=[DEFAULT_BACKEND],
                        choices=[name for name in available() if name != "reference"],
                        help="private backends for the secure answers (several: side by side on the same questions)")


def run(args: argparse.Namespace) -> int:
    from privlora.tools.demo import run_demo

    run_demo(base=args.base, adapter=Path(args.adapter), questions=args.questions, backends=tuple(args.backend))
    return 0
