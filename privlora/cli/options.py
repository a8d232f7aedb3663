"""Option groups that several commands share, each declared once, and the helpers that turn the
parsed options into the objects the library takes (credentials, a transport, sampling settings).

Where commands word an option differently, the group takes that wording as an argument, so the
option itself (name, type, default, metavar) still has one declaration."""

from __future__ import annotations

import argparse
import errno
import os
import socket
from pathlib import Path
from typing import TYPE_CHECKING, Any

from privlora.client.generation import DEFAULT_MAX_NEW_TOKENS, MAX_NEW_TOKENS
from privlora.client.transports import TRANSPORTS, Credentials, Transport, http_transport
from privlora.errors import ListenError, UsageError
from privlora.paths import DEMO_ADAPTER
from privlora.cli.parsing import COUNT, NON_NEGATIVE, PORT, PROBABILITY, backend_option, number

if TYPE_CHECKING:
    from privlora.client.assistant import Assistant

TOKEN_ENV_VAR = "PRIVLORA_TOKEN"
MAX_TOKENS = number(int, 1, MAX_NEW_TOKENS)
SERVER_HELP = "privlora server hosting the artifacts (e.g. https://server:8000); default: an in-process server"


def add_base_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", default="smollm2",
                        help="base model: 'smollm2' (embedded SmolLM2-135M-Instruct) or a local "
                             "Hugging Face checkpoint directory (config.json + safetensors)")


def add_adapter_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--adapter", default=str(DEMO_ADAPTER), help="peft adapter directory")


def add_qa_options(parser: argparse.ArgumentParser, split: str, split_help: str) -> None:
    """The question/answer data a command reads: a file (default: the demo's) and its split."""
    parser.add_argument("--data", default=None, help="JSON Lines QA file (default: the demo clinic dataset)")
    parser.add_argument("--split", default=split, help=split_help)


def add_backend_options(parser: argparse.ArgumentParser, help_text: str) -> None:
    """``--backend-option KEY=VALUE``, repeatable; ``dict(args.backend_option)`` holds them."""
    parser.add_argument("--backend-option", type=backend_option, action="append", default=[], metavar="KEY=VALUE",
                        help=help_text)


def add_listen_options(parser: argparse.ArgumentParser, port: int) -> None:
    """Where a command that serves HTTP listens."""
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=PORT, default=port, help="port to listen on")


def listening_socket(args: argparse.Namespace) -> socket.socket:
    """The socket ``--host``/``--port`` name, bound before a command's banner and anything slow,
    then handed to uvicorn (so that nothing takes the port in between): a port in use is one
    line, not uvicorn's error after the banner. Bound as uvicorn binds, with SO_REUSEADDR, so
    that a restart need not wait for the last run's connections to time out."""
    listener = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((args.host, args.port))
    except OSError as exc:
        listener.close()
        raise ListenError(f"cannot listen on {args.host}:{args.port}: {_why_not(exc)}") from None
    return listener


def _why_not(exc: OSError) -> str:
    """Why a bind failed, in the words of a one-line error, with the fix where there is one."""
    reason = (exc.strerror or str(exc)).lower()
    return f"{reason} (pass --port)" if exc.errno == errno.EADDRINUSE else reason


def add_server_options(parser: argparse.ArgumentParser, server_help: str = SERVER_HELP) -> None:
    """The privlora server a client command talks to (default: one in this process) and how."""
    parser.add_argument("--server", default=None, metavar="URL", help=server_help)
    parser.add_argument("--transport", default="stream", choices=TRANSPORTS,
                        help="with --server: stream (one WebSocket per session) or http (one request per message)")
    add_credential_options(parser)


def add_credential_options(parser: argparse.ArgumentParser) -> None:
    """What a client presents to a remote server; :func:`credentials` reads them."""
    parser.add_argument("--token", default=None,
                        help=f"API token for a server with accounts (default: ${TOKEN_ENV_VAR})")
    parser.add_argument("--ca-cert", default=None, metavar="PEM",
                        help="verify an https server against this CA certificate (default: the system's CAs)")


def add_sampling_options(parser: argparse.ArgumentParser, max_new_tokens_help: str, top_p_help: str) -> None:
    """How an answer is decoded; :func:`sampling` reads them. The answer's length has one default
    and one cap for every command (and the gateway)."""
    parser.add_argument("--max-new-tokens", type=MAX_TOKENS, default=None, metavar="N",
                        help=f"{max_new_tokens_help} (default: {DEFAULT_MAX_NEW_TOKENS}, or the rest of the model's "
                             f"context if less; at most {MAX_NEW_TOKENS})")
    parser.add_argument("--temperature", type=NON_NEGATIVE, default=0.0, metavar="T",
                        help="0: greedy decoding; T > 0: sample from softmax(logits / T)")
    parser.add_argument("--top-p", type=PROBABILITY, default=1.0, metavar="P", help=top_p_help)
    parser.add_argument("--seed", type=int, default=None, metavar="INT", help="sampling seed (default: random)")


def credentials(args: argparse.Namespace) -> Credentials:
    """The token (``--token``, else ``$PRIVLORA_TOKEN``) and the CA certificate, which must exist."""
    token = args.token or os.environ.get(TOKEN_ENV_VAR) or None
    if args.ca_cert is not None and not Path(args.ca_cert).is_file():
        raise UsageError(f"no such file: {args.ca_cert}")
    return Credentials(token=token, ca_cert=args.ca_cert)


def transport(args: argparse.Namespace, artifact: str) -> Transport:
    """``--server`` over ``--transport``, else an in-process server of ``artifact`` alone."""
    if args.server:
        return http_transport(args.server, args.transport, credentials(args))
    from privlora.local import local_transport  # the server's modules: only for the in-process default

    return local_transport(artifact)


KEPT_PADS = 256  # rows per group: a few turns of a chat, made while the user reads or types


def add_kept_pads_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pads", type=COUNT, default=KEPT_PADS, metavar="N",
                        help="with a pads backend: keep pads for N rows per group ready, made in the background "
                             "between answers (0: only on the spot)")


def add_record_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--record", default=None, metavar="DIR",
                        help="keep what this client sees of the adapter (each LoRA site's input rows and the deltas "
                             "returned) in the transcript directory DIR, for `privlora attack clone`")


def assistants(args: argparse.Namespace) -> list[Assistant]:
    """One assistant per artifact: on ``--server`` (which hosts them all), else each on an
    in-process server of its own; each goes by the name its server gives it, so that the server,
    its logs, ``privlora models`` and the gateway say the same (in process: its directory's)."""
    from privlora.client.assistant import Assistant

    made = []
    for artifact in args.artifact:
        assistant = Assistant(artifact, keep_pads=args.pads, record=getattr(args, "record", None))
        link = transport(args, artifact)
        assistant.name = served_name(link, assistant.artifact_id) or assistant.name
        assistant.connect(link)
        made.append(assistant)
    return made


def served_name(link: Transport, artifact: str) -> str | None:
    """The name the server gives the artifact of this id; None where it does not host it (the
    session it is then refused says so)."""
    return next((model["id"] for model in link.models() if model["artifact"] == artifact), None)


def sampling(args: argparse.Namespace) -> dict[str, Any]:
    """The sampling options as the keyword arguments of ``Assistant.config`` and ``ChatSession``."""
    return {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p,
            "seed": args.seed}
