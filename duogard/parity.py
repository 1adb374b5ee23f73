"""Run two backends in lockstep and report where (and whether) they diverge.

The same initial params (NumPy init), the same batches (NumPy, step-indexed), and for
stochastic estimators the SAME tangents: drawn once per step on the first backend and
handed to the second by DLPack. Any difference is then the frameworks' own arithmetic (or a
real bug), not noise.

:func:`compare_backends` runs it (``compare`` is its old name: deprecated, it warns and goes in
the next release; :func:`duogard.comparison.compare_methods` is the main job, every backend x
method).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from duogard import losses as _losses
from duogard._deprecated import moved
from duogard.backend import DEFAULT_PAIR
from duogard.backend import backend as _backend
from duogard.tree import flatten_dict, tree_map

__all__ = ["ROUNDING_FACTOR", "ParityReport", "compare_backends", "default_tolerance"]


#: A calibrated float32 run diverges only beyond this many times its own rounding (measured
#: against a float64 run of the same steps), as well as beyond ``tol``.
ROUNDING_FACTOR = 10.0


def default_tolerance(dtype: str) -> float:
    """Relative divergence beyond which two backends are said to differ."""
    return 1e-4 if str(dtype) == "float32" else 1e-10


@dataclass
class ParityReport:
    """Per-step records and the first step where the backends diverge beyond ``tol``."""

    backends: tuple[str, str]
    dtype: str
    tol: float
    records: list[dict] = field(default_factory=list)
    first_divergence: int | None = None
    #: the backend of the float64 reference that calibrates a float32 run, or None
    reference: str | None = None

    @property
    def final(self) -> dict:
        return self.records[-1] if self.records else {}

    def table(self, every: int = 10) -> str:
        _check_positive_int("ParityReport.table", "every", every)
        a, b = self.backends
        head = (
            f"{'step':>5}  {'loss ' + a:>14}  {'loss ' + b:>14}  {'param max abs':>13}  {'param rel':>10}  "
            f"{'grad max abs':>12}  {'grad rel':>10}  worst leaf"
        )
        lines = [head, "-" * len(head)]
        for r in self.records:
            if r["step"] % every == 0 or r["step"] == 1 or r["step"] == self.first_divergence:
                lines.append(
                    f"{r['step']:>5}  {r['loss_a']:>14.8g}  {r['loss_b']:>14.8g}  "
                    f"{r['param_max_abs']:>13.3e}  {r['param_rel']:>10.3e}  "
                    f"{r['grad_max_abs']:>12.3e}  {r['grad_rel']:>10.3e}  {r['worst_leaf']}"
                )
        verdict = (
            f"agree within rel {self.tol:g} for {len(self.records)} steps"
            if self.first_divergence is None
            else f"DIVERGE beyond rel {self.tol:g} first at step {self.first_divergence}"
        )
        if self.reference:
            verdict += f" (or {ROUNDING_FACTOR:g}x the float32 rounding of a float64 run on {self.reference})"
        lines.append(f"{a} vs {b} ({self.dtype}): {verdict}")
        return "\n".join(lines)


def _check_positive_int(fn: str, arg: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"{fn}: {arg} must be a positive int, got {value!r}")
    return int(value)


def _check_arguments(backends, tol, steps):
    """Before any work: two backend names, a finite tol > 0 (NaN would "agree" at every step), steps >= 1."""
    if (
        not isinstance(backends, (tuple, list))
        or len(backends) != 2
        or not all(isinstance(b, str) for b in backends)
    ):
        raise ValueError(
            f"parity: backends must name exactly two backends, e.g. ('jax', 'torch'), got {backends!r}"
        )
    if tol is not None:
        ok = isinstance(tol, (int, float, np.integer, np.floating)) and not isinstance(tol, bool)
        if not ok or not math.isfinite(tol) or tol <= 0:
            raise ValueError(f"parity: tol must be a finite number > 0, got {tol!r}")
    _check_positive_int("parity", "steps", steps)


def _per_backend(value, names):
    """``value`` or a ``{backend: value}`` dict (to plant a difference on one side)."""
    if isinstance(value, dict) and set(value) == set(names):
        return [value[n] for n in names]
    return [value, value]


def _diff(tree_a: dict, tree_b: dict, floor: float = 0.0):
    """(max abs diff, global relative diff ‖a-b‖/max(‖b‖, floor), name of the leaf with the
    largest rel diff, ‖b‖).
    """
    fa, fb = flatten_dict(tree_a), flatten_dict(tree_b)
    max_abs, num, den, worst, worst_rel = 0.0, 0.0, 0.0, "", -1.0
    for k in fa:
        a, b = np.asarray(fa[k], np.float64), np.asarray(fb[k], np.float64)
        d = a - b
        max_abs = max(max_abs, float(np.max(np.abs(d))) if d.size else 0.0)
        nd, nb = float(np.sum(d * d)), float(np.sum(b * b))
        num, den = num + nd, den + nb
        rel = math.sqrt(nd) / max(math.sqrt(nb), 1e-30)
        if rel > worst_rel:
            worst, worst_rel = k, rel
    return max_abs, math.sqrt(num) / max(math.sqrt(den), floor, 1e-30), worst, math.sqrt(den)


def compare_backends(
    model,
    loss: Callable | str,
    optimizer,
    estimator,
    data,
    *,
    steps: int = 100,
    backends=DEFAULT_PAIR,
    seed: int = 0,
    batch_size: int = 64,
    dtype: str = "float32",
    tol: float | None = None,
    params=None,
    callback=None,
    calibrate: bool | None = None,
) -> ParityReport:
    """Train on two backends in lockstep and compare them every step.

    ``model``, ``params``, ``optimizer`` and ``estimator`` may be one object for both, or
    ``{backend: object}`` to plant a difference on one side. ``estimator`` may be a name. Returns a
    :class:`ParityReport` with, per step, each backend's loss and the max abs / relative
    difference of the params and of the grads, and ``first_divergence``: the first step
    whose relative param or grad difference exceeds ``tol``. The grads' difference is taken
    relative to the larger of that step's grad norm and the mean norm of the steps before
    (a forward gradient whose directional derivative is near zero is pure rounding).

    Calibration (``calibrate``, default: on for float32 when one of the backends computes in
    float64, torch always, JAX with x64 on): a third run in float64 on that backend follows the
    same batches and tangents, and a step counts as a divergence only when the difference also
    exceeds :data:`ROUNDING_FACTOR` times that backend's own float32-vs-float64 difference at
    the step. A faithful float32 port whose gradient has a badly conditioned step (a bias
    gradient that is a sum of cancelling terms) then passes, while a real one-op difference,
    far above rounding, is still caught at its first step.

    Raises:
        ValueError: ``backends`` not two names, ``tol`` not a finite number > 0, ``steps`` not a
            positive int, or ``dtype`` not float32/float64.
    """
    from duogard import grad as _grad
    from duogard.grad._objective import model_batch
    from duogard.step import build_step

    _check_arguments(backends, tol, steps)
    names = tuple(backends)
    bes = [_backend(n) for n in names]
    if dtype not in ("float32", "float64"):
        raise ValueError(f"parity: dtype must be 'float32' or 'float64', got {dtype!r}")
    tol = default_tolerance(dtype) if tol is None else float(tol)
    reference = _reference_side(bes) if dtype == "float32" and calibrate is not False else None
    if calibrate and reference is None and dtype == "float32":
        raise ValueError(
            "parity: calibrate=True needs a backend that computes in float64 (torch, or JAX with x64)"
        )
    models = _per_backend(model, names)
    loss_fns = [_grad.supervised(m, _losses.get(loss)) for m in models]
    ests = [_grad.estimator(e) if isinstance(e, str) else e for e in _per_backend(estimator, names)]
    opts = _per_backend(optimizer, names)
    inits = (
        [models[0].init(seed, data.example_input, dtype=dtype)] * 2
        if params is None
        else _per_backend(params, names)
    )
    inits = [tree_map(lambda a: np.asarray(a, dtype), p) for p in inits]

    # a model with a training mode runs with train=True and the same model key on every side
    # (duogard's keys and dropout masks are the same on every backend)
    train_mode = bool(getattr(models[0], "has_train_mode", False))
    sides = []
    for i in (0, 1) if reference is None else (0, 1, reference):
        be, est, opt = bes[i], ests[i], opts[i]
        # each side its own copy: backends may wrap NumPy memory without copying (torch always,
        # JAX on CPU), and the SGD strategies update in place: one side's update must not reach
        # the other side's params (nor the caller's ``params``) while that side still reads them
        as_side = (lambda a, be=be: be.asarray(np.array(a, dtype=dtype))) if len(sides) < 2 else (
            lambda a, be=be: be.asarray(np.array(a, np.float64))  # the float64 reference run
        )  # fmt: skip
        p = tree_map(as_side, inits[i])
        sides.append(
            {
                "be": be,
                "est": est,
                "params": p,
                "state": opt.init(p),
                # the one step builder, with the Trainer's update strategy for this optimizer
                # and estimator; the tangents are given (drawn once, shared), the estimate kept
                "step": build_step(
                    be,
                    loss_fns[i],
                    est,
                    opt,
                    train_mode=train_mode,
                    grad_norm=False,
                    tangents="given" if est.stochastic else "draw",
                    return_estimate=True,
                ),
            }  # fmt: skip
        )
    loss_fn = loss_fns[0]
    key = bes[0].key(seed)
    roots = [s["be"].key(seed) for s in sides]
    keys = [lambda step, be=s["be"], root=root: be.fold_in(root, step) for s, root in zip(sides, roots)]
    report = ParityReport(names, dtype, tol, reference=None if reference is None else names[reference])
    grad_norms: list[float] = []
    for step in range(steps):
        xb, yb = data.batch_at(step, batch_size, seed=seed)
        xb = xb.astype(dtype)
        xs = [s["be"].asarray(xb) for s in sides[:2]]
        # tangents drawn once, on the first backend, and shared with the second (DLPack)
        a = sides[0]
        tangents = (
            a["est"].sample(loss_fn, a["params"], model_batch(bes[0], xs[0], None, keys[0](step), train_mode),
                            bes[0].fold_in(key, step))
            if a["est"].stochastic
            else None
        )  # fmt: skip
        shared = [tangents, None if tangents is None else tree_map(sides[1]["be"].asarray, tangents)]
        if reference is not None:
            r = sides[2]["be"]
            xs.append(r.asarray(np.asarray(xb, "float64")))
            as64 = lambda t, r=r: r.asarray(np.asarray(bes[0].to_numpy(t), np.float64))  # noqa: E731
            shared.append(None if tangents is None else tree_map(as64, tangents))
        outs = []
        for i, (s, x, t) in enumerate(zip(sides, xs, shared)):
            y = s["be"].asarray(yb)
            s["params"], s["state"], value, _, grads = s["step"](
                s["params"], s["state"], x, y, keys[i](step), t
            )
            outs.append((value, grads))
        to_np = [lambda t, be=s["be"]: tree_map(be.to_numpy, t) for s in sides]
        pa, pb = to_np[0](sides[0]["params"]), to_np[1](sides[1]["params"])
        ga, gb = to_np[0](outs[0][1]), to_np[1](outs[1][1])
        p_abs, p_rel, p_worst, _ = _diff(pa, pb)
        # gradients relative to the larger of this step's norm and the run's mean so far: a
        # forward gradient (∇f·v) v whose directional derivative happens to be near zero is
        # only the rounding of a cancelling dot product, and would otherwise be a false alarm
        g_abs, g_rel, g_worst, g_norm = _diff(ga, gb, floor=float(np.mean(grad_norms)) if grad_norms else 0.0)
        grad_norms.append(g_norm)
        rounding = None
        if reference is not None:  # this backend's own float32 rounding: its float32 run against float64
            floor = float(np.mean(grad_norms[:-1])) if len(grad_norms) > 1 else 0.0
            ours = to_np[reference](sides[reference]["params"]), to_np[reference](outs[reference][1])
            ref = (
                tree_map(sides[2]["be"].to_numpy, sides[2]["params"]),
                tree_map(sides[2]["be"].to_numpy, outs[2][1]),
            )
            rounding = (_diff(ours[0], ref[0])[1], _diff(ours[1], ref[1], floor=floor)[1])
        rec = {
            "step": step + 1,
            "loss_a": float(outs[0][0]),
            "loss_b": float(outs[1][0]),
            "param_max_abs": p_abs,
            "param_rel": p_rel,
            "grad_max_abs": g_abs,
            "grad_rel": g_rel,
            "worst_leaf": p_worst if p_rel >= g_rel else g_worst,
        }
        if rounding is not None:
            rec["param_rounding"], rec["grad_rounding"] = rounding
        report.records.append(rec)
        if report.first_divergence is None and _diverged(p_rel, g_rel, tol, rounding):
            report.first_divergence = step + 1
        if callback is not None:
            callback(rec)
    return report


def _reference_side(bes) -> int | None:
    """The index of a backend that computes in float64 (one that always does first), or None."""
    order = sorted(range(len(bes)), key=lambda i: not bes[i].float64_always)
    for i in order:
        try:
            if bes[i].dtype_name(bes[i].asarray(np.zeros(1)).dtype) == "float64":
                return i
        except (TypeError, ValueError):  # JAX without x64 refuses the silent downcast
            continue
    return None


def _diverged(p_rel: float, g_rel: float, tol: float, rounding) -> bool:
    """Beyond ``tol`` (and, calibrated, beyond ROUNDING_FACTOR times the float32 rounding)."""
    if not np.isfinite([p_rel, g_rel]).all():
        return True
    if rounding is None:
        return max(p_rel, g_rel) > tol
    return any(rel > max(tol, ROUNDING_FACTOR * r) for rel, r in zip((p_rel, g_rel), rounding))


# old name -> new name; the old names go in the next release
_DEPRECATED = {"compare": "compare_backends"}


def __getattr__(name: str):
    if name in _DEPRECATED:
        new = _DEPRECATED[name]
        note = "duogard.compare_methods is the main job, every backend x method"
        return moved(f"duogard.parity.{name}", f"duogard.parity.{new}", globals()[new], note)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
