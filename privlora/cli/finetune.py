"""``privlora finetune``: train the peft LoRA adapter that ``compile`` then makes private."""

from __future__ import annotations

import argparse
from pathlib import Path

from privlora.cli.options import add_base_option, add_qa_options
from privlora.cli.parsing import POSITIVE, POSITIVE_INT, Subparsers, add_command, number
from privlora.errors import PrivloraError


def register(subparsers: Subparsers) -> None:
    parser = add_command(subparsers, "finetune", run, "train a peft LoRA adapter on question/answer pairs (CPU)")
    add_base_option(parser)
    parser.add_argument("-o", "--output", required=True, help="adapter directory to write")
    add_qa_options(parser, split="train", split_help="which split of the data to train on")
    parser.add_argument("--rank", type=POSITIVE_INT, default=8, help="LoRA rank r")
    parser.add_argument("--alpha", type=POSITIVE, default=16.0, help="LoRA alpha (scaling = alpha / r)")
    parser.add_argument("--dropout", type=number(float, 0, 1, high_open=True), default=0.05,
                        help="LoRA dropout while training")
    parser.add_argument("--targets", nargs="+", default=["q_proj", "v_proj"], help="Linear layers to adapt")
    parser.add_argument("--epochs", type=POSITIVE_INT, default=10, help="passes over the data")
    parser.add_argument("--lr", type=POSITIVE, default=5e-3, help="peak learning rate (AdamW, linear decay)")
    parser.add_argument("--batch-size", type=POSITIVE_INT, default=8, help="examples per step")
    parser.add_argument("--seed", type=int, default=0, help="random seed")


def run(args: argparse.Namespace) -> int:
    import torch

    from privlora.tools.finetune import FinetuneConfig, finetune
    from privlora.models.loading import resolve_base
    from privlora.tools.qa import load_qa

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
