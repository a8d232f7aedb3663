"""``privlora evaluate``: whether fine-tuning taught the facts, before anything is made private."""

from __future__ import annotations

import argparse
import json

from privlora.cli.options import add_adapter_option, add_base_option, add_qa_options
from privlora.cli.parsing import POSITIVE_INT, Subparsers, add_command


def register(subparsers: Subparsers) -> None:
    parser = add_command(subparsers, "evaluate", run,
                         "ask the base and the adapted model the dataset's questions; report fact match rates")
    add_base_option(parser)
    add_adapter_option(parser)
    add_qa_options(parser, split="heldout", split_help="which split to ask")
    parser.add_argument("--limit", type=POSITIVE_INT, default=None, help="ask only the first N questions")
    parser.add_argument("--json", action="store_true", help="print the rates as JSON")


def run(args: argparse.Namespace) -> int:
    from privlora.tools.evaluate import evaluate_facts
    from privlora.models.loading import load_model
    from privlora.models.step import TorchStep
    from privlora.tools.qa import load_qa

    pairs = load_qa(args.data, split=args.split)[: args.limit]
    base = load_model(args.base)
    adapted = load_model(args.base, args.adapter)
    reports = {"base": evaluate_facts(TorchStep(base.model), base.tokenizer, pairs, "base"),
               "adapted": evaluate_facts(TorchStep(adapted.model), adapted.tokenizer, pairs, "adapted")}
    if args.json:
        print(json.dumps({name: {"matched": r.matched, "questions": len(r.checks), "match_rate": r.match_rate}
                          for name, r in reports.items()}, indent=2))
        return 0
    for name, report in reports.items():
        print(f"{name:8s} states the fact in {report.matched}/{len(report.checks)} answers "
              f"({100 * report.match_rate:.1f}%)")
    return 0
