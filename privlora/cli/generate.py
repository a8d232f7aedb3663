"""``privlora generate``: one answer to one prompt, encrypted on this machine, with the adapter
on the server. It speaks through the same :class:`~privlora.client.assistant.Assistant` as
``chat`` and ``gateway``, and adds what a one-shot run reports: the prefill's progress, the
prompt and token counts, and where each step's time and bytes went."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from privlora.cli.options import add_record_option, add_sampling_options, add_server_options, sampling, transport
from privlora.cli.parsing import COUNT, Subparsers, add_command
from privlora.errors import UsageError


def register(subparsers: Subparsers) -> None:
    parser = add_command(subparsers, "generate", run, "generate text with the prompt encrypted and the adapter on the "
                                                      "server (loads the client bundle only)")
    parser.add_argument("artifact", help="artifact directory")
    parser.add_argument("--prompt", required=True, help="the user's message")
    add_server_options(parser, server_help="privlora server (e.g. http://127.0.0.1:8000); default: an in-process "
                                           "server on the artifact")
    add_sampling_options(parser, max_new_tokens_help="stop after N new tokens (at least 1; the prompt and N must fit the "
                                             "model's context)",
                         top_p_help="with --temperature: sample from the smallest set of tokens of mass P, in (0, 1]")
    parser.add_argument("--raw", action="store_true",
                        help="send the prompt as is, without the chat template (with the tokenizer's BOS when it "
                             "adds one)")
    parser.add_argument("--backend-check", action="store_true",
                        help="print the server's backend and artifact before generating (they are always checked)")
    parser.add_argument("--no-key-cache", action="store_true",
                        help="fresh keys for this run instead of the per-artifact key cache")
    parser.add_argument("--pads", type=COUNT, default=0, metavar="N",
                        help="with a pads backend: make pads for N rows per group before the prompt is sent "
                             "(offline); a step that finds too few makes them on the spot (default: 0)")
    parser.add_argument("--quiet", action="store_true", help="print only the generated text")
    add_record_option(parser)
    parser.add_argument("--stats-json", default=None, metavar="PATH",
                        help="also write the generated token ids, the prefill and mean decode timings, and the online "
                             "and offline phases as JSON")


def run(args: argparse.Namespace) -> int:
    from privlora.client.assistant import Assistant, Reply
    from privlora.client.generation import answer_length
    from privlora.client.timings import render_timings, timing_report

    if not args.prompt.strip():
        raise UsageError("the prompt is empty")
    # The prompt is checked against the model before any key, session or encryption.
    assistant = Assistant(args.artifact, cache_keys=not args.no_key_cache, record=args.record)
    prompt = assistant.encode_raw(args.prompt) if args.raw else assistant.encode(args.prompt)
    config = assistant.config(**{**sampling(args), "max_new_tokens": answer_length(
        args.max_new_tokens, len(prompt), assistant.context_length)})
    assistant.check(prompt, config)
    server = transport(args, args.artifact)
    if args.backend_check:
        for hosted in server.info()["artifacts"]:
            print(f"server: artifact {hosted['artifact'][:16]} ({hosted['name']}), backend {hosted['backend']}, "
                  f"{hosted['sessions']} open sessions", file=sys.stderr)
    client = assistant.connect(server)
    if args.pads:
        made = client.prepare(args.pads)
        if not args.quiet and made.rows:
            print(f"pads: {made.rows:g} rows per group made in {made.seconds:.1f} s", file=sys.stderr)
    reply = Reply(prompt_tokens=len(prompt))
    try:
        for piece in assistant.stream(prompt, config, reply, progress=None if args.quiet else sys.stderr):
            print(piece, end="", flush=True)
        print()
    finally:
        assistant.close()
    tokens = reply.generated
    if not args.quiet:
        recovered = (f", {client.recoveries} steps redone after faults ({client.sessions_opened - 1} new sessions)"
                     if client.recoveries else "")
        print(f"\n{len(prompt)} prompt tokens, {len(tokens)} generated, backend {client.backend_name}{recovered}",
              file=sys.stderr)
        print(render_timings(client.steps, client.offline), file=sys.stderr)
    if args.stats_json:
        report = {"backend": client.backend_name, "prompt_tokens": len(prompt), "tokens": tokens,
                  **timing_report(client.steps, client.offline)}
        Path(args.stats_json).write_text(json.dumps(report, indent=2) + "\n")
    return 0
