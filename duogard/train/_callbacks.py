"""Callbacks of :func:`duogard.fit`: evaluation, diagnostics, logging, progress, checkpoints and
the non-finite policy, each a small object passed in one list (Keras/Lightning style).

A callback subclasses :class:`Callback` and overrides any of its hooks; a plain function
``f(record)`` in the list is called after every step. Callbacks run in the order of their
``order`` attribute (stable for equal values): those that add to a step's record (evaluation,
diagnostics) before those that read it (log files, progress bars).
"""

from __future__ import annotations

import csv
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = [
    "Callback",
    "FitRun",
    "Evaluate",
    "Diagnostics",
    "TimeToTarget",
    "LogFile",
    "Progress",
    "Checkpointer",
    "OnNonFinite",
    "LambdaCallback",
]


class FitRun:
    """The state of one :func:`duogard.fit` run, handed to every hook.

    Attributes:
        trainer: the :class:`~duogard.train.Trainer` (``trainer.be`` is the backend).
        data: the dataset.
        steps: the step budget (the run ends after step ``steps``).
        batch_size: examples per step.
        seed: the run's seed (batches and keys follow it and the step index).
        start: the first step this run takes (after a resume, the checkpoint's step).
        params: the current params (callbacks may replace them in ``on_fit_start``).
        opt_state: the current optimizer state.
        key: the base random key (step ``i`` uses ``fold_in(key, i)``).
        result: the :class:`~duogard.train.FitResult` being filled.
        step: the :class:`duogard.step.Step` the run takes (the Trainer's, or its data-parallel
            build).
        collective: the run's :class:`~duogard.train.DataParallel`, or None (one process).
        finite: whether the last step's loss (and gradient) were finite.
        completed: whether the run reached its last step (False while running or after an error).
        stop: set it (from any hook) to end the run before its next step: ``completed`` stays
            False and ``on_fit_end`` runs (a :class:`Checkpointer` writes the last step).
    """

    def __init__(
        self,
        trainer,
        data,
        *,
        steps,
        batch_size,
        seed,
        params,
        opt_state,
        key,
        result,
        step=None,
        collective=None,
    ):
        self.trainer, self.data = trainer, data
        self.step = trainer.step if step is None else step
        self.collective = collective
        self.steps, self.batch_size, self.seed = steps, batch_size, seed
        self.start = 0
        self.params, self.opt_state, self.key, self.result = params, opt_state, key, result
        self.finite = True
        self.completed = False
        self.stop = False

    @property
    def be(self):
        """The run's backend."""
        return self.trainer.be


class Callback:
    """The base of fit's callbacks: every hook does nothing until overridden."""

    #: when this callback runs among the others (lower first)
    order: int = 50

    def on_fit_start(self, run: FitRun) -> None:
        """Before the first step (``run.start`` may still change: a resume sets it)."""

    def before_step(self, run: FitRun, step: int, x, y, key) -> None:
        """Before step ``step`` (0-based), on its batch and key, outside the timed step."""

    def on_step_end(self, run: FitRun, record: dict) -> None:
        """After each step; ``record`` is the step's entry of the history (add keys to it)."""

    def on_fit_end(self, run: FitRun) -> None:
        """After the last step, also when the run stops on an error (check ``run.result``)."""


class LambdaCallback(Callback):
    """A plain function ``f(record)`` called after every step."""

    def __init__(self, fn: Callable[[dict], Any]):
        if not callable(fn):
            raise TypeError(f"fit: a callback must be a Callback or a callable f(record), got {fn!r}")
        self.fn = fn

    def on_step_end(self, run, record):
        self.fn(record)


def _every(name: str, value, *, allow_none: bool = True) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(
            f"{name}: every must be a positive int{' or None' if allow_none else ''}, got {value!r}"
        )
    return value


