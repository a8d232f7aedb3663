"""``privlora serve``: the adapter owner's server of the private rounds (server bundles only),
on uvicorn or, with ``--ray``, on Ray Serve replicas."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from privlora.cli.options import add_listen_options, listening_socket
from privlora.cli.parsing import COUNT, NON_NEGATIVE, POSITIVE, POSITIVE_INT, Subparsers, add_command, model_name
from privlora.errors import UsageError

if TYPE_CHECKING:
    from privlora.server.http import TLS
    from privlora.server.sessions import SessionLimits


def register(subparsers: Subparsers) -> None:
    parser = add_command(subparsers, "serve", run,
                         "serve the private rounds of one or more artifacts over HTTP (loads their server bundles only)")
    parser.add_argument("artifact", nargs="+",
                        help="artifact directories (several: one server for several adapters, each with its own "
                             "sessions and budgets; clients name theirs by id)")
    parser.add_argument("--name", type=model_name, action="append", default=None, metavar="NAME",
                        help="the name an artifact is served under, in health, GET /v1/models, the logs and the "
                             "gateway: once per artifact, in their order (default: each artifact's directory name)")
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

    hosted = hosted_names(args.artifact, args.name)
    if (args.tls_cert is None) != (args.tls_key is None):
        raise UsageError("--tls-cert and --tls-key go together")
    tls = TLS(Path(args.tls_cert), Path(args.tls_key)) if args.tls_cert else None
    for path in (tls.cert, tls.key) if tls else ():
        if not path.is_file():
            raise UsageError(f"no such file: {path}")
    limits = SessionLimits(idle_seconds=args.session_ttl, max_sessions=args.max_sessions,
                           max_rows=args.max_rows or None, rate=args.rate or None, burst=args.burst)
    if args.ray:
        return _serve_with_ray(args, hosted, limits, tls)
    if args.replicas != 1 or args.autoscale or args.address:
        raise UsageError("--replicas, --autoscale and --address need --ray")
    listener = listening_socket(args)
    _banner(args, hosted, tls, "uvicorn")
    serve(hosted, listener, log_level=args.log_level, limits=limits, accounts=args.accounts, tls=tls)
    return 0


def _serve_with_ray(args: argparse.Namespace, hosted: dict[str, str], limits: SessionLimits, tls: TLS | None) -> int:
    """Ray Serve's proxy binds the port itself, in an actor of its own: nothing is bound here."""
    from privlora.server.logs import configure_logging
    from privlora.server.ray import Scaling, check_replicable, serve_with_ray

    for artifact in hosted.values():  # before the banner: nothing would be served
        check_replicable(artifact)
    _banner(args, hosted, tls, f"Ray Serve ({_scaling_text(args)})")
    configure_logging(args.log_level)
    scaling = Scaling(replicas=args.replicas, autoscale=tuple(args.autoscale) if args.autoscale else None,
                      cpus_per_replica=args.cpus_per_replica)
    serve_with_ray(hosted, args.host, args.port, limits, args.accounts, scaling, args.address, tls)
    return 0


def _banner(args: argparse.Namespace, hosted: dict[str, str], tls: TLS | None, engine: str) -> None:
    print(f"privlora server: models {', '.join(hosted)} on {'https' if tls else 'http'}://{args.host}:{args.port} "
          f"with {engine} (Ctrl-C to stop)", file=sys.stderr)


def hosted_names(artifacts: list[str], names: list[str] | None) -> dict[str, str]:
    """Each artifact by the name it is served under (``--name``, in order, else its directory's),
    checked before anything is loaded: one name per artifact, no name twice."""
    from privlora.server.private import default_name

    if names is not None and len(names) != len(artifacts):
        raise UsageError(f"{len(names)} --name for {len(artifacts)} artifacts: give one per artifact, "
                         "in their order, or none (each is then named by its directory)")
    chosen = names or [default_name(artifact) for artifact in artifacts]
    twice = next((chosen_name for chosen_name in chosen if chosen.count(chosen_name) > 1), None)
    if twice is not None:
        raise UsageError(f"two artifacts would be served as {twice!r}: give each its own --name NAME (one per "
                         "artifact, in their order)")
    return dict(zip(chosen, artifacts))


def _scaling_text(args: argparse.Namespace) -> str:
    if args.autoscale:
        return f"{args.autoscale[0]} to {args.autoscale[1]} replicas"
    return f"{args.replicas} replica{'s' if args.replicas != 1 else ''}"
