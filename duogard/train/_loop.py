"""The training loop, written once: one compiled step per backend."""

from __future__ import annotations

import csv
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from duogard import losses as _losses
from duogard.backend import backend as _select_backend
from duogard.tree import tree_leaves, tree_map

__all__ = ["fit", "Trainer", "FitResult", "NonFiniteError", "rss_bytes"]

_ON_NAN = ("raise", "skip")
#: per-step record keys that appear only on some steps (so a CSV log needs their columns from the start)
_LATE_FIELDS = ("cosine", "rel_norm", "test_loss", "test_accuracy")


class NonFiniteError(FloatingPointError):
    """The loss or the gradient stopped being finite."""


def rss_bytes() -> int:
    """The process's resident set size now (Linux /proc; 0 where unknown)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):  # pragma: no cover - not Linux
        return 0


@dataclass
class FitResult:
    """What :func:`fit` returns: the trained state and everything measured on the way."""

    params: Any
    opt_state: Any
    step: int
    backend: str
    estimator: str
    history: list[dict] = field(default_factory=list)   # one record per step
    evals: list[dict] = field(default_factory=list)     # one record per evaluation
    first_step_seconds: float = float("nan")            # compilation + first step
    time_per_step: float = float("nan")                 # median, compilation excluded
    total_seconds: float = float("nan")
    peak_memory_bytes: int = 0                          # peak RSS growth during the run
    skipped_steps: int = 0
    compiles: int | None = None                         # JAX: compilations of the step

    @property
    def final_loss(self) -> float:
        tail = [h["loss"] for h in self.history[-20:] if math.isfinite(h["loss"])]
        return float(np.mean(tail)) if tail else float("nan")

    @property
    def test_accuracy(self) -> float:
        return self.evals[-1]["test_accuracy"] if self.evals else float("nan")

    @property
    def mean_cosine(self) -> float:
        vals = [h["cosine"] for h in self.history if "cosine" in h]
        return float(np.mean(vals)) if vals else float("nan")

    def summary(self) -> dict:
        return {
            "backend": self.backend, "estimator": self.estimator, "steps": self.step,
            "final_loss": self.final_loss, "test_accuracy": self.test_accuracy,
            "time_per_step": self.time_per_step, "first_step_seconds": self.first_step_seconds,
            "total_seconds": self.total_seconds, "peak_memory_bytes": self.peak_memory_bytes,
            "mean_cosine": self.mean_cosine, "skipped_steps": self.skipped_steps,
            "compiles": self.compiles,
        }


class _Log:
    """Per-step records to CSV or JSONL (by the file's suffix)."""

    def __init__(self, path):
        self.path = Path(path)
        if self.path.suffix not in (".csv", ".jsonl"):
            raise ValueError(f"fit: log must be a .csv or .jsonl path, got {str(path)!r}")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "w", newline="")
        self._writer = None

    def write(self, rec: dict) -> None:
        if self.path.suffix == ".jsonl":
            self._f.write(json.dumps(rec) + "\n")
            return
        if self._writer is None:
            # columns that only some steps carry (evaluations, diagnostics) are declared up front
            self._fields = list(rec) + [k for k in _LATE_FIELDS if k not in rec]
            self._writer = csv.DictWriter(self._f, fieldnames=self._fields, extrasaction="ignore")
            self._writer.writeheader()
        self._writer.writerow(rec)

    def close(self) -> None:
        self._f.close()


