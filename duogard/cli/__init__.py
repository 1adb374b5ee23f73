"""The ``duogard`` command: ``train``, ``compare`` (the main job), ``parity``, ``bench``.

One module per command (``add_parser`` and ``run``): each is the front of a library function
(``compare`` of :func:`duogard.comparison.compare_methods`, ``parity`` of
:func:`duogard.parity.compare_backends`, ``train`` of :func:`duogard.fit`); ``_options`` holds
the flags several commands share, ``_outputs`` the output paths (checked before any work),
``_interrupt`` Ctrl-C, ``_errors`` the exit codes. The ``name[:option=value,...]`` grammar and
the one table of default learning rates are the library's :mod:`duogard.methods` (their old
names here, ``duogard.cli.parse_method`` and the others, are deprecated: they warn and go in the
next release). Library modules never import this package.

Exit codes (:mod:`duogard.cli._errors`): 0 success; 1 a run failed (a non-finite loss, an output
that could not be written, an error inside duogard: one line, ``--debug`` for the traceback);
2 a usage error (the user's flags, paths or data, or a framework that is not installed);
130 interrupted by Ctrl-C (after the current step, and a checkpoint with ``--checkpoint``).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from duogard import methods as _methods
from duogard._deprecated import moved
from duogard.cli import bench, compare, parity, train
from duogard.cli._errors import UsageError, report_errors

__all__ = [
    "main",
    "build_parser",
    "report_errors",
    "add_debug_flag",
    "UsageError",
]

_COMMANDS = {"train": train, "compare": compare, "bench": bench, "parity": parity}


DEBUG_HELP = "on an error, print the full traceback too"


def add_debug_flag(parser: argparse.ArgumentParser, *, inherit: bool = False) -> None:
    """``--debug``: tracebacks on errors (``inherit``: a subcommand's, that keeps the top's value)."""
    default = argparse.SUPPRESS if inherit else False
    parser.add_argument("--debug", action="store_true", default=default, help=DEBUG_HELP)


def build_parser() -> argparse.ArgumentParser:
    """The ``duogard`` argument parser with every command."""
    parser = argparse.ArgumentParser(
        prog="duogard", description="Forward gradients vs backprop, on JAX and PyTorch at once."
    )
    add_debug_flag(parser)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in _COMMANDS.values():
        add_debug_flag(module.add_parser(sub), inherit=True)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``duogard`` with ``argv`` (None: ``sys.argv[1:]``); return the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    return report_errors(args.command, _COMMANDS[args.command].run, args)


#: The method grammar's old names here (moved to :mod:`duogard.methods`); they go in the next release.
_DEPRECATED = (
    "MethodSpec",
    "parse_method",
    "parse_methods",
    "DEFAULT_METHODS",
    "LEARNING_RATES",
    "default_lr",
)


def __getattr__(name: str):
    if name in _DEPRECATED:
        return moved(f"duogard.cli.{name}", f"duogard.methods.{name}", getattr(_methods, name))
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
