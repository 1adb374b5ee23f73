"""Attention on JAX over key blocks with the online softmax, and its one-pass forward-mode rule.

``jax.custom_jvp``: the primal is a ``lax.scan`` over key blocks carrying the running row
maximum ``m``, normaliser ``l`` and unnormalised output ``o``; the JVP rule runs the same scan
carrying two more accumulators, ``a = Σ p·ds`` and ``t = Σ p·dv + Σ (p·ds) v``, and returns
``d out = t / l - out · a / l``. Only one block of scores, ``(..., Lq, block)``, is alive at
a time. Reverse mode transposes the rule (JAX does it: the rule is linear in the tangents),
which keeps every block's weights for the backward pass, as the math form does.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax


def attention(q, k, v, *, mask=None, causal=False, scale=None, block=512):
    dtype = jnp.result_type(q, k, v)
    q, k, v = (jnp.asarray(a, dtype) for a in (q, k, v))
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    block = max(1, min(int(block), k.shape[-2]))
    keep = bias = None
    if mask is not None:
        if mask.dtype == jnp.bool_:
            keep = mask
        else:
            bias = jnp.asarray(mask, dtype)
    return _attention(q, k, v, bias, keep, bool(causal), scale, block)


@functools.partial(jax.custom_jvp, nondiff_argnums=(5, 6, 7))
def _attention(q, k, v, bias, keep, causal, scale, block):
    return _scan(q, k, v, bias, keep, causal, scale, block, None)[0]


@_attention.defjvp
def _attention_jvp(causal, scale, block, primals, tangents):
    q, k, v, bias, keep = primals
    dq, dk, dv, dbias, _ = tangents
    return _scan(q, k, v, bias, keep, causal, scale, block, (dq, dk, dv, dbias))


def _scan(q, k, v, bias, keep, causal, scale, block, tangents):
    """The output (and its tangent when ``tangents`` is ``(dq, dk, dv, dbias)``), one key block
    at a time.
    """
    lq, lk = q.shape[-2], k.shape[-2]
    lead = jnp.broadcast_shapes(*(a.shape[:-2] for a in (q, k, v, bias, keep) if a is not None))
    rows = (*lead, lq, 1)
    qs = q * scale
    dqs = None if tangents is None else tangents[0] * scale
    queries = jnp.arange(lq)[:, None]

    def step(carry, j):
        # the last block ends at the last key and overlaps the one before: keys already seen
        # are masked out (no padded copy of k and v)
        start = jnp.minimum(j * block, lk - block)
        ids = start + jnp.arange(block)
        live = ids >= j * block
        if causal:
            live = live & (ids <= queries)  # torch's is_causal: key j <= query i
        kb, vb = _keys(k, start, block), _keys(v, start, block)
        s = qs @ jnp.matrix_transpose(kb)
        if bias is not None:
            s = s + _keys(bias, start, block, axis=-1)
        if keep is not None:
            live = live & _keys(keep, start, block, axis=-1)
        s = jnp.where(live, s, -jnp.inf)
        m, norm, o = carry[:3]
        new = jnp.maximum(m, jnp.max(s, axis=-1, keepdims=True))
        top = jnp.where(jnp.isneginf(new), 0.0, new)  # a row with no live key yet: p = 0, not NaN
        alpha, p = jnp.exp(m - top), jnp.exp(s - top)
        out = [new, alpha * norm + jnp.sum(p, axis=-1, keepdims=True), alpha * o + p @ vb]
        if tangents is not None:
            _, dk, dv, dbias = tangents
            ds = dqs @ jnp.matrix_transpose(kb) + qs @ jnp.matrix_transpose(_keys(dk, start, block))
            if dbias is not None:
                ds = ds + _keys(dbias, start, block, axis=-1)
            pds = p * jnp.where(live, ds, 0.0)
            a, t = carry[3:]
            out.append(alpha * a + jnp.sum(pds, axis=-1, keepdims=True))
            out.append(alpha * t + pds @ vb + p @ _keys(dv, start, block))
        return tuple(out), None

    dtype, wide = q.dtype, (*lead, lq, v.shape[-1])
    init = [jnp.full(rows, -jnp.inf, dtype), jnp.zeros(rows, dtype), jnp.zeros(wide, dtype)]
    if tangents is not None:
        init += [jnp.zeros(rows, dtype), jnp.zeros(wide, dtype)]
    carry, _ = lax.scan(step, tuple(init), jnp.arange(-(-lk // block)))
    norm = jnp.where(carry[1] > 0, carry[1], 1.0)  # a row with every key masked: 0, as torch's math kernel
    out = carry[2] / norm
    if tangents is None:
        return out, None
    return out, carry[4] / norm - out * (carry[3] / norm)


def _keys(x, start, size, axis=-2):
    """``x``'s keys ``start:start + size`` along ``axis`` (all of them where ``x`` broadcasts there)."""
    if x.shape[axis] == 1:
        return x
    return lax.dynamic_slice_in_dim(x, start, size, axis=x.ndim + axis)
