"""``fit``: train a model and measure everything on the way."""

from __future__ import annotations

import math
import os
import time
import warnings
from collections.abc import Callable, Sequence

import numpy as np

from duogard import losses as _losses
from duogard.train._callbacks import Callback, Evaluate, FitRun, LambdaCallback, OnNonFinite, Progress
from duogard.train._distributed import DataParallel, distributed_callbacks
from duogard.train._memory import measure_step_memory
from duogard.train._result import FitResult, _open_statm, rss_bytes
from duogard.train._trainer import Trainer, on_backend

__all__ = ["fit"]


def _positive_int(name: str, value, *, zero: bool = False) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < (0 if zero else 1):
        raise ValueError(f"fit: {name} must be a {'non-negative' if zero else 'positive'} int, got {value!r}")
    return value


def _callbacks(callbacks) -> list[Callback]:
    if callbacks is None:
        callbacks = [Evaluate(), Progress()]
    out = [c if isinstance(c, Callback) else LambdaCallback(c) for c in callbacks]
    policies = [c for c in out if isinstance(c, OnNonFinite)]
    if len(policies) > 1:
        raise ValueError(f"fit: at most one OnNonFinite policy in callbacks, got {len(policies)}")
    if not policies:
        out.append(OnNonFinite("raise"))
    return sorted(out, key=lambda c: c.order)


def fit(
    model,
    params,
    data,
    *,
    loss: Callable | str | None = None,
    optimizer=None,
    estimator=None,
    backend=None,
    steps: int = 1000,
    batch_size: int = 64,
    seed: int = 0,
    callbacks: Sequence[Callback | Callable] | None = None,
    trainer: Trainer | None = None,
    distributed=False,
) -> FitResult:
    """Train ``model`` from ``params`` on ``data`` and measure everything on the way.

    Batches and random keys follow ``seed`` and the step index only, so a run is deterministic
    and resumable. ``params`` are copied once; the arrays passed in are never modified.

    Args:
        model: a duogard model (``init``/``apply``).
        params: the initial params (NumPy or either framework's arrays).
        data: a dataset (``duogard.data.load(...)``).
        loss: a loss function or name (default softmax cross-entropy).
        optimizer: a ``duogard.optim`` transformation (default ``sgd(0.05)``).
        estimator: a name (``"backprop"``, the default, ``"forward"``, ...) or
            ``duogard.estimator(...)``.
        backend: ``"jax"``, ``"torch"`` or None ($DUOGARD_BACKEND, then the default).
        steps: the step budget.
        batch_size: examples per step.
        seed: batches and tangents follow it.
        callbacks: evaluation, diagnostics, logging, progress, checkpoints and the non-finite
            policy, as objects of :mod:`duogard.train` (:class:`Evaluate`,
            :class:`Diagnostics`, :class:`LogFile`, :class:`Progress`, :class:`Checkpointer`,
            :class:`OnNonFinite`) or plain functions ``f(record)``. None (the default) means
            ``[Evaluate(), Progress()]``; a list replaces that default. Without an
            :class:`OnNonFinite` in the list the policy is ``OnNonFinite("raise")``.
        trainer: a :class:`Trainer` to reuse (for ``compile=True``, ``grad_norm=False`` or a
            step shared between runs); then ``loss``, ``optimizer``, ``estimator`` and
            ``backend`` must not be given.
        distributed: True (or a :class:`~duogard.train.DataParallel` to set its options) to
            train data-parallel across the ranks of a ``torchrun`` launch: each rank takes an
            equal shard of every batch and the ranks exchange K + 1 numbers per step (forward
            gradients) or the gradient (backprop). See :class:`~duogard.train.DataParallel`.

    Returns:
        A :class:`FitResult`. Its ``step_memory_bytes`` is the step's own memory, measured once
        after the run on copies of its final state (:func:`~duogard.train.measure_step_memory`);
        ``process_rss_peak_bytes`` is the process's RSS growth, which is not a method's memory.

    Raises:
        NonFiniteError: a non-finite loss or gradient under the ``"raise"`` policy.
        ValueError: bad steps, batch size or callbacks; integer labels outside the model's
            outputs (with duogard's cross-entropy or NLL loss).
        TypeError: float64 params or data on JAX with its 64-bit mode off.
    """
    steps = _positive_int("steps", steps, zero=True)
    batch_size = _positive_int("batch_size", batch_size)
    n_train = int(data.x_train.shape[0])
    if batch_size > n_train:
        raise ValueError(f"fit: batch_size ({batch_size}) is larger than the training set ({n_train})")
    trainer = _trainer_for(
        model, trainer, loss=loss, optimizer=optimizer, estimator=estimator, backend=backend
    )
    # data-parallel: join the process group (before any array is made) and keep this rank's callbacks
    cbs, parallel = distributed_callbacks(_callbacks(callbacks), distributed, trainer, batch_size=batch_size)
    _check_data(trainer, data)
    # the one step: the Trainer's, or with the data-parallel collective as its reduce part
    step = trainer.step if parallel is None else trainer.build_step(collective=parallel)
    data = data if parallel is None else parallel.shard(data)
    params, opt_state = trainer.init_state(params)
    name = getattr(trainer.estimator, "name", str(trainer.estimator))
    result = FitResult(params, opt_state, 0, trainer.be.name, name, step.strategy)
    run = FitRun(trainer, data, steps=steps, batch_size=batch_size, seed=seed, params=params,
                 opt_state=opt_state, key=trainer.be.key(seed), result=result, step=step,
                 collective=parallel)  # fmt: skip
    clock = _Clock()
    try:
        for cb in cbs:
            cb.on_fit_start(run)
        result.step = run.start
        for step in range(run.start, steps):
            if run.stop:  # a callback ended the run early (e.g. on Ctrl-C)
                break
            record = _step(run, step, cbs, clock)
            for cb in cbs:
                cb.on_step_end(run, record)
        else:
            run.finite = run.completed = True
            result.step = max(steps, run.start)
    finally:
        clock.finish(run)
        for cb in cbs:
            cb.on_fit_end(run)
    if not any(isinstance(c, DataParallel) for c in cbs):
        result.step_memory_bytes = _step_memory(run)
    return result


