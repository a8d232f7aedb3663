"""``privlora attack extract``: what a malicious client with its own keys can learn of a private
LoRA site from chosen queries, by PLL noise level (and, optionally, that noise's cost in quality)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from privlora.cli.parsing import NON_NEGATIVE, POSITIVE_INT, Subparsers, add_command, formatter


def register(subparsers: Subparsers) -> None:
    attack = add_command(subparsers, "attack", run, "measure what a malicious client can extract from a LoRA site")
    kinds = attack.add_subparsers(dest="attack", metavar="ATTACK", required=True)
    extract = kinds.add_parser("extract", formatter_class=formatter,
                               help="chosen-input extraction of the demo adapter's layer-0 v_proj",
                               description="A client with its own keys queries one site with chosen inputs and "
                                           "fits the private map; error against queries and PLL sigma.")
    extract.set_defaults(handler=run)
    extract.add_argument("--sigmas", type=NON_NEGATIVE, nargs="+", default=[0.0, 3.2, 100.0, 1000.0, 10000.0],
                         help="PLL error standard deviations (integer units) to try")
    extract.add_argument("--queries", type=POSITIVE_INT, nargs="+", default=[144, 288, 576, 1152, 2304],
                         help="numbers of chosen queries (d_in is 576)")
    extract.add_argument("--bfv", action="store_true",
                         help="also attack through the real bfv backend (both messages, real encryption)")
    extract.add_argument("--quality", action="store_true",
                         help="also measure each sigma's cost in model quality (compiles SmolLM2 per sigma)")
    extract.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON")
    extract.add_argument("--plot", default=None, metavar="PATH", help="also draw the reply's error curves as SVG")


def run(args: argparse.Namespace) -> int:
    from privlora.tools.attack import demo_site, extraction_table, quality_table, render_extraction, render_svg

    _, _, _, name = demo_site()
    results = extraction_table(args.sigmas, args.queries, through_bfv=args.bfv)
    print(f"extraction of the demo adapter's {name} (576 -> 192, r = 8): relative error of the recovered map "
          "by number of chosen queries ('ex': recovered exactly)")
    print(render_extraction(results))
    document = {"site": name, "extraction": [r.to_json() for r in results]}
    if args.plot:
        Path(args.plot).write_text(render_svg(results))
        print(f"wrote {args.plot}")
    if args.quality:
        quality = quality_table(args.sigmas)
        print("\nmodel quality through the plain backend: greedy agreement with the plaintext fine-tuned model")
        for row in quality:
            print(f"sigma {row['sigma']:<8g} token agreement {row['token_agreement']:.1%}, "
                  f"identical answers {row['identical_answers']}/{row['questions']}")
        document["quality"] = quality
    if args.json:
        Path(args.json).write_text(json.dumps(document, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0
