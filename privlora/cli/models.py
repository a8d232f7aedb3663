"""``privlora models``: the models a privlora server hosts, by the names it serves them under
(what ``privlora gateway --server`` calls them too), read from its ``GET /v1/models``."""

from __future__ import annotations

import argparse
import json
from typing import Any

from privlora.cli.options import add_credential_options, credentials
from privlora.cli.parsing import Subparsers, add_command, table
from privlora.client.transports import http_transport

ARTIFACT_DIGITS = 16  # of the artifact id, as the server's logs show it


def register(subparsers: Subparsers) -> None:
    parser = add_command(subparsers, "models", run, "list the models a privlora server hosts: name, backend, "
                                                    "artifact id, adapter")
    parser.add_argument("--server", required=True, metavar="URL", help="the privlora server (e.g. https://server:8000)")
    add_credential_options(parser)
    parser.add_argument("--json", action="store_true", help="the server's entries as JSON, ids in full")


def run(args: argparse.Namespace) -> int:
    models = http_transport(args.server, "http", credentials(args)).models()
    print(json.dumps(models, indent=2) if args.json else listing(models))
    return 0


def listing(models: list[dict[str, Any]]) -> str:
    """One row a model, as ``ollama list`` shows its own."""
    rows = [("NAME", "BACKEND", "ARTIFACT", "ADAPTER")]
    rows += [(m["id"], m["backend"], m["artifact"][:ARTIFACT_DIGITS], m["adapter"]) for m in models]
    return table(rows)
