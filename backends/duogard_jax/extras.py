"""What only the JAX backend offers, for ``duogard.backend.extra("jax", name)``.

The front end reaches these through that function only (``duogard.optim.from_optax`` resolves
here), so it never imports JAX itself.

- the optax adapter: :func:`from_optax` (:mod:`duogard_jax.optax`).
"""

from .optax import from_optax

__all__ = ["from_optax"]
