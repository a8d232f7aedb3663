"""What ordinary use rebuilds of the adapter, and what fingerprints prove afterwards (SmolLM2).

    # transcripts: the client's own rows from plain questions (any backend: same PLL answers)
    python benchmarks/bench_clone.py record ARTIFACT on  -o T_ON     # the 210 training questions
    python benchmarks/bench_clone.py record ARTIFACT off -o T_OFF    # 50 generic questions
    python benchmarks/bench_clone.py record PADS_ARTIFACT on -o T_ACC --accounts DB --account NAME --limit 40
    # the clone's fidelity by rows per site (fit, peft adapter, 70 held-out demo questions)
    python benchmarks/bench_clone.py curve T_ON --adapter ADAPTER --rows 128 256 576 1000 2000 0
    # the largest fingerprint strength that leaves the greedy answers unchanged
    python benchmarks/bench_clone.py strength PADS_ARTIFACT --strengths 0.01 0.03 0.1 0.3 1 3 5
    # tracing: the clone of T_ACC among the database's accounts, and innocent fingerprints' scores
    python benchmarks/bench_clone.py trace PADS_ARTIFACT T_ACC --accounts DB --rows 128 256 576 1000 0

Each command prints a table and, with --json, writes it.
"""

from __future__ import annotations

import argparse
import json
import secrets
import tempfile
import time
from pathlib import Path

import numpy as np

from privlora.client.transcript import load_transcript
from privlora.paths import DEMO_ADAPTER
from privlora.server.fingerprints import RECOMMENDED_STRENGTH, FingerprintKey, account_fingerprint
from privlora.tools.clone import clone_adapter, evaluate_clone, fit_transcript, greedy_answers, record_chats, reference, write_adapter
from privlora.tools.machine import report_machine
from privlora.tools.qa import load_qa


def questions(which: str) -> list[str]:
    if which == "on":
        return [pair.question for pair in load_qa(split="train")]
    return (Path(__file__).parents[1] / "privlora" / "data" / "generic_questions.txt").read_text().splitlines()


def record(args: argparse.Namespace) -> list[dict]:
    transport = None
    if args.accounts:
        from privlora.local import InProcessTransport
        from privlora.server.accounts import AccountStore
        from privlora.server.private import PrivateServer

        store = AccountStore(args.accounts, create=True)
        token = store.create(args.account)
        transport = InProcessTransport(PrivateServer(args.artifact, accounts=store), token)
    asked = questions(args.which)[: args.limit]
    start = time.perf_counter()
    rows = record_chats(args.artifact, asked, args.output, transport=transport)
    row = {"questions": len(asked), "rows": rows, "seconds": round(time.perf_counter() - start, 1)}
    print(row)
    return [row]


def curve(args: argparse.Namespace) -> list[dict]:
    truth = reference(args.adapter, questions=args.questions)
    results = []
    for rows in args.rows:
        sites = load_transcript(args.transcript, rows or None)
        for method, rank in args.methods:
            fits = fit_transcript(sites, method, rank)
            with tempfile.TemporaryDirectory() as scratch:
                written = write_adapter(clone_adapter(fits, Path(scratch) / "clone"), "smollm2")
                fidelity = evaluate_clone(fits, written, truth).to_json()
            fidelity["method"] = method + (f"-r{rank}" if rank else "")
            results.append(fidelity)
            print(f"rows {fidelity['rows']:>6} {fidelity['method']:<10} determined {fidelity['determined_sites']:>2}/"
                  f"{fidelity['sites']}  fact {fidelity['clone_states_fact']:.0%} (adapter "
                  f"{fidelity['adapter_states_fact']:.0%})  identical {fidelity['identical_answers']:.0%}  tokens "
                  f"{fidelity['token_agreement']:.1%}  delta error {fidelity['delta_error']:.1e}", flush=True)
    return results