class Evaluate(Callback):
    """Evaluate on the test split every ``every`` steps and after the last one.

    Adds ``test_loss`` and ``test_accuracy`` to the step's record and one entry to
    ``result.evals``.

    Args:
        every: steps between evaluations (None: a tenth of the run, at least 1).
        batch_size: examples per evaluation batch.
    """

    order = 10

    def __init__(self, every: int | None = None, *, batch_size: int = 512):
        self.every = _every("Evaluate", every)
        self.batch_size = _every("Evaluate(batch_size)", batch_size, allow_none=False)

    def on_step_end(self, run, record):
        every = self.every or max(run.steps // 10, 1)
        done = record["step"]
        if done % every and done != run.steps:
            return
        data = run.data
        ev = run.trainer.evaluate(run.params, data.x_test, data.y_test, batch_size=self.batch_size)
        entry = {
            "step": done,
            "test_loss": ev["loss"],
            "test_accuracy": ev["accuracy"],
            "time": record["time"],
        }
        run.result.evals.append(entry)
        record.update(test_loss=ev["loss"], test_accuracy=ev["accuracy"])


class TimeToTarget(Callback):
    """The first evaluation whose test accuracy reaches ``target``: its step and the training
    seconds to it.

    Reads the ``test_accuracy`` that an :class:`Evaluate` in the same list adds to a step's
    record, so the answer is as fine as that evaluation's ``every``. The clock is the run's
    training time: the sum of its timed steps' seconds (each record's ``step_time``; the first
    step's compilation included) up to and including the step that reached the target.
    Evaluations, diagnostics, the other callbacks and the batches' preparation are not on it.

    Args:
        target: the test accuracy to reach, in (0, 1].

    Attributes (after the run):
        step: the step of the first evaluation at or above ``target`` (None: never reached).
        seconds: the training seconds to that step (None: never reached).
        accuracy: the test accuracy of that evaluation (None: never reached).
    """

    order = 20  # after Evaluate (10), which adds the accuracy it reads

    def __init__(self, target: float):
        if isinstance(target, bool) or not isinstance(target, (int, float)) or not 0 < target <= 1:
            raise ValueError(f"TimeToTarget: target must be an accuracy in (0, 1], got {target!r}")
        self.target = float(target)
        self.step: int | None = None
        self.seconds: float | None = None
        self.accuracy: float | None = None
        self._clock = 0.0

    def on_fit_start(self, run):
        self.step = self.seconds = self.accuracy = None
        self._clock = 0.0

    def on_step_end(self, run, record):
        self._clock += record.get("step_time", 0.0)
        acc = record.get("test_accuracy")
        if self.step is None and acc is not None and acc >= self.target:
            self.step, self.seconds, self.accuracy = record["step"], self._clock, float(acc)

    def summary(self) -> dict:
        """``target_accuracy``, ``steps_to_target`` and ``seconds_to_target`` (None: not reached)."""
        return {
            "target_accuracy": self.target,
            "steps_to_target": self.step,
            "seconds_to_target": self.seconds,
        }


class Diagnostics(Callback):
    """Every ``every`` steps, compare the estimate with the true (backprop) gradient.

    Computed on that step's params, batch and key before the step and outside its timing;
    adds ``cosine`` and ``rel_norm`` to the record.

    Args:
        every: steps between diagnostics (a positive int).
    """

    order = 10

    def __init__(self, every: int):
        self.every = _every("Diagnostics", every, allow_none=False)
        self._pending: dict = {}

    def before_step(self, run, step, x, y, key):
        self._pending = {}
        if step % self.every == 0:
            self._pending = {k: float(v) for k, v in run.trainer.diagnose(run.params, x, y, key).items()}

    def on_step_end(self, run, record):
        record.update(self._pending)
        self._pending = {}


#: record keys that appear only on some steps (so a CSV log needs their columns from the start)
_LATE_FIELDS = ("cosine", "rel_norm", "test_loss", "test_accuracy")


class LogFile(Callback):
    """Per-step records to a ``.csv`` or ``.jsonl`` file (by the suffix).

    Args:
        path: the file (its directory is created; the file is replaced).
    """

    order = 90

    def __init__(self, path):
        self.path = Path(path)
        if self.path.suffix not in (".csv", ".jsonl"):
            raise ValueError(f"LogFile: path must end in .csv or .jsonl, got {str(path)!r}")
        self._f = None
        self._writer = None

    def on_fit_start(self, run):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "w", newline="")
        self._writer = None

    def on_step_end(self, run, record):
        if self.path.suffix == ".jsonl":
            self._f.write(json.dumps(record) + "\n")
            return
        if self._writer is None:
            # columns that only some steps carry (evaluations, diagnostics) are declared up front
            fields = list(record) + [k for k in _LATE_FIELDS if k not in record]
            self._writer = csv.DictWriter(self._f, fieldnames=fields, extrasaction="ignore")
            self._writer.writeheader()
        self._writer.writerow(record)

    def on_fit_end(self, run):
        if self._f is not None:
            self._f.close()
            self._f = None


