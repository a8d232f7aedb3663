"""``privlora gateway``: an OpenAI-compatible API on the user's machine, with secure generation
behind it (the prompts are encrypted here; the adapters stay on the server)."""

from __future__ import annotations

import argparse
import logging
import sys

from privlora.cli.options import (add_kept_pads_option, add_listen_options, add_server_options, assistants,
                                  listening_socket)
from privlora.cli.parsing import Subparsers, add_command


def register(subparsers: Subparsers) -> None:
    parser = add_command(subparsers, "gateway", run,
                         "an OpenAI-compatible API (chat completions, streaming) on this machine, with secure "
                         "generation behind it: prompts are encrypted here, the adapters stay on the server")
    parser.add_argument("artifact", nargs="+", help="artifact directories (each a model, named as --server names it, "
                                                    "else by its directory)")
    add_server_options(parser)
    add_kept_pads_option(parser)
    add_listen_options(parser, port=8080)


def log_answers() -> None:
    """The gateway's line per request on stderr, timestamped (its banner goes there too)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s privlora gateway: %(message)s"))
    logger = logging.getLogger("privlora.gateway")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO)
    logger.propagate = False


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from privlora.client.gateway import create_gateway
    from privlora.core.wire import UVICORN_PROTOCOLS

    listener = listening_socket(args)  # before the models' keys and sessions: a port in use is one line
    models = assistants(args)
    app = create_gateway(models)
    print(f"privlora gateway: models {', '.join(a.name for a in models)} on http://{args.host}:{args.port}/v1 "
          f"(secure generation through {args.server or 'an in-process server'}; Ctrl-C to stop); "
          f"chat page: http://{args.host}:{args.port}/", file=sys.stderr)
    log_answers()
    config = uvicorn.Config(app, log_level="warning", access_log=False, **UVICORN_PROTOCOLS)
    uvicorn.Server(config).run(sockets=[listener])
    return 0
