"""``privlora compile``: base model + LoRA adapter -> an artifact (client and server bundles)."""

from __future__ import annotations

import argparse
from pathlib import Path

from privlora.backends import DEFAULT_BACKEND, REGISTRY, available
from privlora.cli.options import add_adapter_option, add_backend_options, add_base_option
from privlora.cli.parsing import Subparsers, add_command


def register(subparsers: Subparsers) -> None:
    parser = add_command(subparsers, "compile", run,
                         "compile base model + LoRA adapter into an artifact (client and server bundles)")
    add_base_option(parser)
    add_adapter_option(parser)
    parser.add_argument("-o", "--output", required=True, help="artifact directory to write")
    parser.add_argument("--backend", default=DEFAULT_BACKEND, choices=available(),
                        help="how private rounds are evaluated: " +
                             "; ".join(f"{name}: {REGISTRY[name].summary}" for name in available()))
    add_backend_options(parser, "a backend option, repeatable: e.g. privacy=rigorous (bfv), sigma=100, x_bits=12")
    parser.add_argument("--dump-ir", default=None, metavar="DIR",
                        help="also write the IR after every pass to DIR (the artifact always keeps a copy in ir/)")
    parser.add_argument("--debug", action="store_true", help="check every pass numerically on sample steps")
    parser.add_argument("--force", action="store_true", help="replace an existing artifact directory")
    parser.add_argument("--quiet", action="store_true",
                        help="print only the summary line, not a line per phase on stderr")


def run(args: argparse.Namespace) -> int:
    from privlora.compiler.driver import compile_artifact

    report = compile_artifact(args.base, args.adapter, args.output, backend=args.backend,
                              dump_ir=Path(args.dump_ir) if args.dump_ir else None, debug=args.debug, force=args.force,
                              backend_options=dict(args.backend_option), quiet=args.quiet)
    print(f"wrote {report.artifact} in {report.seconds:.1f} s: {report.sites} LoRA sites, "
          f"{report.rounds} rounds and {report.segments} public segments per step; "
          f"client bundle {report.client_bytes / 1e6:.1f} MB, server bundle {report.server_bytes / 1e6:.2f} MB")
    return 0
