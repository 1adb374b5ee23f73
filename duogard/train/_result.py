"""What a training run returns, and the error that stops one."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["FitResult", "NonFiniteError", "rss_bytes"]


class NonFiniteError(FloatingPointError):
    """The loss or the gradient stopped being finite.

    Attributes:
        step: the 1-based step whose loss or gradient was not finite.
        params: the last good parameters (the step's inputs: a non-finite step updates nothing).
        opt_state: the optimizer state that goes with ``params``.
    """

    def __init__(self, message: str, *, step: int | None = None, params: Any = None, opt_state: Any = None):
        super().__init__(message)
        self.step, self.params, self.opt_state = step, params, opt_state


_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _open_statm() -> int | None:
    """A descriptor of ``/proc/self/statm`` to read again and again (None where there is none)."""
    try:
        return os.open("/proc/self/statm", os.O_RDONLY)
    except OSError:  # pragma: no cover - not Linux
        return None


def rss_bytes(fd: int | None = None) -> int:
    """The process's resident set size now (Linux /proc; 0 where unknown).

    Args:
        fd: a descriptor from ``_open_statm`` (a training loop reads it every step: a
            ``pread`` costs a tenth of opening the file); None opens the file.
    """
    try:
        if fd is None:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * _PAGE
        return int(os.pread(fd, 128, 0).split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):  # pragma: no cover - not Linux
        return 0


@dataclass
class FitResult:
    """What :func:`duogard.fit` returns: the trained state and everything measured on the way."""

    params: Any
    opt_state: Any
    step: int
    backend: str
    estimator: str
    update_strategy: str = "optimizer"  # how the Trainer applied the updates
    history: list[dict] = field(default_factory=list)  # one record per step
    evals: list[dict] = field(default_factory=list)  # one record per evaluation
    first_step_seconds: float = float("nan")  # compilation + first step
    time_per_step: float = float("nan")  # median, compilation excluded
    total_seconds: float = float("nan")
    # the step's own memory (:func:`~duogard.train.measure_step_memory`): the peak bytes of the
    # arrays alive during one step beyond params, optimizer state and batch; None: not measured
    # (no step ran, or a data-parallel run)
    step_memory_bytes: int | None = None
    # the process's peak RSS growth during the run: compilers, libraries and allocator caches
    # included, so never a method's memory
    process_rss_peak_bytes: int = 0
    skipped_steps: int = 0
    compiles: int | None = None  # JAX: compilations of the step

    @property
    def final_loss(self) -> float:
        """The mean training loss of the last 20 finite steps."""
        tail = [h["loss"] for h in self.history[-20:] if math.isfinite(h["loss"])]
        return float(np.mean(tail)) if tail else float("nan")

    @property
    def test_accuracy(self) -> float:
        """The test accuracy of the last evaluation (NaN without one)."""
        return self.evals[-1]["test_accuracy"] if self.evals else float("nan")

    @property
    def mean_cosine(self) -> float:
        """The mean cosine of the estimate to the true gradient over the diagnosed steps."""
        vals = [h["cosine"] for h in self.history if "cosine" in h]
        return float(np.mean(vals)) if vals else float("nan")

    def summary(self) -> dict:
        """The run's figures as a flat dict (JSON-ready)."""
        return {
            "backend": self.backend,
            "estimator": self.estimator,
            "update_strategy": self.update_strategy,
            "steps": self.step,
            "final_loss": self.final_loss,
            "test_accuracy": self.test_accuracy,
            "time_per_step": self.time_per_step,
            "first_step_seconds": self.first_step_seconds,
            "total_seconds": self.total_seconds,
            "step_memory_bytes": self.step_memory_bytes,
            "process_rss_peak_bytes": self.process_rss_peak_bytes,
            "mean_cosine": self.mean_cosine,
            "skipped_steps": self.skipped_steps,
            "compiles": self.compiles,
        }
