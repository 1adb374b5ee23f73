"""Step memory on JAX: XLA's own figures for each compiled program, plus the arrays a step
keeps between its programs (``jax.live_arrays``).

``jit`` (in ``_autodiff``) returns every program wrapped by :func:`observed`: while
:func:`step_memory` runs, each call of a program first takes a sample; otherwise the wrapper
only forwards the call.
"""

from __future__ import annotations

import functools
import gc

import jax

# the tracker of the step being measured (at most one), read by every observed program call
_ACTIVE: list = []


def _live_bytes() -> int:
    return sum(a.nbytes for a in jax.live_arrays())


class _Tracker:
    """The running peak, over the samples of one step, of (bytes of live arrays - the bytes
    alive at entry) + the program about to run's temp and output bytes beyond its donated ones.
    """

    def __init__(self):
        self.baseline = _live_bytes()
        self.peak = 0

    def sample(self, extra: int = 0) -> None:
        self.peak = max(self.peak, _live_bytes() - self.baseline + extra)

    def program(self, program, args, kwargs) -> None:
        if any(isinstance(a, jax.core.Tracer) for a in jax.tree_util.tree_leaves((args, kwargs))):
            return  # called inside another program's trace: part of that program, not a run
        # compiled already by an earlier call with these shapes: lowering hits JAX's caches
        stats = program.lower(*args, **kwargs).compile().memory_analysis()
        own = 0
        if stats is not None:
            own = stats.temp_size_in_bytes + stats.output_size_in_bytes - stats.alias_size_in_bytes
        self.sample(max(own, 0))


def observed(program):
    """``program`` (a ``jax.jit`` function), sampled by :func:`step_memory` when one runs."""

    def run(*args, **kwargs):
        if _ACTIVE:
            _ACTIVE[-1].program(program, args, kwargs)
        return program(*args, **kwargs)

    functools.update_wrapper(run, program)
    for name in ("lower", "trace", "eval_shape", "clear_cache", "_cache_size"):
        setattr(run, name, getattr(program, name))
    return run


def step_memory(fn, *args):
    # no collection of reference cycles inside the step: it would free baseline arrays there
    collecting = gc.isenabled()
    gc.disable()
    tracker = _Tracker()
    _ACTIVE.append(tracker)
    try:
        out = fn(*args)
        jax.block_until_ready(out)
        tracker.sample()  # the step's outputs (new arrays not written into donated ones)
    finally:
        _ACTIVE.remove(tracker)
        if collecting:
            gc.enable()
    return tracker.peak