def _step_memory(run) -> int | None:
    """The step memory (:func:`measure_step_memory`), measured once after the run, outside its
    timed steps and wall-clock: one more step on copies of the final params and optimizer
    state, with the first step's batch and key (compiled already). None when no step ran. Not
    for a data-parallel run, whose step is a collective that every rank would have to join.
    A measurement that fails warns and gives None: the run's results are kept.
    """
    if run.result.step <= run.start:
        return None
    be = run.be
    xb, yb = (be.stage(a) for a in run.data.batch_at(run.start, run.batch_size, seed=run.seed))
    key = be.fold_in(run.key, run.start)
    try:
        return measure_step_memory(run.trainer, run.params, run.opt_state, xb, yb, key)
    except Exception as exc:  # noqa: BLE001 - a figure of the run, not the run itself
        warnings.warn(f"fit: the step memory was not measured: {type(exc).__name__}: {exc}", stacklevel=3)
        return None


def _trainer_for(model, trainer, *, loss, optimizer, estimator, backend) -> Trainer:
    """The given trainer (then no other training choice may be given), or a new one."""
    if trainer is None:
        estimator = "backprop" if estimator is None else estimator
        return Trainer(model, loss=loss, optimizer=optimizer, estimator=estimator, backend=backend)
    given = [n for n, v in (("loss", loss), ("optimizer", optimizer), ("estimator", estimator),
                            ("backend", backend)) if v is not None]  # fmt: skip
    if given:
        raise ValueError(f"fit: {', '.join(given)} given with trainer=; the trainer's own are used: "
                         "pass them to Trainer(...) instead")  # fmt: skip
    return trainer


