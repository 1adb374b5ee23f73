"""How a command ends: its exit code and one line on stderr, whatever went wrong.

Exit codes: 0 success; 1 a run failed (a non-finite loss, an output that could not be written,
or an error inside duogard: one line, the traceback with ``--debug``); 2 a usage error (a
:class:`UsageError`: a bad flag, method, path or dataset, or a framework that is not
installed); 130 interrupted (Ctrl-C), 143 terminated (SIGTERM).
"""

from __future__ import annotations

import sys
import traceback
from collections.abc import Callable

from duogard.methods import MethodError

__all__ = [
    "UsageError",
    "OutputError",
    "RunFailedError",
    "RunInterruptedError",
    "report_errors",
    "EXIT_INTERRUPTED",
]

#: The exit status of a command stopped by SIGINT (128 + 2, as shells report it).
EXIT_INTERRUPTED = 130


class UsageError(ValueError):
    """A mistake in the command line or its environment, found by the command itself (exit 2).

    Raised by the CLI's own checks of flags, methods, paths and data, and by its calls into
    the library whose argument errors come straight from a flag (wrapped where it calls them).
    A :class:`duogard.methods.MethodError` (a ``--grad`` or ``--methods`` written wrongly,
    raised by the library's grammar) is a usage error too. Any other exception is not the
    user's mistake and exits 1.
    """


#: What a command reports as the user's mistake: exit 2, the message alone.
_USAGE_ERRORS = (UsageError, MethodError)


class OutputError(Exception):
    """An output that could not be written at the end of a run; what the run printed stands (exit 1)."""


class RunFailedError(Exception):
    """A run that ended but failed, said in one line by its message (exit 1): too many skipped
    steps, a checkpoint the disk refused.
    """


class RunInterruptedError(Exception):
    """A run stopped by Ctrl-C or SIGTERM after writing what it could; the message says what.

    Exits ``exit_code``: 130 after Ctrl-C (SIGINT), 143 after SIGTERM.
    """

    def __init__(self, message: str, *, exit_code: int = EXIT_INTERRUPTED):
        super().__init__(message)
        self.exit_code = exit_code


def report_errors(name: str, run: Callable, args, *, prog: str | None = None) -> int:
    """``run(args)``'s exit code, with any error said in one line on stderr.

    :class:`UsageError` (and :class:`~duogard.methods.MethodError`) exits 2,
    :class:`RunInterruptedError` its ``exit_code`` (130, 143), ``KeyboardInterrupt`` 130,
    ``FloatingPointError`` (a non-finite run) 1 with its message, and every other exception
    1 with its type and message. ``args.debug`` also prints the traceback. Messages start
    with ``prog`` (default ``duogard NAME``).
    """
    prog = prog or f"duogard {name}"
    try:
        return run(args)
    except Exception as exc:
        if getattr(args, "debug", False):
            traceback.print_exc()
        print(_one_line(prog, exc), file=sys.stderr)
        return _exit_code(exc)
    except KeyboardInterrupt:
        if getattr(args, "debug", False):
            traceback.print_exc()
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def _one_line(prog: str, exc: Exception) -> str:
    if isinstance(exc, (*_USAGE_ERRORS, OutputError, RunFailedError)):
        return f"{prog}: error: {exc}"
    if isinstance(exc, RunInterruptedError):
        return f"{prog}: {exc}"
    if isinstance(exc, FloatingPointError):  # NonFiniteError: its message says what to do
        return f"{prog}: {exc}"
    text = str(exc).strip().replace("\n", " ")
    kind = type(exc).__name__
    return f"{prog}: error: {kind}: {text} (run with --debug for the traceback)"


def _exit_code(exc: Exception) -> int:
    if isinstance(exc, _USAGE_ERRORS):
        return 2
    if isinstance(exc, RunInterruptedError):
        return exc.exit_code
    return 1