class Trainer:
    """Holds one compiled step (and evaluation) for a model, loss, optimizer and estimator.

    ``fit`` is the one-call front; use a Trainer to drive steps yourself:
    ``params, opt_state, loss, grad_sq_norm = trainer.step(params, opt_state, x, y, key)``.

    The Trainer owns the params it steps. :meth:`init_state` copies them once; after that
    each step may reuse their buffers: a momentum-free :func:`duogard.optim.sgd` is applied in
    one pass, in place on torch and into the donated input buffers on JAX (the same numbers
    as ``update`` + ``apply_updates``, without the intermediate arrays). So pass each step the
    params that the previous one returned, never older ones. When the loss (or, with
    ``grad_norm``, the gradient) is not finite, the step returns the params and optimizer
    state it was given, unchanged.

    ``grad_norm`` (default True): also return ``|g|²`` (one more pass over the gradient; the
    step then also refuses a non-finite gradient with a finite loss). With False the fourth
    result is None.
    """

    def __init__(self, model, *, loss: Callable | str = _losses.cross_entropy, optimizer=None,
                 estimator="backprop", backend=None, compile=None, grad_norm: bool = True):
        from duogard import grad as _grad
        from duogard import optim as _optim

        self.be = _select_backend(backend)
        self.model = model
        self.loss_fn = _grad.supervised(model, loss)
        self.estimator = _grad.estimator(estimator) if isinstance(estimator, str) else estimator
        self.optimizer = optimizer if optimizer is not None else _optim.sgd(0.05)
        self._optim = _optim
        be, est, opt, loss_fn = self.be, self.estimator, self.optimizer, self.loss_fn
        measure = _grad.with_diagnostics(est)

        self.grad_norm = bool(grad_norm)
        sgd = _optim.plain_sgd(opt)
        xp = be.xp

        def step(params, opt_state, x, y, key):
            # with sgd, an estimate of the form d * v (forward, one tangent) is applied as such:
            # p -= (lr d) v, one pass per leaf, the gradient array d v never written
            factored = getattr(est, "factored", None) if sgd is not None else None
            parts = factored(loss_fn, params, (x, y), key) if factored is not None else None
            if parts is None:
                value, grads = est(loss_fn, params, (x, y), key)
                coef = None
            else:
                value, coef, grads = parts  # the estimate is coef * grads
            ok = xp.isfinite(value)
            gsq = None
            if self.grad_norm:
                gsq = sum(xp.linalg.vector_norm(g) ** 2 for g in tree_leaves(grads))
                if coef is not None:
                    gsq = gsq * coef * coef
                ok = xp.logical_and(ok, xp.isfinite(gsq))
            if sgd is not None:  # one pass per leaf: p (1 - lr wd) - lr g, in place / donated
                lr, new_state = sgd.advance(opt_state)
                wd = sgd.weight_decay

                def apply(p, g):
                    if wd:
                        p = be.add_scaled_(p, p, -xp.astype(lr, p.dtype) * wd, where=ok)
                    scale = -xp.astype(lr, p.dtype)
                    if coef is not None:
                        scale = scale * xp.astype(coef, p.dtype)
                    return be.add_scaled_(p, g, scale, where=ok)

                params = tree_map(apply, params, grads)
            else:
                updates, new_state = opt.update(grads, opt_state, params)
                params = _keep_if(be, ok, _optim.apply_updates(params, updates), params)
            return params, _keep_if(be, ok, new_state, opt_state), value, gsq

        jit_kw = {} if compile is None else {"compile": bool(compile)}
        self.lean = None
        if getattr(est, "lean", False):
            if sgd is None:
                raise ValueError(
                    "Trainer: estimator forward(lean=True) applies the SGD update itself, layer by layer; "
                    "optimizer must be duogard.optim.sgd(learning_rate, weight_decay=...) without momentum, "
                    f"got {opt!r:.120}"
                )
            from duogard.grad._lean import LeanStep

            self.lean = LeanStep(est, self.loss_fn, be, sgd, compile=compile)

        def diagnose(params, x, y, key):
            # the estimate next to the true gradient, outside the timed step
            return measure(loss_fn, params, (x, y), key)[2]

        # a loss with a reduction argument gives the evaluation's summed loss (decided once)
        loss_sum = _losses.get(loss) if _takes_reduction(loss) else None

        def evaluate(params, x, y):
            logits = model.apply(params, x)
            per = loss_sum(logits, y, reduction="sum") if loss_sum is not None else None
            correct = be.xp.sum(be.xp.astype(be.xp.argmax(logits, axis=-1) == y, be.xp.int32)) \
                if y.ndim == 1 and not be.xp.isdtype(y.dtype, "real floating") else None
            return per, correct

        if self.lean is not None:
            # not one compiled program: the lean step's layers are (see duogard.grad._lean)
            self.step = lambda params, opt_state, x, y, key: self.lean.step(params, opt_state, (x, y), key)
        else:
            # params are donated: with sgd XLA updates them in place (they are this Trainer's own)
            self.step = be.jit(step, donate_argnums=(0,), **jit_kw)
        self.diagnose = be.jit(diagnose, **jit_kw)
        self.evaluate_batch = be.jit(evaluate, **jit_kw)

    def compiles(self) -> int | None:
        size = getattr(self.step, "_cache_size", None)
        return size() if callable(size) else None

    def init_state(self, params):
        """Params on this backend (from NumPy or either framework) and the optimizer state."""
        be = self.be
        params = tree_map(be.asarray, params)
        params = _owned_copy(be, params)  # steps update in place / donate: never the caller's arrays
        # placed explicitly (committed, on JAX) like the step's outputs, so the step compiles once
        place = lambda a: be.asarray(a, device=be.default_device()) if be.is_array(a) else a  # noqa: E731
        return tree_map(place, params), tree_map(place, self.optimizer.init(params))

    def evaluate(self, params, x, y, *, batch_size: int = 512) -> dict:
        """Mean loss and accuracy over ``(x, y)`` (NumPy or backend arrays)."""
        total, correct, n = 0.0, 0, int(x.shape[0])
        for start in range(0, n, batch_size):
            xb = self.be.asarray(x[start:start + batch_size])
            yb = self.be.asarray(y[start:start + batch_size])
            s, c = self.evaluate_batch(params, xb, yb)
            total += float(s) if s is not None else float("nan")
            correct += int(c) if c is not None else 0
        return {"loss": total / max(n, 1), "accuracy": correct / max(n, 1)}


