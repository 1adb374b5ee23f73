"""optax transformations as duogard optimizers: :func:`from_optax`.

optax has the same ``(init, update)`` shape as :mod:`duogard.optim`; the adapter only checks
that params and grads are jax arrays (front-end name: ``duogard.optim.from_optax``).
"""

from __future__ import annotations

from duogard.backend import backend
from duogard.optim import GradientTransformation
from duogard.optim._base import check_adapter_leaves

__all__ = ["from_optax"]

_OPTAX_FIX = (
    "optax transformations run on the JAX backend (backend='jax'); on torch use "
    "duogard.optim's own optimizers or from_torch_optimizer(torch.optim.<Class>, ...)"
)


def _check_leaves(what: str, tree) -> None:
    check_adapter_leaves("from_optax", what, tree, backend("jax"), kind="jax.Array", fix=_OPTAX_FIX)


def from_optax(tx) -> GradientTransformation:
    """Use an optax ``GradientTransformation`` (``optax.adam(1e-3)``, a chain ...) with duogard.

    It runs on the JAX backend only (params, grads and state are jax arrays; it compiles under
    ``jax.jit`` with the rest of the step). Wrap it in ``optax.inject_hyperparams`` to let
    :func:`duogard.optim.current_learning_rate` read its learning rate.

    Args:
        tx: an optax ``GradientTransformation`` (anything with callable ``init`` and ``update``).

    Returns:
        A :class:`duogard.optim.GradientTransformation` whose ``init`` and ``update`` check
        their arguments, then call ``tx``'s.

    Raises:
        TypeError: ``tx`` is not a transformation; later, from ``init``/``update``, a leaf of
            params or grads is not a jax array (a torch tensor: the message says what to use
            instead).
    """
    if not (callable(getattr(tx, "init", None)) and callable(getattr(tx, "update", None))):
        raise TypeError(f"from_optax: expected an optax GradientTransformation, got {type(tx).__name__}")

    def init(params):
        _check_leaves("params", params)
        return tx.init(params)

    def update(grads, state, params=None):
        _check_leaves("grads", grads)
        return tx.update(grads, state, params)

    return GradientTransformation(init, update)
