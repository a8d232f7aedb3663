"""``privlora bench``: per-site cost and accuracy of the private backends at real model shapes."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from privlora.backends import available
from privlora.cli.options import add_backend_options
from privlora.cli.parsing import POSITIVE_INT, Subparsers, add_command


def register(subparsers: Subparsers) -> None:
    parser = add_command(subparsers, "bench", run,
                         "per-site cost and accuracy of the private backends at SmolLM2 and ChatGLM2-6B shapes")
    parser.add_argument("--backend", nargs="+", default=["pads", "bfv", "ckks", "concrete", "plain"], choices=available(),
                        help="backends to measure")
    parser.add_argument("--site", nargs="+", default=["smollm2", "chatglm2"],
                        choices=["smollm2", "chatglm2", "smollm2-prefill"],
                        help="smollm2: fused q+v 576->768 with the demo adapter on real activations, one decoded row; "
                             "smollm2-prefill: the same site, 52 rows at once (one prompt's prefill); "
                             "chatglm2: query_key_value 4096->4608 r=8, random weights, one decoded row")
    add_backend_options(parser, "a backend option for every backend measured, repeatable: e.g. privacy=rigorous (bfv)")
    parser.add_argument("--repeats", type=POSITIVE_INT, default=None,
                        help="timed single-row calls per site (default 5; 2 for concrete)")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON")


def run(args: argparse.Namespace) -> int:
    from privlora.tools.bench import CASES, bench_site, render
    from privlora.progress import Progress
    from privlora.tools.machine import report_machine

    machine = report_machine()
    cases = {name: CASES[name]() for name in args.site}
    results = []
    with Progress(len(args.backend) * len(cases), "bench", "backend x site") as progress:
        for name in args.backend:  # backend-major: concrete's runtime threads must not slow the others
            for case in cases.values():
                repeats = args.repeats if args.repeats is not None else (2 if name == "concrete" else 5)
                results.append(bench_site(name, case, repeats=repeats, options=dict(args.backend_option)))
                progress.advance()
    print(render(results))
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine.to_json(), "sites": [r.to_json() for r in results]},
                                              indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0
