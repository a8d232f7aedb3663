"""``privlora serve``: the adapter owner's server of the private rounds (server bundles only),
on uvicorn or, with ``--ray``, on Ray Serve replicas."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from privlora.cli.options import add_listen_options
from privlora.cli.parsing import COUNT, NON_NEGATIVE, POSITIVE, POSITIVE_INT, Subparsers, add_command
from privlora.errors import UsageError


def register(subparsers: Subparsers) -> None:
    parser = add_command(subparsers, "serve", run,
                         "serve the private rounds of one or more artifacts over HTTP (loads their server bundles only)")
    parser.add_argument("artifact", nargs="+",
                        help="artifact directories (several: one server for several adapters, each with its own "
                             "sessions and budgets; clients name theirs by id)")
    add_listen_options(parser, port=8000)
    parser.add_argument("--max-rows", type=COUNT, default=1_000_000,
                        help="without --accounts: rows of x one session may send in all (0: no budget)")
    parser.add_argument("--rate", type=NON_NEGATIVE, default=500.0,
                        help="without --accounts: requests per second per session (0: no limit)")
    parser.add_argument("--burst", type=POSITIVE_INT, default=1000,
                        help="without --accounts: requests a session may send at once")
    parser.add_argument("--max-sessions", type=POSITIVE_INT, default=64,
                        help="sessions kept in memory (least recently used evicted first)")
    parser.add_argument("--session-ttl", type=POSITIVE, default=3600.0, help="seconds before an idle session expires")
    parser.add_argument("--accounts", default=None, metavar="DB",
                        help="require API tokens from this accounts database (privlora accounts); budgets, session "
                             "quotas and rate limits are then each account's own, persisted across restarts")
    parser.add_argument("--tls-cert", default=None, metavar="PEM", help="serve HTTPS with this certificate (chain)")
    parser.add_argument("--tls-key", default=None, metavar="PEM", help="the certificate's private key")
    parser.add_argument("--ray", action="store_true",
                        help="serve with Ray Serve: replicas in processes of their own, on every core and machine")
    parser.add_argument("--replicas", type=POSITIVE_INT, default=1, metavar="K", help="with --ray: replicas")
    parser.add_argument("--autoscale", type=POSITIVE_INT, nargs=2, default=None, metavar=("MIN", "MAX"),
                        help="with --ray: scale between MIN and MAX replicas with the requests in flight")
    parser.add_argument("--cpus-per-replica", type=POSITIVE, default=1.0, metavar="CPUS",
                        help="with --ray: CPUs Ray reserves for each replica")
    parser.add_argument("--address", default=None,
                        help="with --ray: the Ray cluster to join ('auto': the one on this machine; default: start one)")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                        help="JSON log level on stderr (debug logs every round: sizes and timings, never payloads)")


def run(args: argparse.Namespace) -> int:
    from privlora.server.http import TLS, serve
    from privlora.server.sessions import SessionLimits

    if (args.tls_cert is None) != (args.tls_key is None):
        raise UsageError("--tls-cert and --tls-key go together")
    tls = TLS(Path(args.tls_cert), Path(args.tls_key)) if args.tls_cert else None
    for path in (tls.cert, tls.key) if tls else ():
        if not path.is_file():
            raise UsageError(f"no such file: {path}")
    limits = SessionLimits(idle_seconds=args.session_ttl, max_sessions=args.max_sessions,
                           max_rows=args.max_rows or None, rate=args.rate or None, burst=args.burst)
    if args.ray:
        from privlora.server.ray import check_replicable

        for artifact in args.artifact:  # before the banner: nothing would be served
            check_replicable(artifact)
    scheme = "https" if tls else "http"
    engine = f"Ray Serve ({_scaling_text(args)})" if args.ray else "uvicorn"
    print(f"privlora server: {', '.join(args.artifact)} on {scheme}://{args.host}:{args.port} with {engine} "
          "(Ctrl-C to stop)", file=sys.stderr)
    if args.ray:
        from privlora.server.http import configure_logging
        from privlora.server.ray import Scaling, serve_with_ray

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
