"""Attention: ``scaled_dot_product_attention`` kept whole by the capture (not decomposed) and
lowered to the math attention, the form torch's own math kernel computes.

Kept whole because its decomposition is not faithful to the graph around it: export records
the views after the attention with the strides of torch's fused CPU kernel (its output is laid
out (batch, length, heads, dim)), which the decomposed math form does not have, so
``run_decompositions`` fails on the first ``view`` of the output (Hugging Face GPT-2:
``Cannot view a tensor with shape [2, 16, 64] and strides (64, 128, 1)``).

Over more than :data:`BLOCK` keys (and without dropout) it is the backend's blockwise attention
(``be.attention``: the online softmax over key blocks, whose forward-mode rule holds one block of
scores, not the ``(Lq, Lk)`` matrix); up to one block, the math form, whose numbers are torch's
math kernel's. The two agree to rounding (the blocks change the order of the sums).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..helpers import device_kw
from ..registry import AtenRule, RuleTable

__all__ = ["RULES"]

aten = torch.ops.aten
RULES = RuleTable("attention", AtenRule)
register = RULES.register

#: keys per block of the blockwise attention; a longer sequence of keys takes it
BLOCK = 512


def _repeat_heads(xp, x, n: int):
    """``x.repeat_interleave(n, dim=-3)``: grouped-query attention's shared key/value heads."""
    if n == 1:
        return x
    shape = tuple(int(s) for s in x.shape)
    y = xp.broadcast_to(xp.expand_dims(x, axis=x.ndim - 2), shape[:-2] + (n,) + shape[-2:])
    return xp.reshape(y, shape[:-3] + (shape[-3] * n,) + shape[-2:])


@register(
    aten.scaled_dot_product_attention.default,
    doc="softmax(q kᵀ · scale + mask) v with xp.matmul and be.softmax (rows masked out entirely "
    "give 0, as torch's math kernel); over more than 512 keys without dropout, be.attention (key "
    "blocks, online softmax: a forward-mode rule without the (Lq, Lk) matrix); dropout on the "
    "weights is the graph's next portable dropout",
)
def _sdpa(rt, info, q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    xp, be = rt.be.xp, rt.be
    n_q, n_k = int(q.shape[-2]), int(k.shape[-2])
    if enable_gqa:
        k = _repeat_heads(xp, k, int(q.shape[-3]) // int(k.shape[-3]))
        v = _repeat_heads(xp, v, int(q.shape[-3]) // int(v.shape[-3]))
    if n_k > BLOCK and not dropout_p > 0:
        return be.attention(q, k, v, mask=attn_mask, causal=is_causal, scale=scale, block=BLOCK)
    root = math.sqrt(1.0 / math.sqrt(int(q.shape[-1])) if scale is None else float(scale))
    scores = xp.matmul(q * root, xp.matrix_transpose(k * root))  # torch scales both, as here
    keep = None
    if is_causal:
        # NumPy: a torch tensor made here would be wrapped under torch.func.jvp (no .numpy())
        keep = be.asarray(np.tril(np.ones((n_q, n_k), dtype=bool)), **device_kw(rt))
    if attn_mask is not None:
        if attn_mask.dtype == xp.bool:
            keep = attn_mask if keep is None else xp.logical_and(keep, attn_mask)
        else:
            scores = scores + attn_mask
    if keep is not None:
        scores = xp.where(keep, scores, xp.full_like(scores, -math.inf))
    weights = be.softmax(scores, axis=-1)
    if keep is not None or attn_mask is not None:  # a row with every key masked: 0, not NaN
        live = xp.any(scores != -math.inf, axis=-1, keepdims=True)
        weights = xp.where(live, weights, xp.zeros_like(weights))
    if dropout_p > 0:
        weights = _dropout(rt, info, weights, float(dropout_p))
    return xp.matmul(weights, v)


def _dropout(rt, info, x, p: float):
    xp = rt.be.xp
    if p >= 1.0:
        return xp.zeros_like(x)
    key = rt.key_for(info.extra["dropout_index"], f"attention dropout {info.path or 'of the root module'}")
    keep = rt.be.bernoulli(key, 1.0 - p, tuple(x.shape), device=rt.be.device_of(x))
    return xp.where(keep, x / (1.0 - p), xp.zeros_like(x))
