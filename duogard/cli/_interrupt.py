"""Ctrl-C during a run: finish the current step, keep what was done, then stop (exit 130).

:class:`InterruptGuard` is a context manager that, while it is entered, turns the first SIGINT
into a request; the :class:`~duogard.train.Callback` from :meth:`InterruptGuard.callback` ends
each fit at its next step once the request is made (``run.stop``), so ``on_fit_end`` runs and
a :class:`~duogard.train.Checkpointer` writes the last step. A second Ctrl-C interrupts at once
(the previous handler is back). Outside the main thread, or where SIGINT is ignored, nothing
changes.
"""

from __future__ import annotations

import signal
import sys
import threading

from duogard.train import Callback

__all__ = ["InterruptGuard"]


class InterruptGuard:
    """While entered, the first SIGINT sets :attr:`requested` instead of raising.

    Attributes:
        requested: whether Ctrl-C was pressed.
    """

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self) -> InterruptGuard:
        if threading.current_thread() is threading.main_thread():
            previous = signal.getsignal(signal.SIGINT)
            if previous not in (signal.SIG_IGN, None):  # an ignored SIGINT stays ignored
                self._previous = previous
                signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        self._restore()

    def _restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    def _handle(self, signum, frame) -> None:
        self.requested = True
        self._restore()  # a second Ctrl-C interrupts at once
        try:
            print("\n(stopping after this step; Ctrl-C again to stop at once)", file=sys.stderr, flush=True)
        except (OSError, RuntimeError):  # pragma: no cover - stderr closed, or mid-write
            pass

    def callback(self) -> Callback:
        """A fit callback that ends the run at its next step once Ctrl-C was pressed."""
        return _StopOnRequest(self)


class _StopOnRequest(Callback):
    order = 0

    def __init__(self, guard: InterruptGuard):
        self.guard = guard

    def on_fit_start(self, run):
        run.stop = run.stop or self.guard.requested

    def on_step_end(self, run, record):
        run.stop = run.stop or self.guard.requested
