"""The ``privlora`` command line.

Heavy libraries (torch, transformers) are imported inside the command handlers, so ``--help`` is
instant and ``import privlora.cli`` has no side effects.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

from privlora import __version__
from privlora.backends import DEFAULT_BACKEND, REGISTRY, available
from privlora.errors import PrivloraError, UsageError
from privlora.paths import DEMO_ADAPTER
from privlora.runtime.accounts import AccountLimits
from privlora.runtime.transport import TRANSPORTS


# The install role (pyproject extra) each command needs; the others need the full `compile` set.
ROLES = {"generate": "client", "chat": "client", "inspect": "client", "gateway": "gateway", "serve": "server",
         "accounts": "server"}
TOKEN_ENV_VAR = "PRIVLORA_TOKEN"


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults shown only where there is one worth showing: not for required options, flags or
    options whose absence means something the help text already says."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.required or action.default is None or action.default is False or action.default == [] \
                or action.default == argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


def _formatter(prog: str) -> argparse.HelpFormatter:
    return _HelpFormatter(prog, max_help_position=32)


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage mistake reported in one line (exit code 2) instead of the usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _number(kind: type, low: float | None = None, high: float | None = None, low_open: bool = False,
            high_open: bool = False) -> Callable[[str], int | float]:
    """An argparse type: a number of ``kind`` within the bounds, else a one-line usage error."""
    if high is None:
        bounds = f"{'greater than' if low_open else 'at least'} {low}"
    else:
        bounds = f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"

    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}") \
                from None
        too_low = low is not None and (value < low or (low_open and value == low))
        too_high = high is not None and (value > high or (high_open and value == high))
        if too_low or too_high:
            raise argparse.ArgumentTypeError(f"must be {bounds}, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


POSITIVE_INT = _number(int, 1)
COUNT = _number(int, 0)
PORT = _number(int, 1, 65535)
POSITIVE = _number(float, 0, low_open=True)
NON_NEGATIVE = _number(float, 0)
PROBABILITY = _number(float, 0, 1, low_open=True)


def _add_base(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", default="smollm2",
                        help="base model: 'smollm2' (embedded SmolLM2-135M-Instruct) or a local "
                             "Hugging Face checkpoint directory (config.json + safetensors)")


def cmd_prepare(args: argparse.Namespace) -> int:
    from privlora.models.checkpoint import read_config
    from privlora.models.loading import load_model, resolve_base
    from privlora.models.registry import describe

    start = time.perf_counter()
    path = resolve_base(args.base)
    prepared = time.perf_counter()
    load_model(path)
    shape = describe(read_config(path))
    print(f"base model   {path}")
    print(f"architecture {shape.architecture}: {shape.layers} layers, hidden {shape.hidden_size}, "
          f"{shape.heads} heads / {shape.kv_heads} KV heads, head dim {shape.head_dim}, vocab {shape.vocab_size}, "
          f"context {shape.context_length}")
    print(f"prepare {prepared - start:.1f} s, load {time.perf_counter() - prepared:.1f} s")
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    import torch

    from privlora.finetune import FinetuneConfig, finetune
    from privlora.models.loading import resolve_base
    from privlora.qa import load_qa

    torch.manual_seed(args.seed)
    pairs = load_qa(args.data, split=args.split)
    if not pairs:
        raise PrivloraError(f"no {args.split!r} pairs in {args.data or 'the demo dataset'}")
    config = FinetuneConfig(rank=args.rank, alpha=args.alpha, dropout=args.dropout,
                            target_modules=tuple(args.targets), epochs=args.epochs,
                            learning_rate=args.lr, batch_size=args.batch_size, seed=args.seed)
    result = finetune(resolve_base(args.base), args.base, pairs, Path(args.output), config)
    print(f"wrote {result.adapter_dir} ({result.examples} examples, {result.steps} steps, "
          f"{result.seconds:.0f} s, loss {result.first_epoch_loss:.3f} -> {result.last_epoch_loss:.3f})")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from privlora.evaluate import evaluate_facts
    from privlora.models.loading import load_model
    from privlora.models.step import TorchStep
    from privlora.qa import load_qa

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


def cmd_demo(args: argparse.Namespace) -> int:
    from privlora.demo import run_demo

    run_demo(base=args.base, adapter=Path(args.adapter), questions=args.questions, backends=tuple(args.backend))
    return 0


def backend_option(text: str) -> tuple[str, object]:
    """``KEY=VALUE`` with VALUE read as JSON when it parses (numbers, true/false), else as a string."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def cmd_compile(args: argparse.Namespace) -> int:
    from privlora.compiler.driver import compile_artifact

    report = compile_artifact(args.base, args.adapter, args.output, backend=args.backend,
                              dump_ir=Path(args.dump_ir) if args.dump_ir else None, debug=args.debug, force=args.force,
                              backend_options=dict(args.backend_option))
    print(f"wrote {report.artifact} in {report.seconds:.1f} s: {report.sites} LoRA sites, "
          f"{report.rounds} rounds and {report.segments} public segments per step; "
          f"client bundle {report.client_bytes / 1e6:.1f} MB, server bundle {report.server_bytes / 1e6:.2f} MB")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from privlora.core.inspection import ir_listing, render, summary

    root = Path(args.artifact)
    if args.ir is not None:
        print(ir_listing(root, args.ir or None))
    elif args.json:
        print(json.dumps(summary(root), indent=2))
    else:
        print(render(summary(root)))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from privlora.runtime.http import TLS, serve
    from privlora.runtime.server import SessionLimits

    if (args.tls_cert is None) != (args.tls_key is None):
        raise UsageError("--tls-cert and --tls-key go together")
    tls = TLS(Path(args.tls_cert), Path(args.tls_key)) if args.tls_cert else None
    for path in (tls.cert, tls.key) if tls else ():
        if not path.is_file():
            raise UsageError(f"no such file: {path}")
    limits = SessionLimits(idle_seconds=args.session_ttl, max_sessions=args.max_sessions,
                           max_rows=args.max_rows or None, rate=args.rate or None, burst=args.burst)
    scheme = "https" if tls else "http"
    engine = f"Ray Serve ({_scaling_text(args)})" if args.ray else "uvicorn"
    print(f"privlora server: {', '.join(args.artifact)} on {scheme}://{args.host}:{args.port} with {engine} "
          "(Ctrl-C to stop)", file=sys.stderr)
    if args.ray:
        from privlora.runtime.http import configure_logging
        from privlora.runtime.ray_serving import Scaling, serve_with_ray

        configure_logging(args.log_level)
        scaling = Scaling(replicas=args.replicas, autoscale=tuple(args.autoscale) if args.autoscale else None,
                          cpus_per_replica=args.cpus_per_replica)
        serve_with_ray(args.artifact, args.host, args.port, limits, args.accounts, scaling, args.address, tls)
        return 0
    if args.replicas != 1 or args.autoscale or args.address:
        raise UsageError("--replicas, --autoscale and --address need --ray")
    serve(args.artifact, host=args.host, port=args.port, log_level=args.log_level, limits=limits,
          accounts=args.accounts, tls=tls)
    return 0


