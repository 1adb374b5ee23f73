"""What only the JAX backend offers: its extras.

``pyproject.toml`` registers each under its front-end name (entry points ``duogard.extras``:
``duogard.optim.from_optax`` -> ``duogard_jax.extras:from_optax``); the front end loads them by
that name on first use (``duogard.backend.load_extra``), so it never imports JAX itself nor
names this backend. ``duogard.backend.extra("jax", name)`` reads this module too.

- the optax adapter: :func:`from_optax` (:mod:`duogard_jax.optax`).
"""

from .optax import from_optax

__all__ = ["from_optax"]
