"""The ``privlora`` command line: one module per command (its options beside its handler), the
option groups they share in :mod:`privlora.cli.options`, and the parser and exit codes in
:mod:`privlora.cli.main`.

Heavy libraries (torch, transformers) are imported inside the command handlers, so ``--help`` is
instant, each install role runs the commands of its role, and ``import privlora.cli`` has no side
effects.
"""

from privlora.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
