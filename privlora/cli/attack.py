"""``privlora attack extract|clone|trace``: what a client can learn of the adapter, and what its
owner can prove afterwards.

- ``extract``: chosen-input extraction of one site by a client with its own keys, by PLL noise
  level (and, optionally, that noise's cost in quality);
- ``clone``: the adapter's function rebuilt from a transcript of ordinary use
  (``generate/chat --record``), written as a peft adapter, and its fidelity measured;
- ``trace``: the owner's test of a suspect adapter against every account's fingerprint."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from privlora.cli.parsing import NON_NEGATIVE, POSITIVE, POSITIVE_INT, PROBABILITY, Subparsers, add_command, formatter


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
    _register_clone(kinds)
    _register_trace(kinds)


def _register_clone(kinds: argparse._SubParsersAction) -> None:
    from privlora.paths import DEMO_ADAPTER

    clone = kinds.add_parser("clone", formatter_class=formatter,
                             help="rebuild the adapter's function from a transcript of ordinary use",
                             description="Fit every LoRA site's map from the rows a client recorded "
                                         "(`privlora generate/chat --record DIR`) and write the fit as a peft adapter.")
    clone.set_defaults(handler=run_clone)
    clone.add_argument("transcript", help="transcript directory (from --record)")
    clone.add_argument("-o", "--output", required=True, metavar="DIR", help="peft adapter directory to write")
    clone.add_argument("--method", choices=("lstsq", "ridge"), default="lstsq",
                       help="lstsq: minimum-norm least squares; ridge: shrink the directions seen least")
    clone.add_argument("--ridge", type=POSITIVE, default=1e-3, metavar="LAMBDA",
                       help="with --method ridge: the shrinkage, relative to the rows' mean energy per dimension")
    clone.add_argument("--rank", type=POSITIVE_INT, default=None, help="truncate every fit to this rank")
    clone.add_argument("--rows", type=POSITIVE_INT, default=None, metavar="N",
                       help="use only the first N rows of each site (a shorter conversation)")
    clone.add_argument("--base", default="smollm2", help="base model the adapter is for (written in its config)")
    clone.add_argument("--evaluate", action="store_true",
                       help="also measure the clone against the real adapter on the demo's held-out questions")
    clone.add_argument("--adapter", default=str(DEMO_ADAPTER), help="with --evaluate: the real adapter directory")
    clone.add_argument("--questions", type=POSITIVE_INT, default=70, help="with --evaluate: held-out questions asked")
    clone.add_argument("--json", default=None, metavar="PATH", help="with --evaluate: also write the figures as JSON")


def _register_trace(kinds: argparse._SubParsersAction) -> None:
    trace = kinds.add_parser("trace", formatter_class=formatter,
                             help="which account's fingerprint a suspect adapter carries (the owner's tool)",
                             description="Test a suspect peft adapter (a clone) against the fingerprint of every "
                                         "account in the database, for the artifact it was cloned from.")
    trace.set_defaults(handler=run_trace)
    trace.add_argument("suspect", help="the suspect peft adapter directory")
    trace.add_argument("--artifact", required=True, help="the artifact (bfv or pads build) the accounts were served")
    trace.add_argument("--accounts", required=True, metavar="DB", help="the server's accounts database")
    trace.add_argument("--null", type=POSITIVE_INT, default=200, metavar="N",
                       help="fingerprints from fresh secrets that set the null distribution")
    trace.add_argument("--alpha", type=PROBABILITY, default=0.01,
                       help="name an account when its p-value times the number of accounts is below this")


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


def run_clone(args: argparse.Namespace) -> int:
    from privlora.client.transcript import load_transcript
    from privlora.tools.clone import clone_adapter, evaluate_clone, fit_transcript, reference, write_adapter

    sites = load_transcript(args.transcript, args.rows)
    fits = fit_transcript(sites, args.method, args.rank, args.ridge)
    written = write_adapter(clone_adapter(fits, Path(args.output)), args.base)
    short = [fit for fit in fits if not fit.determined]
    print(f"fitted {len(fits)} sites from {max(f.rows for f in fits)} rows each; wrote {written}")
    if short:
        print(f"underdetermined at {len(short)} of {len(fits)} sites: their rows span {min(f.span for f in short)} to "
              f"{max(f.span for f in short)} of {short[0].d_in}+ input dimensions, so the fit is exact only on "
              "the inputs' span (zero off it)")
    if args.evaluate:
        fidelity = evaluate_clone(fits, written, reference(args.adapter, args.base, args.questions))
        print(f"on {fidelity.questions} held-out questions: clone states the fact in {fidelity.clone_states_fact:.0%} "
              f"(the adapter: {fidelity.adapter_states_fact:.0%}), answers identical to the adapter's "
              f"{fidelity.identical_answers:.0%}, token agreement {fidelity.token_agreement:.1%}, median relative "
              f"delta error {fidelity.delta_error:.1e}")
        if args.json:
            Path(args.json).write_text(json.dumps(fidelity.to_json(), indent=2) + "\n")
    return 0


def run_trace(args: argparse.Namespace) -> int:
    from privlora.server.accounts import AccountStore
    from privlora.tools.trace import named, trace

    store = AccountStore(args.accounts)
    key = store.fingerprint_key()
    accounts = [usage.account.name for usage in store.usage()]
    scores = trace(args.artifact, args.suspect, key, accounts, args.null)
    print(f"{'account':<20} {'carried':>8} {'z':>8} {'p-value':>10}")
    for score in scores[:10]:
        print(f"{score.account:<20} {score.carried:>8.3f} {score.z:>8.1f} {score.p_value:>10.1e}")
    found = named(scores, args.alpha)
    if found is None:
        print(f"no account named: none of {len(accounts)} carries its fingerprint at p < {args.alpha:g} / {len(accounts)}")
        return 1
    print(f"named {found.account!r}: carries {found.carried:.0%} of its fingerprint (p = {found.p_value:.1e}, "
          f"{len(accounts)} accounts tested)")
    return 0