def strength(args: argparse.Namespace) -> list[dict]:
    from privlora.models.loading import load_model
    from privlora.models.lora import attach_adapter
    from privlora.models.registry import architecture
    from privlora.tools.trace import marked_adapter, served_adapter

    truth = reference(DEMO_ADAPTER, questions=args.questions)
    served = served_adapter(args.artifact)
    sites = [site.site for site in served.sites.values()]
    results = []
    for value in args.strengths:
        identical = []
        for draw in range(args.accounts):
            fingerprint = account_fingerprint(FingerprintKey(secrets.token_bytes(32), value), f"a{draw}", sites)
            model = load_model("smollm2").model
            attach_adapter(model, marked_adapter(truth.adapter, served, fingerprint), architecture("llama").lora_targets)
            answers = greedy_answers(model, truth.prompts, truth.config)
            identical.append(sum(a == b for a, b in zip(answers, truth.answers)) / len(answers))
        row = {"strength": value, "accounts": args.accounts, "identical_answers_min": min(identical),
               "identical_answers_mean": float(np.mean(identical))}
        results.append(row)
        print(row, flush=True)
    return results


def trace_power(args: argparse.Namespace) -> list[dict]:
    from privlora.server.accounts import AccountStore
    from privlora.tools.trace import named, trace

    store = AccountStore(args.accounts)
    key = store.fingerprint_key()
    accounts = [usage.account.name for usage in store.usage()]
    results = []
    for rows in args.rows:
        fits = fit_transcript(load_transcript(args.transcript, rows or None))
        with tempfile.TemporaryDirectory() as scratch:
            written = write_adapter(clone_adapter(fits, Path(scratch) / "clone"), "smollm2")
            scores = trace(args.artifact, written, key, accounts, args.null)
            # innocents: fingerprints of accounts that never asked anything (fresh names under the same key)
            innocents = trace(args.artifact, written, key, [f"innocent-{i}" for i in range(args.innocents)], args.null)
        found = named(scores)
        wrongly = sum(s.p_value * len(accounts) < 0.01 for s in innocents)
        row = {"rows": max(f.rows for f in fits), "named": found.account if found else None,
               "carried": scores[0].carried, "z": scores[0].z, "p_value": scores[0].p_value,
               "next_z": scores[1].z if len(scores) > 1 else None, "accounts": len(accounts),
               "innocents": args.innocents, "innocents_named": wrongly,
               "innocent_z_max": max(s.z for s in innocents)}
        results.append(row)
        print(row, flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default=None, help="also write the results here")
    commands = parser.add_subparsers(dest="command", required=True)
    rec = commands.add_parser("record")
    rec.add_argument("artifact")
    rec.add_argument("which", choices=("on", "off"))
    rec.add_argument("-o", "--output", required=True)
    rec.add_argument("--limit", type=int, default=None)
    rec.add_argument("--accounts", default=None, help="record as an account of a server with this database")
    rec.add_argument("--account", default="suspect")
    cur = commands.add_parser("curve")
    cur.add_argument("transcript")
    cur.add_argument("--adapter", default=str(DEMO_ADAPTER))
    cur.add_argument("--rows", type=int, nargs="+", default=[128, 256, 576, 1000, 2000, 0])
    cur.add_argument("--methods", nargs="+", default=["lstsq"],
                     help="lstsq, ridge, or METHOD:RANK for a rank-truncated fit")
    cur.add_argument("--questions", type=int, default=70)
    st = commands.add_parser("strength")
    st.add_argument("artifact")
    st.add_argument("--strengths", type=float, nargs="+", default=[RECOMMENDED_STRENGTH])
    st.add_argument("--accounts", type=int, default=3, help="random fingerprints tried per strength")
    st.add_argument("--questions", type=int, default=70)
    tr = commands.add_parser("trace")
    tr.add_argument("artifact")
    tr.add_argument("transcript")
    tr.add_argument("--accounts", required=True)
    tr.add_argument("--rows", type=int, nargs="+", default=[128, 256, 576, 1000, 0])
    tr.add_argument("--null", type=int, default=200)
    tr.add_argument("--innocents", type=int, default=1000)
    args = parser.parse_args()
    if args.command == "curve":
        args.methods = [(m.split(":")[0], int(m.split(":")[1]) if ":" in m else None) for m in args.methods]
    report_machine()
    handler = {"record": record, "curve": curve, "strength": strength, "trace": trace_power}[args.command]
    results = handler(args)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
