"""The ``duogard`` command: ``train``, ``compare`` (the main job), ``parity``, ``bench``.

One module per command (``add_parser`` and ``run``); ``_methods`` holds the
``name[:option=value,...]`` grammar and the one table of default learning rates, ``_options``
the flags several commands share. Library modules never import this package.

Exit codes: 0 success, 1 a run failed (e.g. a non-finite loss), 2 a usage error.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from duogard.cli import bench, compare, parity, train
from duogard.cli._methods import (
    DEFAULT_METHODS,
    LEARNING_RATES,
    MethodSpec,
    default_lr,
    parse_method,
    parse_methods,
)

__all__ = [
    "main",
    "build_parser",
    "report_errors",
    "MethodSpec",
    "parse_method",
    "parse_methods",
    "DEFAULT_METHODS",
    "LEARNING_RATES",
    "default_lr",
]

_COMMANDS = {"train": train, "compare": compare, "bench": bench, "parity": parity}


def build_parser() -> argparse.ArgumentParser:
    """The ``duogard`` argument parser with every command."""
    parser = argparse.ArgumentParser(
        prog="duogard", description="Forward gradients vs backprop, on JAX and PyTorch at once."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in _COMMANDS.values():
        module.add_parser(sub)
    return parser


def report_errors(name: str, run: Callable, args) -> int:
    """``run(args)``, with errors said plainly: usage errors exit 2, failed runs 1."""
    try:
        return run(args)
    except (ValueError, TypeError, FileNotFoundError, ImportError) as exc:
        # bad names, options, shapes or missing files: a usage error, said plainly
        print(f"duogard {name}: error: {exc}", file=sys.stderr)
        return 2
    except FloatingPointError as exc:
        print(f"duogard {name}: {exc}", file=sys.stderr)
        return 1


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``duogard`` with ``argv`` (None: ``sys.argv[1:]``); return the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    return report_errors(args.command, _COMMANDS[args.command].run, args)