def _check_data(trainer, data) -> None:
    """Refuse, once and before any step, what would train silently wrong: float64 data the
    backend would store in 32 bits (JAX without 64-bit mode), and integer labels outside the
    model's outputs for duogard's classification losses (they would count as 0, or, in a
    compiled step, stop the run at once with a NaN loss).
    """
    be = trainer.be
    for split in ("x_train", "y_train"):
        a = getattr(data, split)
        if a.dtype.kind == "f" and a.dtype.itemsize == 8:
            on_backend(be, a[:1], f"fit: data.{split}")
    if getattr(trainer.loss_fn, "loss", None) not in (_losses.cross_entropy, _losses.nll_loss):
        return
    try:
        classes = int(trainer.model.output_shape(tuple(data.x_train[:1].shape))[-1])
    except Exception:  # a model without shape inference: only the lower bound is known
        classes = None
    for split in ("y_train", "y_test"):
        y = getattr(data, split, None)
        if not isinstance(y, np.ndarray) or y.dtype.kind not in "iu" or not y.size:
            continue
        lo, hi = int(y.min()), int(y.max())
        if lo < 0 or (classes is not None and hi >= classes):
            bad = lo if lo < 0 else hi
            bound = f"in [0, {classes}) for the model's {classes} outputs" if classes is not None else ">= 0"
            raise ValueError(
                f"fit: data.{split} holds label {bad}; labels must be {bound} "
                f"(loss {trainer.loss_fn.loss.__name__}), else they silently count as 0"
            )


class _Clock:
    """Step times (the first, compilation included, apart), wall-clock and peak RSS of a run."""

    def __init__(self):
        self.start = time.perf_counter()
        self._statm = _open_statm()
        self.rss0 = self.peak = rss_bytes(self._statm)
        self.first = float("nan")
        self.times: list[float] = []

    def step(self, dt: float, first: bool) -> None:
        if first:
            self.first = dt
        else:
            self.times.append(dt)
        self.peak = max(self.peak, rss_bytes(self._statm))

    def finish(self, run) -> None:
        r = run.result
        r.params, r.opt_state = run.params, run.opt_state
        r.first_step_seconds = self.first
        r.total_seconds = time.perf_counter() - self.start
        r.time_per_step = float(np.median(self.times)) if self.times else self.first
        r.process_rss_peak_bytes = max(self.peak - self.rss0, 0)
        r.compiles = run.step.compiles()
        if self._statm is not None:
            os.close(self._statm)
            self._statm = None


def _step(run, step: int, cbs, clock: _Clock) -> dict:
    """Step ``step`` (0-based) of ``run``: the batch, the callbacks' ``before_step``, the timed step,
    the non-finite policy, and the step's record (appended to the history).
    """
    be = run.be
    xb, yb = (be.stage(a) for a in run.data.batch_at(step, run.batch_size, seed=run.seed))
    key = be.fold_in(run.key, step)
    for cb in cbs:
        cb.before_step(run, step, xb, yb, key)
    t0 = time.perf_counter()
    # the step returns what to continue from: its inputs, unchanged, when not finite
    if run.collective is None:
        run.params, run.opt_state, value, gsq = run.step(run.params, run.opt_state, xb, yb, key)
    else:  # data-parallel: the collective names a rank that stopped answering
        run.params, run.opt_state, value, gsq = run.collective.run_step(
            run.step, run.params, run.opt_state, xb, yb, key
        )
    value = float(value)  # waits for the step: honest timing
    # |g|² (0 without grad_norm); NaN for a step that refused a non-finite gradient
    gsq = float(gsq) if gsq is not None else 0.0
    dt = time.perf_counter() - t0
    clock.step(dt, first=step == run.start)
    run.finite = math.isfinite(value) and math.isfinite(gsq)
    if not run.finite:
        next(c for c in cbs if isinstance(c, OnNonFinite)).handle(run, step + 1, value, gsq)
    record = {"step": step + 1, "loss": value}
    if run.trainer.grad_norm:
        record["grad_norm"] = math.sqrt(gsq) if gsq >= 0 else float("nan")
    record.update(time=time.perf_counter() - clock.start, step_time=dt)
    lr = _current_lr(run.opt_state)
    if lr is not None:
        record["lr"] = lr
    run.result.history.append(record)
    run.result.step = step + 1
    return record


def _current_lr(opt_state) -> float | None:
    from duogard.optim import current_learning_rate

    try:
        return float(current_learning_rate(opt_state))
    except (TypeError, ValueError, KeyError):
        return None
