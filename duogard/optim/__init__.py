"""Optimizers and learning-rate schedules, written once for both backends (optax's shape).

An optimizer is a :class:`GradientTransformation` ``(init, update)`` of pure functions over
pytrees; its state is a pytree of the params' framework's arrays (step count included), so a
whole training step compiles under ``jax.jit`` and runs unchanged, eagerly, on torch::

    from duogard import optim
    tx = optim.chain(optim.clip_by_global_norm(1.0),
                     optim.adam(optim.warmup_cosine_decay(1e-3, warmup_steps=100, decay_steps=5000)))
    state = tx.init(params)
    updates, state = tx.update(grads, state, params)
    params = optim.apply_updates(params, updates)
    float(optim.current_learning_rate(state))

The optimizers follow ``torch.optim`` (hyperparameters, defaults, where eps goes) so a torch
script ports number for number; each docstring says where optax differs. Use your own optax
or torch.optim optimizer with :func:`from_optax` / :func:`from_torch`: these adapters live in
the backends (``duogard_jax.optax``, ``duogard_torch.optim``) and are loaded on first use with
:func:`duogard.backend.extra`, so importing this package imports no framework.
"""

from duogard.backend import extra
from duogard.optim._base import (
    EmptyState,
    GradientTransformation,
    apply_updates,
    chain,
    current_learning_rate,
    identity,
    step_count,
)
from duogard.optim._optimizers import PlainSGD, adagrad, adam, adamw, rmsprop, sgd
from duogard.optim._schedules import (
    Schedule,
    constant_schedule,
    cosine_decay,
    exponential_decay,
    step_decay,
    warmup_cosine_decay,
)
from duogard.optim._transforms import (
    ScaleByAdamState,
    ScaleByLearningRateState,
    ScaleByRmsState,
    ScaleByRssState,
    TraceState,
    add_decayed_weights,
    clip,
    clip_by_global_norm,
    scale,
    scale_by_adam,
    scale_by_learning_rate,
    scale_by_rms,
    scale_by_rss,
    trace,
)

__all__ = [
    # protocol
    "GradientTransformation",
    "EmptyState",
    "identity",
    "chain",
    "apply_updates",
    "current_learning_rate",
    "step_count",
    # optimizers
    "sgd",
    "adam",
    "adamw",
    "rmsprop",
    "adagrad",
    "PlainSGD",
    # transformations
    "scale",
    "scale_by_learning_rate",
    "add_decayed_weights",
    "trace",
    "scale_by_adam",
    "scale_by_rms",
    "scale_by_rss",
    "clip",
    "clip_by_global_norm",
    "ScaleByLearningRateState",
    "TraceState",
    "ScaleByAdamState",
    "ScaleByRmsState",
    "ScaleByRssState",
    # schedules
    "Schedule",
    "constant_schedule",
    "exponential_decay",
    "step_decay",
    "cosine_decay",
    "warmup_cosine_decay",
    # adapters
    "from_optax",
    "from_torch",
    "TorchOptimizerState",
]

# adapter name -> (backend, name of its extra)
_ADAPTERS = {
    "from_optax": ("jax", "from_optax"),
    "from_torch": ("torch", "optimizer_from_torch"),
    "TorchOptimizerState": ("torch", "TorchOptimizerState"),
}


def __getattr__(name: str):
    if name in _ADAPTERS:
        value = extra(*_ADAPTERS[name])
        globals()[name] = value  # resolved once; later lookups are plain attribute reads
        return value
    raise AttributeError(f"module 'duogard.optim' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
