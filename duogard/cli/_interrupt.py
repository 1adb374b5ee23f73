"""Ctrl-C or SIGTERM during a run: finish the current step, keep what was done, then stop.

:class:`InterruptGuard` is a context manager that, while it is entered, turns the first SIGINT
(Ctrl-C) or SIGTERM (what schedulers, containers and ``torchrun`` send to stop a job) into a
request; the :class:`~duogard.train.Callback` from :meth:`InterruptGuard.callback` ends each fit
at its next step once the request is made (``run.stop``), so ``on_fit_end`` runs and a
:class:`~duogard.train.Checkpointer` writes the last step. The command then exits 130 after
SIGINT, 143 after SIGTERM (128 + the signal's number, as shells report it). A second signal
stops at once (the previous handlers are back). Outside the main thread, or for a signal that
is ignored, nothing changes.
"""

from __future__ import annotations

import signal
import sys
import threading

from duogard.train import Callback

__all__ = ["InterruptGuard", "SIGNALS"]

#: The signals a run stops on after its current step (SIGTERM where the platform has it).
SIGNALS = tuple(s for s in (signal.SIGINT, getattr(signal, "SIGTERM", None)) if s is not None)


class InterruptGuard:
    """While entered, the first SIGINT or SIGTERM sets :attr:`requested` instead of stopping.

    Attributes:
        requested: whether a stop was requested.
        signum: the signal that requested it (None before).
    """

    def __init__(self):
        self.requested = False
        self.signum: int | None = None
        self._previous: dict = {}

    @property
    def signal_name(self) -> str:
        """``"SIGINT"`` or ``"SIGTERM"`` (the signal received; ``"SIGINT"`` before any)."""
        return signal.Signals(self.signum or signal.SIGINT).name

    @property
    def what(self) -> str:
        """How a command says it was stopped: ``"interrupted"`` (Ctrl-C), ``"terminated (SIGTERM)"``."""
        return "interrupted" if self.signum in (None, signal.SIGINT) else f"terminated ({self.signal_name})"

    @property
    def exit_code(self) -> int:
        """The exit status of a run stopped by :attr:`signum`: 128 + its number (130, 143)."""
        return 128 + int(self.signum or signal.SIGINT)

    def __enter__(self) -> InterruptGuard:
        if threading.current_thread() is threading.main_thread():
            for signum in SIGNALS:
                previous = signal.getsignal(signum)
                if previous not in (signal.SIG_IGN, None):  # an ignored signal stays ignored
                    self._previous[signum] = previous
                    signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        self._restore()

    def _restore(self) -> None:
        previous, self._previous = self._previous, {}
        for signum, handler in previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum, frame) -> None:
        self.requested = True
        self.signum = signum
        self._restore()  # a second signal stops at once
        again = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        try:
            print(
                f"\n({signal.Signals(signum).name}: stopping after this step; {again} again to stop at once)",
                file=sys.stderr,
                flush=True,
            )
        except (OSError, RuntimeError):  # pragma: no cover - stderr closed, or mid-write
            pass

    def callback(self) -> Callback:
        """A fit callback that ends the run at its next step once a stop was requested."""
        return _StopOnRequest(self)


class _StopOnRequest(Callback):
    order = 0

    def __init__(self, guard: InterruptGuard):
        self.guard = guard

    def on_fit_start(self, run):
        run.stop = run.stop or self.guard.requested

    def on_step_end(self, run, record):
        run.stop = run.stop or self.guard.requested
