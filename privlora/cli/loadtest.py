"""``privlora loadtest``: K concurrent clients against a server, or with ``--faults`` a soak while
the server is killed and connections are cut, counting lost and differing answers."""

from __future__ import annotations

import argparse

from privlora.cli.options import add_credential_options, credentials
from privlora.cli.parsing import PORT, POSITIVE, POSITIVE_INT, Subparsers, add_command
from privlora.errors import UsageError


def register(subparsers: Subparsers) -> None:
    parser = add_command(subparsers, "loadtest", run,
                         "K concurrent clients with their own keys generate M tokens each over HTTP on loopback")
    parser.add_argument("artifact", help="artifact directory")
    parser.add_argument("--server", default=None, metavar="URL",
                        help="server to load (default: start one in this process on 127.0.0.1)")
    parser.add_argument("--port", type=PORT, default=None, help="port of the server it starts (default: a free one)")
    parser.add_argument("--clients", type=POSITIVE_INT, default=4, help="concurrent clients")
    parser.add_argument("--tokens", type=POSITIVE_INT, default=8, help="tokens each client generates (per answer)")
    add_credential_options(parser)
    parser.add_argument("--faults", action="store_true",
                        help="soak: answer random prompts for --duration seconds while the server is killed (-9) and "
                             "restarted and connections are cut at random; count lost and differing answers")
    parser.add_argument("--duration", type=POSITIVE, default=120.0,
                        help="with --faults: seconds to keep starting answers")
    parser.add_argument("--fault-every", type=POSITIVE, default=15.0,
                        help="with --faults: mean seconds between faults (exponentially distributed)")
    parser.add_argument("--seed", type=int, default=0, help="with --faults: seed of the prompts and the fault times")
    parser.add_argument("--base", default=None,
                        help="with --faults: the plaintext base model to compare answers with (with --adapter; "
                             "default: compare with an uninterrupted in-process secure run)")
    parser.add_argument("--adapter", default=None, help="with --faults: the plaintext model's peft adapter")


def run(args: argparse.Namespace) -> int:
    from privlora.tools.loadtest import ServerProcess, run_load, wait_for_server

    if args.faults:
        return _soak(args)
    auth = credentials(args)
    server = None if args.server else ServerProcess(args.artifact, port=args.port).start()  # waits until ready
    url = args.server or server.url  # a separate server process, so that its memory figure is its own
    try:
        if server is None:
            wait_for_server(url, credentials=auth)
        report = run_load(args.artifact, url, args.clients, args.tokens, credentials=auth)
    finally:
        if server is not None:
            server.stop()
    print(report.summary())
    return 0 if not report.failures else 1


def _soak(args: argparse.Namespace) -> int:
    import tempfile

    from privlora.tools.loadtest import SoakConfig, run_soak, secure_reference

    if args.server:
        raise UsageError("--faults needs a server it can kill and restart: leave out --server")
    if (args.base is None) != (args.adapter is None):
        raise UsageError("--base and --adapter go together (the plaintext model to compare with)")
    config = SoakConfig(clients=args.clients, tokens=args.tokens, duration_s=args.duration,
                        fault_every_s=args.fault_every, seed=args.seed)
    if args.base:
        from privlora.models.loading import load_model
        from privlora.models.step import TorchStep
        from privlora.client.generation import generate

        plaintext = TorchStep(load_model(args.base, args.adapter).model)
        reference, name = (lambda prompt, generation: list(generate(plaintext, prompt, generation))), "plaintext"
    else:
        reference, name = secure_reference(args.artifact), "an uninterrupted in-process run"
    with tempfile.TemporaryDirectory(prefix="privlora-soak-") as work:
        report = run_soak(args.artifact, config, reference, name, work)
    print(report.summary())
    return 0 if not report.lost and not report.differing and report.completed else 1
