"""Autodiff, vectorisation and compilation on JAX (the signatures are JAX's own)."""

from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp

from duogard.tree import tree_leaves

from ._memory import observed

# XLA:CPU expands the optimization barriers that jax.checkpoint puts around its recomputation
# early (the pass "cse_barrier_expander", before layout assignment), and a later CSE pass then
# merges the recomputed values into the forward pass's: on a CPU a checkpointed program
# recomputed nothing and kept every activation. Without that pass the barriers stay until code
# generation, where they cost nothing, as on GPU. A program without barriers compiles the same.
_CPU_COMPILER_OPTIONS = {"xla_disable_hlo_passes": "cse_barrier_expander"}
_JIT_TAKES_OPTIONS = "compiler_options" in inspect.signature(jax.jit).parameters


def jvp(f, primals, tangents, has_aux=False):
    return jax.jvp(f, tuple(primals), tuple(tangents), has_aux=has_aux)


def vjp(f, *primals):
    return jax.vjp(f, *primals)


def value_and_grad(f, argnums=0, has_aux=False):
    return jax.value_and_grad(f, argnums=argnums, has_aux=has_aux)


def grad_stream(f, params, *args):
    # one program computes the whole gradient (XLA schedules it): handed over leaf by leaf after
    value, pullback = jax.vjp(lambda p: f(p, *args), params)

    def backward(apply):
        (grads,) = pullback(jnp.ones_like(value))
        leaves = tree_leaves(grads)
        for i in reversed(range(len(leaves))):  # the order of a reverse pass through a Sequential
            apply(i, leaves[i])

    return value, backward


def grad(f, argnums=0, has_aux=False):
    return jax.grad(f, argnums=argnums, has_aux=has_aux)


def vmap(f, in_axes=0, out_axes=0):
    return jax.vmap(f, in_axes=in_axes, out_axes=out_axes)


def jit(f, *, static_argnums=None, static_argnames=None, donate_argnums=None, compile=None):
    # compiled unless compile is False (torch's default is eager); observed by step_memory
    if compile is not None and not compile:
        return f
    # activation checkpointing on CPU. Given on every platform: asking which one this is
    # (jax.default_backend()) would start XLA's backend, which must wait for
    # jax.distributed.initialize in a data-parallel run; elsewhere the barriers reach code
    # generation anyway, so the option changes nothing there
    options = {"compiler_options": _CPU_COMPILER_OPTIONS} if _JIT_TAKES_OPTIONS else {}
    program = jax.jit(
        f,
        static_argnums=static_argnums,
        static_argnames=static_argnames,
        donate_argnums=donate_argnums,
        **options,
    )
    return observed(program)


def checkpoint(f):
    return jax.checkpoint(f)


def compile_count(fn):
    # a duogard wrapper counts its own programs; jax.jit's cache holds one per compilation
    own = getattr(fn, "compile_count", None)
    if callable(own):
        return own()
    size = getattr(fn, "_cache_size", None)
    return size() if callable(size) else None


def sum_of_squares(leaves):
    # inside the step's program: XLA fuses the squares and sums
    return sum(jnp.linalg.vector_norm(x) ** 2 for x in leaves)


def stop_gradient(x):
    return jax.lax.stop_gradient(x)


def is_tracing(x) -> bool:
    return isinstance(x, jax.core.Tracer)


def synchronize(tree=None):
    if tree is not None:
        jax.block_until_ready(tree)
    return tree


def add_scaled_(target, value, scale, where=None):
    # arrays are immutable: a new array (in place when jitted with ``target`` donated)
    out = (target + jnp.asarray(scale, target.dtype) * value).astype(target.dtype)
    return out if where is None else jnp.where(where, out, target)


def add_outer_(target, u, w, scale, where=None):
    # a new array; under jit XLA fuses the outer product into the update (in place when
    # ``target`` is donated)
    outer = (u[:, None] * jnp.reshape(w, (1, -1))).reshape(target.shape)
    out = (target + jnp.asarray(scale, target.dtype) * outer).astype(target.dtype)
    return out if where is None else jnp.where(where, out, target)
