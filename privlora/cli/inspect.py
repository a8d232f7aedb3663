"""``privlora inspect``: what an artifact holds, checked against its manifest (client role too)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from privlora.cli.parsing import Subparsers, add_command


def register(subparsers: Subparsers) -> None:
    parser = add_command(subparsers, "inspect", run,
                         "show what an artifact contains: model, sites, rounds, segments, sizes")
    parser.add_argument("artifact", help="artifact directory")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--ir", nargs="?", const="", default=None, metavar="PASS",
                        help="show the per-pass IR summary, or the IR after PASS (e.g. fuse_pll)")


def run(args: argparse.Namespace) -> int:
    from privlora.core.inspection import ir_listing, render, summary

    root = Path(args.artifact)
    if args.ir is not None:
        print(ir_listing(root, args.ir or None))
    elif args.json:
        print(json.dumps(summary(root), indent=2))
    else:
        print(render(summary(root)))
    return 0
