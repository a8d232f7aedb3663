"""``privlora prepare``: convert and cache a base model once, so later commands start at once."""

from __future__ import annotations

import argparse
import time

from privlora.cli.options import add_base_option
from privlora.cli.parsing import Subparsers, add_command


def register(subparsers: Subparsers) -> None:
    parser = add_command(subparsers, "prepare", run,
                         "convert and cache a base model (the embedded SmolLM2 GGUF is dequantized once)")
    add_base_option(parser)


def run(args: argparse.Namespace) -> int:
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