def _scaling_text(args: argparse.Namespace) -> str:
    if args.autoscale:
        return f"{args.autoscale[0]} to {args.autoscale[1]} replicas"
    return f"{args.replicas} replica{'s' if args.replicas != 1 else ''}"


def cmd_accounts(args: argparse.Namespace) -> int:
    from privlora.runtime.accounts import AccountLimits, AccountStore

    store = AccountStore(args.db, create=args.action == "create")
    if args.action == "create":
        limits = AccountLimits(max_rows=args.max_rows or None, max_sessions=args.max_sessions, rate=args.rate or None,
                               burst=args.burst)
        token = store.create(args.name, limits, admin=args.admin)
        print(token)
        print(f"created account {args.name!r}; the token above is shown once only (the database keeps its hash)",
              file=sys.stderr)
    elif args.action == "revoke":
        store.revoke(args.name)
        print(f"revoked account {args.name!r}", file=sys.stderr)
    else:
        rows = [("account", "status", "budget/site", "most used site", "sites", "rows in all", "sessions", "rate")]
        for usage in store.usage():
            account, limits = usage.account, usage.account.limits
            status = "revoked" if account.revoked else ("admin" if account.admin else "active")
            rows.append((account.name, status, str(limits.max_rows or "none"), str(usage.max_site_rows),
                         str(usage.sites), str(usage.total_rows), str(limits.max_sessions),
                         f"{limits.rate:g}/s" if limits.rate else "none"))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        print("\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows))
    return 0


def _credentials(args: argparse.Namespace):
    from privlora.runtime.transport import Credentials

    token = args.token or os.environ.get(TOKEN_ENV_VAR) or None
    if args.ca_cert is not None and not Path(args.ca_cert).is_file():
        raise UsageError(f"no such file: {args.ca_cert}")
    return Credentials(token=token, ca_cert=args.ca_cert)


def cmd_generate(args: argparse.Namespace) -> int:
    from privlora.runtime.client import SecureClient, render_timings, timing_report
    from privlora.core.artifact import CLIENT, TOKENIZER_DIR, load_bundle
    from privlora.progress import Progress
    from privlora.runtime.generation import GenerationConfig, check_context, generate
    from privlora.runtime.server import LOCAL, PrivateServer
    from privlora.runtime.tokenizer import load_client_tokenizer
    from privlora.runtime.transport import InProcessTransport, http_transport

    if not args.prompt.strip():
        raise UsageError("the prompt is empty")
    # The prompt is checked against the model before any key, session or encryption.
    bundle = load_bundle(args.artifact, CLIENT)
    tokenizer_dir = bundle.root / TOKENIZER_DIR
    if not tokenizer_dir.is_dir():
        raise PrivloraError(f"{args.artifact} has no tokenizer in its client bundle")
    tokenizer = load_client_tokenizer(tokenizer_dir)
    # --raw adds the tokenizer's own special tokens (a BOS when its add_bos_token says so), as Hugging Face does
    prompt = tokenizer.encode(args.prompt, add_special_tokens=True) if args.raw else tokenizer.encode_chat(args.prompt)
    check_context(len(prompt), args.max_new_tokens, bundle.manifest["model"]["context_length"])
    transport = (http_transport(args.server, args.transport, _credentials(args)) if args.server
                 else InProcessTransport(PrivateServer(args.artifact, LOCAL)))
    if args.backend_check:
        for hosted in transport.info()["artifacts"]:
            print(f"server: artifact {hosted['artifact'][:16]} ({hosted['name']}), backend {hosted['backend']}, "
                  f"{hosted['sessions']} open sessions", file=sys.stderr)
    client = SecureClient(args.artifact, transport, cache_keys=not args.no_key_cache, bundle=bundle)
    eos = () if tokenizer.eos_token_id is None else (tokenizer.eos_token_id,)
    config = GenerationConfig(max_new_tokens=args.max_new_tokens, do_sample=args.temperature > 0,
                              temperature=args.temperature or 1.0, top_p=args.top_p, eos_token_ids=eos, seed=args.seed)
    tokens: list[int] = []
    shown = ""
    prefill = None if args.quiet else Progress(client.groups_per_step, "prefill", "private groups")
    client.on_group = prefill.advance if prefill else None
    try:
        for token in generate(client, prompt, config):
            if client.on_group is not None:  # the prefill is done: its bar gives way to the answer
                client.on_group = None
                prefill.close()
            tokens.append(token)
            text = tokenizer.decode(tokens, skip_special_tokens=True)
            print(text[len(shown):], end="", flush=True)
            shown = text
        print()
    finally:
        client.close()
    if not args.quiet:
        recovered = (f", {client.recoveries} steps redone after faults ({client.sessions_opened - 1} new sessions)"
                     if client.recoveries else "")
        print(f"\n{len(prompt)} prompt tokens, {len(tokens)} generated, backend {client.backend_name}{recovered}",
              file=sys.stderr)
        print(render_timings(client.steps), file=sys.stderr)
    if args.stats_json:
        report = {"backend": client.backend_name, "prompt_tokens": len(prompt), "tokens": tokens,
                  **timing_report(client.steps)}
        Path(args.stats_json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


def _assistants(args: argparse.Namespace) -> list:
    """One assistant per artifact: on ``--server`` (which hosts them all), else each on an
    in-process server of its own."""
    from privlora.runtime.assistant import Assistant
    from privlora.runtime.server import LOCAL, PrivateServer
    from privlora.runtime.transport import InProcessTransport, http_transport

    credentials = _credentials(args) if args.server else None
    return [Assistant(artifact, http_transport(args.server, args.transport, credentials) if args.server
                      else InProcessTransport(PrivateServer(artifact, LOCAL)))
            for artifact in args.artifact]


def cmd_gateway(args: argparse.Namespace) -> int:
    import uvicorn

    from privlora.runtime.gateway import create_gateway
    from privlora.runtime.http import UVICORN_PROTOCOLS

    assistants = _assistants(args)
    app = create_gateway(assistants)
    print(f"privlora gateway: models {', '.join(a.name for a in assistants)} on http://{args.host}:{args.port}/v1 "
          f"(secure generation through {args.server or 'an in-process server'}; Ctrl-C to stop)", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False, **UVICORN_PROTOCOLS)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from privlora.runtime.chat import ChatSession, run_chat

    (assistant,) = _assistants(args)
    session = ChatSession(assistant, system=args.system, max_new_tokens=args.max_new_tokens,
                          temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    run_chat(session)
    return 0


def cmd_loadtest(args: argparse.Namespace) -> int:
    from privlora.loadtest import ServerProcess, run_load, wait_for_server

    if args.faults:
        return _soak(args)
    credentials = _credentials(args)
    server = None if args.server else ServerProcess(args.artifact, port=args.port).start()  # waits until ready
    url = args.server or server.url  # a separate server process, so that its memory figure is its own
    try:
        if server is None:
            wait_for_server(url, credentials=credentials)
        report = run_load(args.artifact, url, args.clients, args.tokens, credentials=credentials)
    finally:
        if server is not None:
            server.stop()
    print(report.summary())
    return 0 if not report.failures else 1


def _soak(args: argparse.Namespace) -> int:
    import tempfile

    from privlora.loadtest import SoakConfig, run_soak, secure_reference

    if args.server:
        raise UsageError("--faults needs a server it can kill and restart: leave out --server")
    if (args.base is None) != (args.adapter is None):
        raise UsageError("--base and --adapter go together (the plaintext model to compare with)")
    config = SoakConfig(clients=args.clients, tokens=args.tokens, duration_s=args.duration,
                        fault_every_s=args.fault_every, seed=args.seed)
    if args.base:
        from privlora.models.loading import load_model
        from privlora.models.step import TorchStep
        from privlora.runtime.generation import generate

        plaintext = TorchStep(load_model(args.base, args.adapter).model)
        reference, name = (lambda prompt, generation: list(generate(plaintext, prompt, generation))), "plaintext"
    else:
        reference, name = secure_reference(args.artifact), "an uninterrupted in-process run"
    with tempfile.TemporaryDirectory(prefix="privlora-soak-") as work:
        report = run_soak(args.artifact, config, reference, name, work)
    print(report.summary())
    return 0 if not report.lost and not report.differing and report.completed else 1


def cmd_attack(args: argparse.Namespace) -> int:
    from privlora.attack import demo_site, extraction_table, quality_table, render_extraction, render_svg

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


def cmd_bench(args: argparse.Namespace) -> int:
    from privlora.bench import CASES, bench_site, render

    cases = {name: CASES[name]() for name in args.site}
    results = []
    for name in args.backend:  # backend-major: concrete's runtime threads must not slow the others
        for case in cases.values():
            repeats = args.repeats if args.repeats is not None else (2 if name == "concrete" else 5)
            results.append(bench_site(name, case, repeats=repeats, options=dict(args.backend_option)))
            print(render(results[-1:]).splitlines()[2], file=sys.stderr)
    print(render(results))
    if args.json:
        Path(args.json).write_text(json.dumps([r.to_json() for r in results], indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


def _add_server(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--server", default=None, metavar="URL",
                        help="privlora server hosting the artifacts (e.g. https://server:8000); default: an "
                             "in-process server")
    parser.add_argument("--transport", default="stream", choices=TRANSPORTS,
                        help="with --server: stream (one WebSocket per session) or http (one request per message)")
    _add_credentials(parser)


def _add_credentials(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--token", default=None,
                        help=f"API token for a server with accounts (default: ${TOKEN_ENV_VAR})")
    parser.add_argument("--ca-cert", default=None, metavar="PEM",
                        help="verify an https server against this CA certificate (default: the system's CAs)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="privlora", formatter_class=_formatter,
        description="Private inference for LoRA-fine-tuned LLMs: the prompt stays encrypted, "
                    "the adapter stays on the server.")
    parser.add_argument("--version", action="version", version=f"privlora {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, handler: Callable[[argparse.Namespace], int], help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text, formatter_class=_formatter)
        sub.set_defaults(handler=handler)
        return sub

    prepare = command("prepare", cmd_prepare,
                      "convert and cache a base model (the embedded SmolLM2 GGUF is dequantized once)")
    _add_base(prepare)

    tune = command("finetune", cmd_finetune, "train a peft LoRA adapter on question/answer pairs (CPU)")
    _add_base(tune)
    tune.add_argument("-o", "--output", required=True, help="adapter directory to write")
    tune.add_argument("--data", default=None, help="JSON Lines QA file (default: the demo clinic dataset)")
    tune.add_argument("--split", default="train", help="which split of the data to train on")
    tune.add_argument("--rank", type=POSITIVE_INT, default=8, help="LoRA rank r")
    tune.add_argument("--alpha", type=POSITIVE, default=16.0, help="LoRA alpha (scaling = alpha / r)")
    tune.add_argument("--dropout", type=_number(float, 0, 1, high_open=True), default=0.05, help="LoRA dropout while training")
    tune.add_argument("--targets", nargs="+", default=["q_proj", "v_proj"], help="Linear layers to adapt")
    tune.add_argument("--epochs", type=POSITIVE_INT, default=10, help="passes over the data")
    tune.add_argument("--lr", type=POSITIVE, default=5e-3, help="peak learning rate (AdamW, linear decay)")
    tune.add_argument("--batch-size", type=POSITIVE_INT, default=8, help="examples per step")
    tune.add_argument("--seed", type=int, default=0, help="random seed")

    evaluate = command("evaluate", cmd_evaluate,
                       "ask the base and the adapted model the dataset's questions; report fact match rates")
    _add_base(evaluate)
    evaluate.add_argument("--adapter", default=str(DEMO_ADAPTER), help="peft adapter directory")
    evaluate.add_argument("--data", default=None, help="JSON Lines QA file (default: the demo clinic dataset)")
    evaluate.add_argument("--split", default="heldout", help="which split to ask")
    evaluate.add_argument("--limit", type=POSITIVE_INT, default=None, help="ask only the first N questions")
    evaluate.add_argument("--json", action="store_true", help="print the rates as JSON")

    comp = command("compile", cmd_compile,
                   "compile base model + LoRA adapter into an artifact (client and server bundles)")
    _add_base(comp)
    comp.add_argument("--adapter", default=str(DEMO_ADAPTER), help="peft adapter directory")
    comp.add_argument("-o", "--output", required=True, help="artifact directory to write")
    comp.add_argument("--backend", default=DEFAULT_BACKEND, choices=available(),
                      help="how private rounds are evaluated: " +
                           "; ".join(f"{name}: {REGISTRY[name].summary}" for name in available()))
    comp.add_argument("--backend-option", type=backend_option, action="append", default=[], metavar="KEY=VALUE",
                      help="a backend option, repeatable: e.g. privacy=rigorous (bfv), sigma=100, x_bits=12")
    comp.add_argument("--dump-ir", default=None, metavar="DIR",
                      help="also write the IR after every pass to DIR (the artifact always keeps a copy in ir/)")
    comp.add_argument("--debug", action="store_true", help="check every pass numerically on sample steps")
    comp.add_argument("--force", action="store_true", help="replace an existing artifact directory")

    accounts = command("accounts", cmd_accounts,
                       "manage the API accounts of 'serve --accounts': tokens, query budgets, session quotas")
    account_actions = accounts.add_subparsers(dest="action", metavar="ACTION", required=True)
    create = account_actions.add_parser("create", formatter_class=_formatter,
                                        help="add an account and print its token (once)")
    create.add_argument("name", help="account name (letters, digits, _.@-)")
    create.add_argument("--max-rows", type=COUNT, default=AccountLimits.max_rows,
                        help="query budget: rows of x per LoRA site, across all sessions and restarts (0: none)")
    create.add_argument("--max-sessions", type=POSITIVE_INT, default=AccountLimits.max_sessions,
                        help="sessions held at once (one more evicts the account's own oldest)")
    create.add_argument("--rate", type=NON_NEGATIVE, default=AccountLimits.rate,
                        help="requests per second for all the account's sessions (0: no limit)")
    create.add_argument("--burst", type=POSITIVE_INT, default=AccountLimits.burst, help="requests at once before the rate applies")
    create.add_argument("--admin", action="store_true", help="may also read /metrics (every account's use)")
    revoke = account_actions.add_parser("revoke", formatter_class=_formatter,
                                        help="revoke an account's token at once (its use is kept)")
    revoke.add_argument("name", help="account name")
    account_actions.add_parser("list", formatter_class=_formatter, help="accounts, their limits and their use")
    for action in (create, revoke, account_actions.choices["list"]):
        action.set_defaults(handler=cmd_accounts)
        action.add_argument("--db", required=True, metavar="PATH", help="the accounts database (SQLite)")

    insp = command("inspect", cmd_inspect, "show what an artifact contains: model, sites, rounds, segments, sizes")
    insp.add_argument("artifact", help="artifact directory")
    insp.add_argument("--json", action="store_true", help="machine-readable output")
    insp.add_argument("--ir", nargs="?", const="", default=None, metavar="PASS",
                      help="show the per-pass IR summary, or the IR after PASS (e.g. fuse_pll)")

    serve = command("serve", cmd_serve,
                    "serve the private rounds of one or more artifacts over HTTP (loads their server bundles only)")
    serve.add_argument("artifact", nargs="+",
                       help="artifact directories (several: one server for several adapters, each with its own "
                            "sessions and budgets; clients name theirs by id)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on")
    serve.add_argument("--port", type=PORT, default=8000, help="port to listen on")
    serve.add_argument("--max-rows", type=COUNT, default=1_000_000,
                       help="without --accounts: rows of x one session may send in all (0: no budget)")
    serve.add_argument("--rate", type=NON_NEGATIVE, default=500.0,
                       help="without --accounts: requests per second per session (0: no limit)")
    serve.add_argument("--burst", type=POSITIVE_INT, default=1000,
                       help="without --accounts: requests a session may send at once")
    serve.add_argument("--max-sessions", type=POSITIVE_INT, default=64,
                       help="sessions kept in memory (least recently used evicted first)")
    serve.add_argument("--session-ttl", type=POSITIVE, default=3600.0, help="seconds before an idle session expires")
    serve.add_argument("--accounts", default=None, metavar="DB",
                       help="require API tokens from this accounts database (privlora accounts); budgets, session "
                            "quotas and rate limits are then each account's own, persisted across restarts")
    serve.add_argument("--tls-cert", default=None, metavar="PEM", help="serve HTTPS with this certificate (chain)")
    serve.add_argument("--tls-key", default=None, metavar="PEM", help="the certificate's private key")
    serve.add_argument("--ray", action="store_true",
                       help="serve with Ray Serve: replicas in processes of their own, on every core and machine")
    serve.add_argument("--replicas", type=POSITIVE_INT, default=1, metavar="K", help="with --ray: replicas")
    serve.add_argument("--autoscale", type=POSITIVE_INT, nargs=2, default=None, metavar=("MIN", "MAX"),
                       help="with --ray: scale between MIN and MAX replicas with the requests in flight")
    serve.add_argument("--cpus-per-replica", type=POSITIVE, default=1.0, metavar="CPUS",
                       help="with --ray: CPUs Ray reserves for each replica")
    serve.add_argument("--address", default=None,
                       help="with --ray: the Ray cluster to join ('auto': the one on this machine; default: start one)")
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                       help="JSON log level on stderr (debug logs every round: sizes and timings, never payloads)")

    gen = command("generate", cmd_generate,
                  "generate text with the prompt encrypted and the adapter on the server (loads the client bundle only)")
    gen.add_argument("artifact", help="artifact directory")
    gen.add_argument("--prompt", required=True, help="the user's message")
    gen.add_argument("--server", default=None, metavar="URL",
                     help="privlora server (e.g. http://127.0.0.1:8000); default: an in-process server on the artifact")
    gen.add_argument("--transport", default="stream", choices=TRANSPORTS,
                     help="with --server: stream (one WebSocket per session) or http (one request per message)")
    _add_credentials(gen)
    gen.add_argument("--max-new-tokens", type=POSITIVE_INT, default=64, metavar="N",
                     help="stop after N new tokens (at least 1; the prompt and N must fit the model's context)")
    gen.add_argument("--temperature", type=NON_NEGATIVE, default=0.0, metavar="T",
                     help="0: greedy decoding; T > 0: sample from softmax(logits / T)")
    gen.add_argument("--top-p", type=PROBABILITY, default=1.0, metavar="P",
                     help="with --temperature: sample from the smallest set of tokens of mass P, in (0, 1]")
    gen.add_argument("--seed", type=int, default=None, metavar="INT", help="sampling seed (default: random)")
    gen.add_argument("--raw", action="store_true",
                     help="send the prompt as is, without the chat template (with the tokenizer's BOS when it adds one)")
    gen.add_argument("--backend-check", action="store_true",
                     help="print the server's backend and artifact before generating (they are always checked)")
    gen.add_argument("--no-key-cache", action="store_true",
                     help="fresh keys for this run instead of the per-artifact key cache")
    gen.add_argument("--quiet", action="store_true", help="print only the generated text")
    gen.add_argument("--stats-json", default=None, metavar="PATH",
                     help="also write the generated token ids and the prefill and mean decode timings as JSON")

    gateway = command("gateway", cmd_gateway,
                      "an OpenAI-compatible API (chat completions, streaming) on this machine, with secure "
                      "generation behind it: prompts are encrypted here, the adapters stay on the server")
    gateway.add_argument("artifact", nargs="+", help="artifact directories (each a model, named by its directory)")
    _add_server(gateway)
    gateway.add_argument("--host", default="127.0.0.1", help="address to listen on")
    gateway.add_argument("--port", type=PORT, default=8080, help="port to listen on")

    chat = command("chat", cmd_chat, "an interactive chat in the terminal, with secure generation")
    chat.add_argument("artifact", nargs=1, help="artifact directory")
    _add_server(chat)
    chat.add_argument("--system", default=None, metavar="TEXT", help="a system message that opens the conversation")
    chat.add_argument("--max-new-tokens", type=POSITIVE_INT, default=256, metavar="N", help="the longest answer")
    chat.add_argument("--temperature", type=NON_NEGATIVE, default=0.0, metavar="T",
                      help="0: greedy decoding; T > 0: sample from softmax(logits / T)")
    chat.add_argument("--top-p", type=PROBABILITY, default=1.0, metavar="P", help="nucleus sampling mass, in (0, 1]")
    chat.add_argument("--seed", type=int, default=None, metavar="INT", help="sampling seed (default: random)")

    load = command("loadtest", cmd_loadtest,
                   "K concurrent clients with their own keys generate M tokens each over HTTP on loopback")
    load.add_argument("artifact", help="artifact directory")
    load.add_argument("--server", default=None, metavar="URL",
                      help="server to load (default: start one in this process on 127.0.0.1)")
    load.add_argument("--port", type=PORT, default=None, help="port of the server it starts (default: a free one)")
    load.add_argument("--clients", type=POSITIVE_INT, default=4, help="concurrent clients")
    load.add_argument("--tokens", type=POSITIVE_INT, default=8, help="tokens each client generates (per answer)")
    _add_credentials(load)
    load.add_argument("--faults", action="store_true",
                      help="soak: answer random prompts for --duration seconds while the server is killed (-9) and "
                           "restarted and connections are cut at random; count lost and differing answers")
    load.add_argument("--duration", type=POSITIVE, default=120.0, help="with --faults: seconds to keep starting answers")
    load.add_argument("--fault-every", type=POSITIVE, default=15.0,
                      help="with --faults: mean seconds between faults (exponentially distributed)")
    load.add_argument("--seed", type=int, default=0, help="with --faults: seed of the prompts and the fault times")
    load.add_argument("--base", default=None,
                      help="with --faults: the plaintext base model to compare answers with (with --adapter; "
                           "default: compare with an uninterrupted in-process secure run)")
    load.add_argument("--adapter", default=None, help="with --faults: the plaintext model's peft adapter")

    attack = command("attack", cmd_attack, "measure what a malicious client can extract from a LoRA site")
    attack_kinds = attack.add_subparsers(dest="attack", metavar="ATTACK", required=True)
    extract = attack_kinds.add_parser("extract", formatter_class=_formatter,
                                      help="chosen-input extraction of the demo adapter's layer-0 v_proj",
                                      description="A client with its own keys queries one site with chosen inputs and "
                                                  "fits the private map; error against queries and PLL sigma.")
    extract.set_defaults(handler=cmd_attack)
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

    bench = command("bench", cmd_bench,
                    "per-site cost and accuracy of the private backends at SmolLM2 and ChatGLM2-6B shapes")
    bench.add_argument("--backend", nargs="+", default=["bfv", "ckks", "concrete", "plain"], choices=available(),
                       help="backends to measure")
    bench.add_argument("--site", nargs="+", default=["smollm2", "chatglm2"],
                       choices=["smollm2", "chatglm2", "smollm2-prefill"],
                       help="smollm2: fused q+v 576->768 with the demo adapter on real activations, one decoded row; "
                            "smollm2-prefill: the same site, 52 rows at once (one prompt's prefill); "
                            "chatglm2: query_key_value 4096->4608 r=8, random weights, one decoded row")
    bench.add_argument("--backend-option", type=backend_option, action="append", default=[], metavar="KEY=VALUE",
                       help="a backend option for every backend measured, repeatable: e.g. privacy=rigorous (bfv)")
    bench.add_argument("--repeats", type=POSITIVE_INT, default=None,
                       help="timed single-row calls per site (default 5; 2 for concrete)")
    bench.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON")

    demo = command("demo", cmd_demo,
                   "held-out questions answered by the base model, by the fine-tuned model with secure generation "
                   "(prompt encrypted, adapter on the server) and by the fine-tuned model in plaintext")
    _add_base(demo)
    demo.add_argument("--adapter", default=str(DEMO_ADAPTER), help="peft adapter directory")
    demo.add_argument("--questions", type=POSITIVE_INT, default=3, help="how many held-out questions to ask")
    demo.add_argument("--backend", nargs="+", default=[DEFAULT_BACKEND],
                      choices=[name for name in available() if name != "reference"],
                      help="private backends for the secure answers (several: side by side on the same questions)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except PrivloraError as exc:
        print(f"privlora: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except ModuleNotFoundError as exc:  # a command of another install role
        role = ROLES.get(args.command, "compile")
        print(f"privlora: error: '{args.command}' needs the {role} install role (missing module {exc.name}): "
              f"pip install 'privlora[{role}]'", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("privlora: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
