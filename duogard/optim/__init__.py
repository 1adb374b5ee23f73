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
or torch.optim optimizer with :func:`from_optax` / :func:`from_torch_optimizer`: these adapters
live in the backends (``duogard_jax.optax``, ``duogard_torch.optim``), which register them as
extras; each is loaded on first use (:func:`duogard.backend.load_extra`), so importing this
package imports no framework. ``from_torch`` is the old name of :func:`from_torch_optimizer`
(deprecated: ``duogard.from_torch`` ports a ``torch.nn.Module``).
"""

from duogard._deprecated import moved
from duogard.backend import extras_module
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
    # adapters: registered extras of the backends, loaded on first use
    "from_optax",
    "from_torch_optimizer",
    "TorchOptimizerState",
]

_extra, __dir__ = extras_module(__name__, globals())

# old name -> new name; the old names go in the next release
_DEPRECATED = {"from_torch": "from_torch_optimizer"}


def __getattr__(name: str):
    if name in _DEPRECATED:
        new = _DEPRECATED[name]
        note = "duogard.from_torch ports a torch.nn.Module"
        return moved(f"duogard.optim.{name}", f"duogard.optim.{new}", _extra(new), note)
    return _extra(name)
