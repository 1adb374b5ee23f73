"""Sections 1 and 5: step time of every configuration, round-robin, and the tangent cost (the ways
of drawing tangents are in :mod:`.draws`)."""

from __future__ import annotations

import gc
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ._common import METHODS, RANK1_METHODS, Sizes, dense_twin, median, ratio_of
from .hand_jax import jax_hand
from .hand_torch import torch_hand
from .workloads import data_for, duogard_step, has_jvp_option, workload

__all__ = [
    "StepConfig",
    "check_losses",
    "step_configs",
    "step_records",
    "time_step_configs",
    "warm",
]


@dataclass
class StepConfig:
    """One timed configuration (backend x model x method x implementation) and its timings."""

    kind: str  # "step" or "draw"
    backend: str
    model: str
    method: str
    impl: str
    make: Callable
    run: Callable | None = None
    draw: Callable | None = None
    first_s: float = float("nan")
    first_loss: float = float("nan")
    reps: int = 1
    times: list | None = None
    error: str | None = None


def step_configs(sz: Sizes, backends) -> list[StepConfig]:
    """Every step configuration of the run, not built yet (``make`` builds it).

    Args:
        sz: the run's sizes.
        backends: the backends to time (``"jax"``, ``"torch"``).

    Returns:
        The configurations, duogard's and the hand-written ones side by side.
    """
    configs = []
    data = data_for(sz)
    for model_name in ("mlp", "cnn"):
        methods = sz.methods.get(model_name, ())
        if not methods:
            continue
        model, params_np, ops, layers_np = workload(model_name, sz, data[0])
        for method in methods:
            est = METHODS[method][0]
            for backend in backends:
                impls = ["duogard", "hand"]
                if backend == "torch" and est == "backprop" and sz.extras:
                    impls.append("hand-autograd")
                if backend == "torch" and est == "forward" and sz.extras and method not in RANK1_METHODS:
                    impls.append("hand-jvp")  # (the rank-1 "hand" step is hand-written rules already)
                if backend == "torch" and model_name == "mlp" and method in sz.compile_methods:
                    impls.append("duogard-compiled")
                if backend == "torch" and method in sz.framework_jvp_methods and has_jvp_option():
                    impls.append("duogard-framework-jvp")
                if method in sz.lean_methods:
                    impls.append("duogard-lean")
                if method in sz.gradnorm_methods:
                    impls.append("duogard-gradnorm")
                if method in sz.native_methods:
                    impls.append("duogard-native")
                for impl in impls:
                    if impl.startswith("duogard"):
                        make = lambda b=backend, m=model, p=params_np, me=method, im=impl: duogard_step(
                            b,
                            m,
                            p,
                            *data,
                            me,
                            compile=(im == "duogard-compiled") or None,
                            jvp="framework" if im == "duogard-framework-jvp" else None,
                            lean=im == "duogard-lean",
                            grad_norm=im == "duogard-gradnorm",
                            generator="native" if im == "duogard-native" else None,
                        )
                    elif backend == "jax":
                        make = lambda o=ops, ln=layers_np, me=method: jax_hand(o, ln, *data, me)
                    else:
                        make = lambda o=ops, ln=layers_np, me=method, im=impl: torch_hand(
                            o, ln, *data, me, im
                        )
                    configs.append(StepConfig("step", backend, model_name, method, impl, make))
    return configs


def warm(cfg: StepConfig, round_seconds: float, max_reps: int, draw_impls=("duogard", "hand")) -> None:
    """Build the step, time the first call (compilation), warm up, and choose the repeats.

    A failure is recorded in ``cfg.error`` (and the configuration is left out of the rounds).

    Args:
        cfg: the configuration, updated in place.
        round_seconds: the time per configuration per round that sets the repeats.
        max_reps: the most repeats per round.
        draw_impls: the implementations whose tangent drawing is timed alone (``Sizes.draw_impls``).
    """
    try:
        gc.collect()
        cfg.run, cfg.draw = cfg.make()
        if cfg.impl not in draw_impls:
            cfg.draw = None  # the tangent cost is measured on the main implementations only
        t0 = time.perf_counter()
        loss = cfg.run()
        cfg.first_s = time.perf_counter() - t0
        cfg.first_loss = float(loss)
        cfg.run()
        t0 = time.perf_counter()
        cfg.run()
        once = time.perf_counter() - t0
        if cfg.draw is not None:
            cfg.draw()
        least = 1 if round_seconds == 0 or once > 2 * round_seconds else 2
        cfg.reps = int(min(max(round(round_seconds / max(once, 1e-6)), least), max_reps))
        cfg.times = []
    except Exception as exc:  # noqa: BLE001 - reported, never hidden
        cfg.error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
        cfg.run = cfg.draw = None


