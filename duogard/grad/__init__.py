"""Gradient estimators: backprop, forward gradients and their variants, zeroth order, diagnostics.

``duogard.estimator(name, **options)`` returns a callable ``(loss_fn, params, batch, key) ->
(loss, grads)``; the names are the ``--grad`` flag of the scripts and the CLI.
"""

from duogard.grad._activity import ForwardActivity
from duogard.grad._backprop import Backprop
from duogard.grad._base import ESTIMATORS, Estimator, FlatView, ForwardModeError, estimator, register
from duogard.grad._diagnostics import gradient_agreement, with_diagnostics
from duogard.grad._forward import (
    Forward,
    ForwardExact,
    draw_leaf_tangent,
    draw_leaf_tangents,
    forward_mode_errors,
    jvp_loss,
)
from duogard.grad._guess import ForwardGuess
from duogard.grad._lean import LeanStep
from duogard.grad._local import (
    LocalBackprop,
    LocalForward,
    LocalForwardActivity,
    local_losses,
    local_objective,
)
from duogard.grad._objective import MODEL_KEY, Supervised, model_batch, supervised
from duogard.grad._zeroth import SPSA, ZerothLeanStep

__all__ = [
    "Estimator",
    "ESTIMATORS",
    "estimator",
    "register",
    "FlatView",
    "ForwardModeError",
    "Backprop",
    "Forward",
    "ForwardExact",
    "ForwardActivity",
    "SPSA",
    "ZerothLeanStep",
    "LocalBackprop",
    "LocalForward",
    "LocalForwardActivity",
    "ForwardGuess",
    "local_objective",
    "local_losses",
    "Supervised",
    "supervised",
    "MODEL_KEY",
    "model_batch",
    "gradient_agreement",
    "with_diagnostics",
    "forward_mode_errors",
    "jvp_loss",
    "LeanStep",
    "draw_leaf_tangent",
    "draw_leaf_tangents",
]