def _owned_copy(be, tree):
    return tree_map(lambda a: be.xp.asarray(a, copy=True) if be.is_array(a) else a, tree)


def _keep_if(be, ok, new, old):
    """``new`` where the 0-d bool ``ok`` holds, else ``old`` (selected inside a compiled step)."""
    if be.is_tracing(ok):
        return tree_map(lambda a, b: be.xp.where(ok, a, b), new, old)
    return new if bool(ok) else old


def _takes_reduction(loss) -> bool:
    import inspect

    try:
        return "reduction" in inspect.signature(_losses.get(loss)).parameters
    except (TypeError, ValueError):
        return False


def fit(model, params, data, *, loss: Callable | str = _losses.cross_entropy, optimizer=None,
        estimator="backprop", backend=None, steps: int = 1000, batch_size: int = 64, seed: int = 0,
        eval_every: int | None = None, diagnostics_every: int = 0, log=None, progress=None,
        compile=None, on_nan: str = "raise", checkpoint=None, checkpoint_every: int | None = None,
        resume=None, callback: Callable[[dict], Any] | None = None, trainer: Trainer | None = None,
        grad_norm: bool = True) -> FitResult:
    """Train ``model`` from ``params`` on ``data`` and measure everything on the way.

    Parameters (keyword-only after ``data``):
      loss: a loss function or name (default softmax cross-entropy).
      optimizer: a ``duogard.optim`` transformation (default ``sgd(0.05)``).
      estimator: a name (``"backprop"``, ``"forward"``, ...) or ``duogard.estimator(...)``.
      backend: ``"jax"``, ``"torch"`` or None ($DUOGARD_BACKEND, then the default).
      steps, batch_size, seed: the budget and the randomness (batches and tangents follow
        ``seed`` and the step index only, so a run is deterministic and resumable).
      eval_every: evaluate on the test split every this many steps (and at the end).
      diagnostics_every: every this many steps (0: never), compare the estimate with the true
        (backprop) gradient on that step's batch and record ``cosine`` and ``rel_norm``.
        Computed outside the timed step, so it never inflates ``time_per_step``.
      log: a ``.csv`` or ``.jsonl`` path for per-step records.
      progress: a tqdm bar (default: only when stderr is a terminal).
      compile: JAX jits by default; torch runs eagerly unless ``compile=True`` (torch.compile).
      on_nan: ``"raise"`` (default) stops with :class:`NonFiniteError`, keeping the last good
        checkpoint; ``"skip"`` drops the step, keeps the previous params, and counts it.
      checkpoint, checkpoint_every: a directory to write checkpoints to (atomically).
      resume: a checkpoint directory to continue from (exactly: same batches, same keys).
      grad_norm: record ``grad_norm`` (|g|) every step (default; one more pass over the
        gradient, and a non-finite gradient is caught even when the loss is finite).
      trainer: a :class:`Trainer` to reuse (its model, loss, optimizer, estimator and
        ``grad_norm`` are used; those arguments are then ignored).

    ``params`` are copied once; the arrays passed in are never modified.
    """
    if on_nan not in _ON_NAN:
        raise ValueError(f"fit: on_nan must be one of {_ON_NAN}, got {on_nan!r}")
    if not isinstance(steps, int) or steps < 0:
        raise ValueError(f"fit: steps must be a non-negative int, got {steps!r}")
    if not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"fit: batch_size must be a positive int, got {batch_size!r}")
    tr = trainer or Trainer(model, loss=loss, optimizer=optimizer, estimator=estimator, backend=backend,
                            compile=compile, grad_norm=grad_norm)
    be = tr.be
    params, opt_state = tr.init_state(params)
    base_key = be.key(seed)
    start = 0
    if resume is not None:
        from duogard.train.checkpoint import load_checkpoint

        ck = load_checkpoint(resume, like_params=params, like_opt_state=opt_state, backend=be.name)
        params, opt_state, start = ck.params, ck.opt_state, int(ck.step)
        if ck.key is not None:
            base_key = ck.key
    eval_every = eval_every or max(steps // 10, 1)

    n_train = int(data.x_train.shape[0])
    if batch_size > n_train:
        raise ValueError(f"fit: batch_size ({batch_size}) is larger than the training set ({n_train})")

    result = FitResult(params, opt_state, start, be.name, getattr(tr.estimator, "name", str(tr.estimator)))
    writer = _Log(log) if log is not None else None
    show = progress if progress is not None else sys.stderr.isatty()
    bar = None
    if show:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps - start, desc=f"{be.name}/{result.estimator}", leave=False)
    lr_of = getattr(tr._optim, "current_learning_rate", None)
    rss0 = rss_bytes()
    peak = rss0
    times: list[float] = []
    t_begin = time.perf_counter()
    try:
        for step in range(start, steps):
            xb, yb = (be.asarray(a) for a in data.batch_at(step, batch_size, seed=seed))
            key = be.fold_in(base_key, step)
            diag = tr.diagnose(params, xb, yb, key) if diagnostics_every and step % diagnostics_every == 0 else {}
            t0 = time.perf_counter()
            # the step returns what to continue from: its inputs, unchanged, when not finite
            params, opt_state, value, gsq = tr.step(params, opt_state, xb, yb, key)
            value = float(value)  # waits for the step: honest timing
            gsq = float(gsq) if gsq is not None else float("nan")
            dt = time.perf_counter() - t0
            if step == start:
                result.first_step_seconds = dt
            else:
                times.append(dt)
            finite = math.isfinite(value) and (math.isfinite(gsq) or not tr.grad_norm)
            if not finite:
                if on_nan == "raise":
                    raise NonFiniteError(
                        f"fit: non-finite {'loss' if not math.isfinite(value) else 'gradient'} at step {step + 1} "
                        f"(loss={value}, |grad|^2={gsq}) with {result.estimator} on {be.name}"
                        + (f"; the last good checkpoint in {str(checkpoint)!r} is kept" if checkpoint else "")
                        + ". Lower the learning rate, or pass on_nan='skip'."
                    )
                result.skipped_steps += 1
            rec = {"step": step + 1, "loss": value}
            if tr.grad_norm:
                rec["grad_norm"] = math.sqrt(gsq) if gsq >= 0 else float("nan")
            rec.update(time=time.perf_counter() - t_begin, step_time=dt)
            if lr_of is not None:
                try:
                    rec["lr"] = float(lr_of(opt_state))
                except (TypeError, ValueError, KeyError):
                    pass
            for k, v in diag.items():
                rec[k] = float(v)
            result.history.append(rec)
            peak = max(peak, rss_bytes())
            done = step + 1
            if done % eval_every == 0 or done == steps:
                ev = tr.evaluate(params, data.x_test, data.y_test)
                rec_e = {"step": done, "test_loss": ev["loss"], "test_accuracy": ev["accuracy"],
                         "time": time.perf_counter() - t_begin}
                result.evals.append(rec_e)
                rec.update({k: v for k, v in rec_e.items() if k not in ("step", "time")})
            if writer is not None:
                writer.write(rec)
            if checkpoint is not None and checkpoint_every and done % checkpoint_every == 0:
                _save(checkpoint, params, opt_state, done, base_key, be, result)
            if callback is not None:
                callback(rec)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{value:.4f}")
    finally:
        if bar is not None:
            bar.close()
        if writer is not None:
            writer.close()
    result.params, result.opt_state, result.step = params, opt_state, max(steps, start)
    result.total_seconds = time.perf_counter() - t_begin
    result.time_per_step = float(np.median(times)) if times else result.first_step_seconds
    result.peak_memory_bytes = max(peak - rss0, 0)
    result.compiles = tr.compiles()
    if checkpoint is not None:
        _save(checkpoint, params, opt_state, result.step, base_key, be, result)
    return result


def _save(path, params, opt_state, step, key, be, result) -> None:
    from duogard.train.checkpoint import save_checkpoint

    save_checkpoint(path, params=params, opt_state=opt_state, step=step, key=key,
                    config={"backend": be.name, "estimator": result.estimator})