def time_step_configs(configs, sz: Sizes, log) -> dict:
    """Round-robin over every configuration, ``sz.rounds`` times.

    Args:
        configs: the warmed configurations (their ``times`` fill up).
        sz: the run's sizes.
        log: prints a line.

    Returns:
        The draw timings, ``id(config) -> seconds``.
    """
    draws: dict = {}
    live = [c for c in configs if c.run is not None]
    for r in range(sz.rounds):
        order = live[r % len(live) :] + live[: r % len(live)] if live else []
        t_round = time.perf_counter()
        for cfg in order:
            for _ in range(cfg.reps):
                t0 = time.perf_counter()
                cfg.run()
                cfg.times.append(time.perf_counter() - t0)
            if cfg.draw is not None:
                for _ in range(max(cfg.reps, 2)):
                    t0 = time.perf_counter()
                    cfg.draw()
                    draws.setdefault(id(cfg), []).append(time.perf_counter() - t0)
        log(f"  round {r + 1}/{sz.rounds}: {time.perf_counter() - t_round:.1f} s")
    return draws


def step_records(configs, draws) -> list[dict]:
    """The ``step_time`` records of the JSON: medians, quartiles, and the ratios between configurations.

    Args:
        configs: the timed configurations.
        draws: the draw timings of :func:`time_step_configs`.

    Returns:
        One record per configuration.
    """
    recs = []
    for c in configs:
        rec = {
            "section": "step_time",
            "backend": c.backend,
            "model": c.model,
            "method": c.method,
            "impl": c.impl,
            "median_s": median(c.times or []),
            "first_step_s": c.first_s,
            "first_loss": c.first_loss,
            "samples": len(c.times or []),
        }
        if c.times:
            q = np.percentile(c.times, [25, 75])
            rec.update(min_s=float(min(c.times)), q25_s=float(q[0]), q75_s=float(q[1]))
        if id(c) in draws:
            rec["draw_median_s"] = median(draws[id(c)])
        if c.error:
            rec["error"] = c.error
        rec["ratios"] = {}
        recs.append(rec)
    index = {(r["backend"], r["model"], r["method"], r["impl"]): r for r in recs}
    for r in recs:
        b, m, me, im = r["backend"], r["model"], r["method"], r["impl"]
        t = r["median_s"]
        if me != "backprop":
            # the same implementation's backprop; for hand-jvp, the fastest hand-written backprop
            bp = index.get((b, m, "backprop", im))
            if bp is None and im.startswith("duogard"):
                bp = index.get((b, m, "backprop", "duogard"))
            if bp is None and im.startswith("hand"):
                bp = min(
                    (index[k] for k in index if k[:3] == (b, m, "backprop") and k[3].startswith("hand")),
                    key=lambda q: q["median_s"],
                    default=None,
                )
            if bp is not None:
                r["ratios"]["forward_over_backprop"] = ratio_of(t, bp["median_s"])
        if im == "duogard" and (b, m, me, "hand") in index:
            r["ratios"]["duogard_over_hand"] = ratio_of(t, index[(b, m, me, "hand")]["median_s"])
        other = "torch" if b == "jax" else "jax"
        if (other, m, me, im) in index:
            t_other = index[(other, m, me, im)]["median_s"]
            r["ratios"]["jax_over_torch"] = ratio_of(t, t_other) if b == "jax" else ratio_of(t_other, t)
        if "draw_median_s" in r:
            r["ratios"]["tangent_share"] = ratio_of(r["draw_median_s"], t)
        twin = dense_twin(me)
        if twin is not None and (b, m, twin, im) in index:
            r["ratios"]["rank1_over_dense"] = ratio_of(t, index[(b, m, twin, im)]["median_s"])
    return recs


def check_losses(step, log) -> None:
    """Each hand-written step computes the same loss as duogard's at the first step.

    Sets ``same_first_loss`` on each non-duogard record and logs any difference.

    Args:
        step: the step records.
        log: prints a line.
    """
    for r in step:
        if r["impl"] == "duogard" or not math.isfinite(r["first_loss"]):
            continue
        ref = next(
            (
                q
                for q in step
                if (q["backend"], q["model"], q["method"], q["impl"])
                == (r["backend"], r["model"], r["method"], "duogard")
            ),
            None,
        )
        if ref and math.isfinite(ref["first_loss"]):
            tol = 1e-4 * max(1.0, abs(ref["first_loss"]))
            r["same_first_loss"] = abs(r["first_loss"] - ref["first_loss"]) <= tol
            if not r["same_first_loss"]:
                log(
                    f"   ! {r['backend']} {r['model']} {r['method']} {r['impl']}: first loss "
                    f"{r['first_loss']:.6f} differs from duogard's {ref['first_loss']:.6f}"
                )
