"""A training step's own memory, measured once outside the timed steps."""

from __future__ import annotations

from duogard.tree import tree_map

__all__ = ["measure_step_memory"]


def measure_step_memory(trainer, params, opt_state, x, y, key) -> int:
    """The step memory of ``trainer.step(params, opt_state, x, y, key)``, in bytes.

    The peak bytes of the arrays alive during one training step beyond the params, the
    optimizer state and the batch: activations, tangents, gradients, temporaries, and new
    params or optimizer state where the step does not write them in place. The same definition
    on every backend (:meth:`duogard.backend.Backend.step_memory` says how each measures it);
    never the process's RSS, which holds compilers and allocator caches.

    The step runs once on copies of ``params`` and ``opt_state`` (the SGD update strategies
    write into the params they are given), so the arrays passed in are left as they were and
    the copies count in the baseline, as the step's own inputs would. Run a step with these
    shapes first: on JAX a step that has run is not compiled again.

    Args:
        trainer: a :class:`~duogard.train.Trainer`.
        params: the params, as the Trainer steps them (from :meth:`Trainer.init_state` or a step).
        opt_state: the optimizer state that goes with them.
        x: a batch's inputs, on the backend.
        y: its targets.
        key: the step's key.

    Returns:
        The peak in bytes.
    """
    be = trainer.be

    def copy(a):
        return be.xp.asarray(a, copy=True) if be.is_array(a) else a

    return int(be.step_memory(trainer.step, tree_map(copy, params), tree_map(copy, opt_state), x, y, key))