class Progress(Callback):
    """A tqdm progress bar with the running loss.

    Args:
        enabled: True, False, or None (default: only when stderr is a terminal).
    """

    order = 100

    def __init__(self, enabled: bool | None = None):
        self.enabled = enabled
        self._bar = None

    def on_fit_start(self, run):
        show = self.enabled if self.enabled is not None else sys.stderr.isatty()
        if show:
            from tqdm.auto import tqdm

            self._bar = tqdm(
                total=run.steps - run.start, desc=f"{run.be.name}/{run.result.estimator}", leave=False
            )

    def on_step_end(self, run, record):
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix(loss=f"{record['loss']:.4f}")

    def on_fit_end(self, run):
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class Checkpointer(Callback):
    """Write checkpoints (atomically) every ``every`` steps and at the end; optionally resume.

    Args:
        directory: the checkpoint directory to write (None: write nothing, only resume).
        every: steps between checkpoints (None: only at the end). The end includes a run
            stopped by an error after its first step (the params are then the last good ones).
        resume: a checkpoint directory to continue from before the first step (exactly: the
            same batches and keys follow), or True for ``directory`` itself.
        config: a JSON-serialisable dict added to every checkpoint's ``config`` (beside the
            backend and the estimator's name): the command line records its flags there.

    From the start of the run to its end, the Checkpointer holds ``directory``'s writer
    lock: a second run writing to the same directory (another process, or another
    Checkpointer in this one) fails when it starts, with
    :class:`~duogard.train.CheckpointLockedError` naming this run's pid and host. Loading
    the checkpoints meanwhile (``load_checkpoint``, ``resume=``) needs no lock.
    """

    order = 5

    def __init__(self, directory=None, *, every: int | None = None, resume=None, config: dict | None = None):
        self.directory = directory
        self.every = _every("Checkpointer", every)
        if config is not None and not isinstance(config, dict):
            raise TypeError(f"Checkpointer: config must be a dict or None, got {type(config).__name__}")
        self.config = dict(config or {})
        self.resume = directory if resume is True else (None if resume is False else resume)
        self._lock = None
        self._failed: int | None = None  # the step whose save failed
        if directory is None and (self.resume is None or every is not None):
            raise ValueError(
                "Checkpointer: directory is None, so nothing would be written: give a directory, "
                "or only resume=PATH to resume without writing"
            )

    def on_fit_start(self, run):
        from duogard.train.checkpoint import load_checkpoint, lock_directory

        if self.directory is not None and self._lock is None:
            self._lock = lock_directory(self.directory)  # held until on_fit_end
        if self.resume is None:
            return
        ck = load_checkpoint(
            self.resume, like_params=run.params, like_opt_state=run.opt_state, backend=run.be.name
        )
        run.params, run.opt_state, run.start = ck.params, ck.opt_state, int(ck.step)
        if ck.key is not None:
            run.key = ck.key

    def on_step_end(self, run, record):
        if self.every and record["step"] % self.every == 0:
            self.save(run, record["step"])

    def on_fit_end(self, run):
        if self._lock is None:  # no directory, or the lock was never taken (another writer had it)
            return
        try:
            # also after an error, once a step has run: a non-finite step leaves the last good
            # params in run.params, and an interrupted run keeps its steps; not again the step
            # whose save just failed (a full disk): its error is the one the run reports
            if (run.completed or run.result.step > run.start) and run.result.step != self._failed:
                self.save(run, run.result.step)
        finally:
            lock, self._lock = self._lock, None
            lock.release()

    def save(self, run, step: int) -> None:
        """Write ``run``'s params, optimizer state and key as the checkpoint of ``step``.

        Under the lock taken in ``on_fit_start``; outside a run, under a lock of its own.
        """
        from duogard.train.checkpoint import save_checkpoint, save_locked

        kwargs = dict(
            params=run.params,
            opt_state=run.opt_state,
            step=step,
            key=run.key,
            config={"backend": run.be.name, "estimator": run.result.estimator, **self.config},
        )
        try:
            if self._lock is not None:
                save_locked(self._lock, **kwargs)
            else:
                save_checkpoint(self.directory, **kwargs)
        except OSError:  # CheckpointWriteError: says the previous checkpoint is intact
            self._failed = step
            raise


_ACTIONS = ("raise", "skip")


class OnNonFinite(Callback):
    """What to do when a step's loss (or gradient) is not finite.

    A non-finite step never updates anything (one exception: the ``"sgd-in-backward"`` update
    keeps what it wrote before a gradient turned non-finite inside the network; see
    :mod:`duogard.step`). ``"raise"`` (the default policy of
    :func:`duogard.fit`) stops the run with :class:`~duogard.train.NonFiniteError`, which
    carries the last good params; ``"skip"`` drops the step, keeps the previous params and
    counts it in ``result.skipped_steps``.

    Args:
        action: ``"raise"`` or ``"skip"``.
    """

    order = 0

    def __init__(self, action: str = "raise"):
        if action not in _ACTIONS:
            raise ValueError(f"OnNonFinite: action must be one of {_ACTIONS}, got {action!r}")
        self.action = action

    def handle(self, run, step: int, value: float, gsq: float) -> None:
        """Called by fit for a non-finite step ``step`` (1-based), before anything is recorded."""
        from duogard.train._result import NonFiniteError

        if self.action == "skip":
            run.result.skipped_steps += 1
            return
        what = "loss" if not math.isfinite(value) else "gradient"
        raise NonFiniteError(
            f"fit: non-finite {what} at step {step} (loss={value}, |grad|^2={gsq}) with "
            f"{run.result.estimator} on {run.be.name}; the error's .params hold the last good params. "
            "Lower the learning rate, or pass OnNonFinite('skip').",
            step=step,
            params=run.params,
            opt_state=run.opt_state,
        )
