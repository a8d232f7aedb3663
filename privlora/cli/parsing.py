"""The argparse machinery every command shares: the help format, one-line usage errors, bounded
number types and the way a command is added, so that all commands look and fail alike."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import NoReturn

Handler = Callable[[argparse.Namespace], int]
Subparsers = argparse._SubParsersAction


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults shown only where there is one worth showing: not for required options, flags or
    options whose absence means something the help text already says."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.required or action.default is None or action.default is False or action.default == [] \
                or action.default == argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


def formatter(prog: str) -> argparse.HelpFormatter:
    """The ``formatter_class`` of every parser: wide enough for the option names."""
    return HelpFormatter(prog, max_help_position=32)


class Parser(argparse.ArgumentParser):
    """argparse, with a usage mistake reported in one line (exit code 2) instead of the usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def add_command(subparsers: Subparsers, name: str, handler: Handler, help_text: str) -> argparse.ArgumentParser:
    """A command's parser: its one-line help is also its description; parsing picks ``handler``."""
    parser = subparsers.add_parser(name, help=help_text, description=help_text, formatter_class=formatter)
    parser.set_defaults(handler=handler)
    return parser


def number(kind: type, low: float | None = None, high: float | None = None, low_open: bool = False,
           high_open: bool = False) -> Callable[[str], int | float]:
    """An argparse type: a number of ``kind`` within the bounds, else a one-line usage error."""
    if high is None:
        bounds = f"{'greater than' if low_open else 'at least'} {low}"
    else:
        bounds = f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"

    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}") \
                from None
        too_low = low is not None and (value < low or (low_open and value == low))
        too_high = high is not None and (value > high or (high_open and value == high))
        if too_low or too_high:
            raise argparse.ArgumentTypeError(f"must be {bounds}, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


POSITIVE_INT = number(int, 1)
COUNT = number(int, 0)
PORT = number(int, 1, 65535)
POSITIVE = number(float, 0, low_open=True)
NON_NEGATIVE = number(float, 0)
PROBABILITY = number(float, 0, 1, low_open=True)


def model_name(text: str) -> str:
    """An argparse type: a name a model goes by, printable and without spaces (it is one word of
    a log line and of a table)."""
    if not text or not text.isprintable() or any(c.isspace() for c in text):
        raise argparse.ArgumentTypeError(f"expected a name without spaces, got {text!r}")
    return text


def table(rows: list[tuple[str, ...]]) -> str:
    """Rows (the header first) in aligned columns, as every command prints a table."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows)


def backend_option(text: str) -> tuple[str, object]:
    """``KEY=VALUE`` with VALUE read as JSON when it parses (numbers, true/false), else as a string."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value
